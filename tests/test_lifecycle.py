"""The daemon as a real process: SIGTERM drains, SIGHUP reloads, a busy port is a clear error; an in-process
stop closes kept-alive connections as a process exit would."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import base_env, call


class Daemon:
    def __init__(self, env: dict, args=()):
        self.proc = subprocess.Popen([sys.executable, "-m", "sluice", *args], env={**os.environ, **env},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._port = threading.Event()
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()
        assert self._port.wait(20), "sluice did not start: " + "".join(self.lines)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m and not self.port:
                self.port = int(m.group(1))
                self._port.set()

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def daemon_env(tmp_path, backend):
    return base_env(tmp_path, SLUICE_FAST_URL=backend.url, SLUICE_REASONING_URL=backend.url,
                    SLUICE_SHUTDOWN_TIMEOUT_S=10)


def wait_for(pred, timeout=10.0, what=""):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.01)


def test_sigterm_answers_queued_503_lets_inflight_finish_and_exits_0(daemon_env, backend):
    d = Daemon(daemon_env)
    try:
        wait_for(lambda: call(d.port, "GET", "/v1/health")[2]["status"] == "ok", what="ready")
        backend.holding = True
        results = {}
        t1 = threading.Thread(target=lambda: results.update(a=call(d.port, "POST", "/v1/query",
                                                                   {"model": "fast", "prompt": "inflight"})))
        t1.start()
        assert backend.wait_arrivals(1)
        t2 = threading.Thread(target=lambda: results.update(b=call(d.port, "POST", "/v1/query",
                                                                   {"model": "fast", "prompt": "queued"})))
        t2.start()
        wait_for(lambda: call(d.port, "GET", "/v1/queue/status")[2]["pending"] == 1, what="queued")
        d.proc.send_signal(signal.SIGTERM)
        t2.join(10)
        assert results["b"][0] == 503 and "shutting down" in results["b"][2]["error"]
        assert d.proc.poll() is None                  # still finishing the in-flight request
        backend.release_all()
        t1.join(10)
        assert results["a"][0] == 200 and results["a"][2]["result"] == "echo: inflight"
        assert d.proc.wait(10) == 0
        assert backend.prompts() == ["inflight"]
    finally:
        d.stop()


def test_sighup_reloads_keys_and_rejects_a_bad_file(tmp_path, daemon_env):
    cfg = tmp_path / "sluice.toml"
    cfg.write_text('[[keys]]\nname = "one"\nkey = "key-one"\n')
    d = Daemon({**daemon_env, "SLUICE_CONFIG": str(cfg)})
    try:
        one, two = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
        assert call(d.port, "GET", "/v1/queue/status", headers=one)[0] == 200
        assert call(d.port, "GET", "/v1/queue/status", headers=two)[0] == 401
        cfg.write_text('[server]\nmax_queue_depth = 7\n[[keys]]\nname = "two"\nkey = "key-two"\n')
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: call(d.port, "GET", "/v1/queue/status", headers=two)[0] == 200, what="reload")
        assert call(d.port, "GET", "/v1/queue/status", headers=one)[0] == 401
        cfg.write_text("this is not toml = = =")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in d.log(), what="rejection logged")
        assert call(d.port, "GET", "/v1/queue/status", headers=two)[0] == 200
    finally:
        d.stop()


def test_busy_port_is_a_clear_error(tmp_path, daemon_env):
    d = Daemon(daemon_env)
    try:
        r = subprocess.run([sys.executable, "-m", "sluice"], env={**os.environ, **daemon_env,
                                                                  "SLUICE_PORT": str(d.port)},
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "cannot listen" in r.stderr and "SLUICE_PORT" in r.stderr
    finally:
        d.stop()


RELOAD_BEFORE = """
[[gates]]
name = "gpu"
slots = 2

[[backends]]
name = "one"
url = "{one}"
slots = 1
models = []

[[backends]]
name = "two"
url = "{two}"
slots = 1
models = []

[[models]]
name = "keep"
aliases = ["k1"]
upstream_model = "keep-v1"
backends = ["one"]

[[models]]
name = "doomed"
upstream_model = "doomed-v1"
backends = ["one"]

[[models]]
name = "gone"
upstream_model = "gone-v1"
backends = ["one"]

[[models]]
name = "mover"
upstream_model = "mover-v1"
backends = ["one"]
"""

RELOAD_AFTER = RELOAD_BEFORE[:RELOAD_BEFORE.index("[[models]]")] + """
[[models]]
name = "keep"
aliases = ["k2"]
upstream_model = "keep-v2"
backends = ["one"]

[[models]]
name = "fresh"
aliases = ["gone"]                # a removed model's name, reused
upstream_model = "fresh-v1"
backends = ["two"]

