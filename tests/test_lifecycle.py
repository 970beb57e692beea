"""The daemon as a real process: SIGTERM drains, SIGHUP reloads, a busy port is a clear error."""

from __future__ import annotations

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