[[models]]
name = "mover"
upstream_model = "mover-v1"
backends = ["two"]
"""


def test_reload_adds_removes_and_changes_models_without_dropping_queued_or_inflight_work(make_app, make_backend,
                                                                                       tmp_path):
    from sluice.config import ConfigError, load
    one, two = make_backend(), make_backend()
    app = make_app(toml=RELOAD_BEFORE.format(one=one.url, two=two.url))
    env = base_env(tmp_path)
    after = tmp_path / "after.toml"
    after.write_text(RELOAD_AFTER.format(one=one.url, two=two.url))
    one.holding = True
    results: dict = {}

    def send(key, path, body):
        t = threading.Thread(target=lambda: results.update({key: call(app, "POST", path, body)}))
        t.start()
        return t

    def chat(model, text):
        return {"model": model, "messages": [{"role": "user", "content": text}]}

    threads = [send("inflight", "/v1/chat/completions", chat("k1", "inflight"))]
    assert one.wait_arrivals(1)
    threads += [send("doomed", "/v1/query", {"model": "doomed", "prompt": "doomed"}),   # native: upstream id late
                send("gone", "/v1/chat/completions", chat("gone", "gone")),
                send("mover", "/v1/chat/completions", chat("mover", "mover"))]
    wait_for(lambda: app.scheduler.snapshot()["pending"] == 3, what="three queued behind the busy slot")

    app.reload(load(after, environ=env))

    threads[2].join(5)                     # its name now means another model: failed at once, clearly
    status, _, body = results["gone"]
    assert status == 503 and "removed from the configuration" in body["error"]["message"]
    threads[3].join(5)                     # moved to backend two: served there while one is still busy
    status, headers, _ = results["mover"]
    assert status == 200 and headers["X-Sluice-Backend"] == "two" and two.arrivals[-1]["model"] == "mover-v1"
    ids = {m["id"] for m in call(app, "GET", "/v1/models")[2]["data"]}
    assert {"keep", "k2", "fresh", "gone", "mover"} <= ids and "k1" not in ids
    assert call(app, "POST", "/v1/chat/completions", chat("k1", "x"))[0] == 404            # old alias
    status, _, body = call(app, "POST", "/v1/chat/completions", chat("doomed", "late"))    # removed: no new work
    assert status == 404 and "removed from the configuration" in body["error"]["message"]
    status, headers, _ = call(app, "POST", "/v1/chat/completions", chat("gone", "new meaning"))
    assert status == 200 and headers["X-Sluice-Backend"] == "two" and two.arrivals[-1]["model"] == "fresh-v1"
    assert app.scheduler.snapshot()["pending"] == 1                                        # doomed keeps its place
    assert {m["name"]: m["source"] for m in call(app, "GET", "/admin/status")[2]["models"]}["doomed"] == "retiring"

    one.release_all()
    for t in threads:
        t.join(5)
    assert results["inflight"][0] == 200 and one.arrivals[0]["model"] == "keep-v1"         # finished as it began
    status, _, body = results["doomed"]
    assert status == 200 and body["result"] == "echo: doomed"
    assert [a["model"] for a in one.arrivals] == ["keep-v1", "doomed-v1"]
    wait_for(lambda: "doomed" not in {m["id"] for m in call(app, "GET", "/v1/models")[2]["data"]},
             what="the removed model leaves once its queue is done")
    status, _, body = call(app, "POST", "/v1/chat/completions", chat("k2", "new alias"))
    assert status == 200 and one.arrivals[-1]["model"] == "keep-v2"

    # A reload that changes backends is refused; the running configuration stays.
    moved = tmp_path / "moved.toml"
    moved.write_text(RELOAD_AFTER.format(one=one.url, two=one.url))
    with pytest.raises(ConfigError, match="restart sluice"):
        app.reload(load(moved, environ=env))
    assert call(app, "POST", "/v1/chat/completions", chat("fresh", "still"))[0] == 200
    assert two.arrivals[-1]["model"] == "fresh-v1"
    t = call(app, "GET", "/v1/queue/status")[2]
    assert t["total_received"] == t["total_served"] + t["total_errors"] + t["total_rejected"] + \
        t["total_timeouts"] + t["total_cancelled"]


def test_the_daemon_writes_sluice_log_in_its_log_dir_with_each_request_id(daemon_env, tmp_path):
    """SLUICE_LOG_DIR/sluice.log gets what stderr gets: the start line and one line per request, by its id."""
    d = Daemon(daemon_env)
    try:
        status, headers, _ = call(d.port, "POST", "/v1/query", {"model": "fast", "prompt": "hi"})
        assert status == 200
        rid = headers["X-Request-Id"]
        log_file = tmp_path / "logs" / "sluice.log"
        wait_for(lambda: log_file.exists() and f"req={rid}" in log_file.read_text(), what="the request logged")
        text = log_file.read_text()
        assert f"listening on http://127.0.0.1:{d.port}" in text and "outcome=ok" in text
    finally:
        d.stop()


def test_stop_closes_kept_alive_connections_idle_at_once_and_busy_after_their_answer(make_app, backend):
    """An in-process App.stop() ends each kept-alive connection as a process exit would: an idle one at once,
    one in the middle of a request once its answer is written. None is left answering 503 "shutting down"."""
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url})
    idle = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    idle.request("GET", "/v1/health")
    resp = idle.getresponse()
    resp.read()
    assert resp.status == 200 and not resp.will_close
    busy = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    backend.holding = True
    answers: list = []

    def ask() -> None:
        busy.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "fast", "messages": [{"role": "user", "content": "held"}]}), {"Content-Type": "application/json"})
        r = busy.getresponse()
        answers.append((r.status, r.read(), r.will_close))

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    assert backend.wait_arrivals(1), "the request never reached the backend"
    stopping = threading.Thread(target=app.stop, kwargs={"timeout": 10}, daemon=True)
    stopping.start()
    idle.sock.settimeout(5)
    assert idle.sock.recv(1) == b"", "the idle connection was kept open after stop"
    backend.release_all()
    asking.join(10)
    assert answers and answers[0][0] == 200, answers
    if not answers[0][2]:                      # kept alive as far as the answer said: the close follows it
        busy.sock.settimeout(5)
        assert busy.sock.recv(1) == b"", "the busy connection was kept open after its answer"
    stopping.join(15)
    assert not stopping.is_alive()
    idle.close()
    busy.close()
