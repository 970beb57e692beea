"""More than one machine: sluice in front of a pool of remote servers, here two other sluices.

Two "host" sluices, each in front of its own stand-in backend (one per GPU host), and a "front" sluice
whose [[backends]] are the two hosts' URLs on one shared gate. Requests spill over both hosts, the front's
queue orders by priority, a priority can travel to the host, a dead host is skipped and taken back when it
returns, a draining host is taken out (the front probes each host's GET /v1/ready), and the request that
meets a host which has just died goes to the other one. Every wait is on an event or `until()` with a
deadline.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from conftest import base_env, call, until

ROOT = Path(__file__).resolve().parents[1]


def host_toml() -> str:
    return """
[[gates]]
name = "gpu"
slots = 4

[[backends]]
name = "engine"
url = "{url}"
gate = "gpu"
forward_priority = true

[[models]]
name = "m"
upstream_model = "fake-model"
backends = ["engine"]
"""


def front_toml(east: int, west: int, slots: int = 4, per_host: int = 2) -> str:
    hosts = "".join(f"""
[[backends]]
name = "{name}"
url = "http://127.0.0.1:{port}/v1"
gate = "pool"
slots = {per_host}
health_path = "/v1/ready"
forward_priority = true
""" for name, port in (("east", east), ("west", west)))
    return f"""
[[gates]]
name = "pool"
slots = {slots}
{hosts}
[[models]]
name = "m"
backends = ["east", "west"]
"""


def two_engine_host_toml(one: str, two: str) -> str:
    return f"""
[[gates]]
name = "gpu"
slots = 4

[[backends]]
name = "one"
url = "{one}"
gate = "gpu"

[[backends]]
name = "two"
url = "{two}"
gate = "gpu"

[[models]]
name = "m"
upstream_model = "fake-model"
backends = ["one", "two"]
"""


def start_host(make_app, tmp_path, name: str, backend, port: int = 0):
    return make_app({"SLUICE_PORT": port, "SLUICE_LOG_DIR": tmp_path / name / "logs",
                     "SLUICE_STATE_DIR": tmp_path / name / "run"}, toml=host_toml().format(url=backend.url))


def cluster(make_app, make_backend, tmp_path, **front_kw):
    """(front app, {host name: (host app, its stand-in backend)})."""
    hosts = {}
    for name in ("east", "west"):
        b = make_backend()
        hosts[name] = (start_host(make_app, tmp_path, name, b), b)
    front = make_app({"SLUICE_LOG_DIR": tmp_path / "front" / "logs", "SLUICE_STATE_DIR": tmp_path / "front" / "run"},
                     toml=front_toml(hosts["east"][0].port, hosts["west"][0].port, **front_kw))
    return front, hosts


def chat(front, text: str, priority: int | None = None):
    headers = {} if priority is None else {"X-Sluice-Priority": str(priority)}
    return call(front, "POST", "/v1/chat/completions",
                {"model": "m", "messages": [{"role": "user", "content": text}]}, headers=headers)


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


def front_backends(front) -> dict:
    """The front's view of its hosts: backend URL -> ready / down / ..."""
    return call(front, "GET", "/v1/health")[2]["backends"]


def test_requests_spill_over_both_hosts(make_app, make_backend, tmp_path):
    front, hosts = cluster(make_app, make_backend, tmp_path, slots=4, per_host=2)
    for _, b in hosts.values():
        b.holding = True
    runs = [in_thread(chat, front, f"r{i}") for i in range(4)]
    until(lambda: all(len(b.arrivals) == 2 for _, b in hosts.values()), what="two requests held on each host")
    for _, b in hosts.values():
        b.release_all()
    for t, _ in runs:
        t.join(10)
    answers = [out[0] for _, out in runs]
    assert [a[0] for a in answers] == [200] * 4
    assert sorted(a[1]["X-Sluice-Backend"] for a in answers) == ["east", "east", "west", "west"]
    assert all(b.violations == [] for _, b in hosts.values())


def test_the_front_queue_orders_by_priority_across_hosts(make_app, make_backend, tmp_path):
    front, hosts = cluster(make_app, make_backend, tmp_path, slots=1)
    fakes = [b for _, b in hosts.values()]
    for b in fakes:
        b.holding = True

    def seen() -> set[str]:
        return {p for b in fakes for p in b.prompts()}

    def release(prompt: str) -> None:       # let the request with this prompt answer, wherever it is held
        next(b for b in fakes if prompt in b.prompts()).release(1)

    def pending() -> int:
        return call(front, "GET", "/v1/queue/status")[2]["pending"]

    first = in_thread(chat, front, "first", 2)
    until(lambda: seen() == {"first"}, what="the first request at a host")
    low = in_thread(chat, front, "low", 4)
    until(lambda: pending() == 1, what="the P4 request queued at the front")
    high = in_thread(chat, front, "high", 0)
    until(lambda: pending() == 2, what="the P0 request queued at the front")
    # One slot at the front: each request a host answers lets exactly one more through, the best ranked.
    release("first")
    until(lambda: len(seen()) == 2, what="a second request at a host")
    assert seen() == {"first", "high"}
    release("high")
    until(lambda: len(seen()) == 3, what="the third request at a host")
    for b in fakes:
        b.release_all()
    for t, out in (first, low, high):
        t.join(10)
        assert out[0][0] == 200, out
    assert all(b.violations == [] for b in fakes)


def test_a_priority_travels_to_the_host_with_forward_priority(make_app, make_backend, tmp_path):
    front, hosts = cluster(make_app, make_backend, tmp_path)
    status, headers, _ = chat(front, "urgent", 0)
    assert status == 200
    _, engine = hosts[headers["X-Sluice-Backend"]]
    assert engine.arrivals[-1]["priority"] == 0          # front -> host sluice -> the host's engine


class HostProcess:
    """A host sluice as its own process (`python -m sluice`) on a fixed port, so it can die as a machine does:
    SIGKILL, every connection to it gone."""

    def __init__(self, tmp_path, backend, port: int):
        self.port = port
        cfg = tmp_path / "host-process.toml"
        cfg.write_text(host_toml().format(url=backend.url))
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")},
                    **base_env(tmp_path / "host-process", SLUICE_PORT=port, SLUICE_CONFIG=cfg)}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "HostProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "sluice"], env=self.env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until(self._ok, timeout=30, what="the host process to answer /v1/health ok")
        return self

    def _ok(self) -> bool:
        assert self.proc.poll() is None, "the host process exited during start-up"
        try:
            return call(self.port, "GET", "/v1/health", timeout=1)[2]["status"] == "ok"
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_host_is_skipped_and_taken_back_when_it_returns(make_app, make_backend, tmp_path):
    east_engine, west_engine = make_backend(), make_backend()
    east = HostProcess(tmp_path, east_engine, free_port())
    try:
        east.start()
        west = start_host(make_app, tmp_path, "west", west_engine)
        front = make_app({"SLUICE_LOG_DIR": tmp_path / "front" / "logs"}, toml=front_toml(east.port, west.port))
        east_url = f"http://127.0.0.1:{east.port}/v1"
        status, headers, _ = chat(front, "before")
        assert status == 200 and headers["X-Sluice-Backend"] == "east"      # the first host while both are idle

        east.kill()
        until(lambda: front_backends(front)[east_url] == "down", what="the front to see east down")
        assert call(front, "GET", "/v1/health")[2]["status"] == "degraded"
        for i in range(3):
            status, headers, body = chat(front, f"while-east-is-down-{i}")
            assert status == 200, body
            assert headers["X-Sluice-Backend"] == "west"
        assert west_engine.prompts()[-3:] == [f"while-east-is-down-{i}" for i in range(3)]

        east.start()                                                        # the machine is back, same address
        until(lambda: front_backends(front)[east_url] == "ready", what="the front to take east back")
        status, headers, body = chat(front, "after")
        assert status == 200 and headers["X-Sluice-Backend"] == "east", body
        assert east_engine.prompts()[-1] == "after"
    finally:
        east.kill()


def queue_totals_add_up(app) -> dict:
    t = call(app, "GET", "/v1/queue/status")[2]
    assert t["pending"] == 0 and t["active_count"] == 0
    assert t["total_received"] == t["total_served"] + t["total_errors"] + t["total_rejected"] + \
        t["total_timeouts"] + t["total_cancelled"], t
    return t


def test_ready_is_a_status_code_ok_and_warming_ready_draining_not(make_app, make_backend, tmp_path):
    east, west = make_backend(), make_backend()
    host = make_app(toml=two_engine_host_toml(east.url, west.url))
    status, _, doc = call(host, "GET", "/v1/ready")
    assert (status, doc["status"], doc["ready"]) == (200, "ok", True)

    east.close()                     # one of the model's two backends down: degraded, but it takes new work
    until(lambda: call(host, "GET", "/v1/health")[2]["status"] == "degraded", what="the host to see one engine down")
    status, _, doc = call(host, "GET", "/v1/ready")
    assert (status, doc["status"], doc["ready"]) == (200, "degraded", True)

    assert call(host, "POST", "/admin/drain")[0] == 200
    status, headers, doc = call(host, "GET", "/v1/ready")
    assert (status, doc["ready"]) == (503, False) and headers["Retry-After"] == "5"
    assert "draining" in doc["error"] and "/admin/resume" in doc["error"]
    assert call(host, "GET", "/v1/health")[0] == 200           # the health answer stays 200 in every state
    assert call(host, "POST", "/admin/resume")[0] == 200
    assert call(host, "GET", "/v1/ready")[0] == 200

    west.close()                     # the model's last backend down: its requests would be refused
    until(lambda: call(host, "GET", "/v1/ready")[0] == 503, what="the host to be not ready")
    doc = call(host, "GET", "/v1/ready")[2]
    assert doc["status"] == "degraded" and "model(s) m" in doc["error"]


def test_ready_without_a_key_says_only_whether(make_app, backend):
    host = make_app({"SLUICE_API_KEYS": "sekrit", "SLUICE_FAST_URL": backend.url,
                     "SLUICE_REASONING_URL": backend.url}, wait_ready=False)
    assert call(host, "GET", "/v1/ready")[0] == 200        # from the start: warming (not probed yet) is ready
    until(lambda: call(host, "GET", "/v1/ready")[2] == {"status": "ok", "ready": True}, what="the host to be ok")
    assert call(host, "POST", "/admin/drain", headers={"Authorization": "Bearer sekrit"})[0] == 200
    status, _, doc = call(host, "GET", "/v1/ready")
    assert status == 503 and doc["ready"] is False and set(doc) == {"status", "ready", "error"}


def test_a_draining_host_is_taken_out_by_the_front_and_back_after_resume(make_app, make_backend, tmp_path):
    front, hosts = cluster(make_app, make_backend, tmp_path)
    east, east_engine = hosts["east"]
    east_url = f"http://127.0.0.1:{east.port}/v1"
    assert call(east, "POST", "/admin/drain")[0] == 200
    until(lambda: front_backends(front)[east_url] == "down", what="the front to take the draining host out")
    for i in range(3):
        status, headers, body = chat(front, f"while-east-drains-{i}")
        assert status == 200 and headers["X-Sluice-Backend"] == "west", body
    assert east_engine.arrivals == []
    assert call(east, "POST", "/admin/resume")[0] == 200
    until(lambda: front_backends(front)[east_url] == "ready", what="the front to take the host back")
    t = queue_totals_add_up(front)
    assert (t["total_received"], t["total_served"]) == (3, 3)


def test_the_request_that_meets_a_just_died_host_is_served_by_the_other(make_app, make_backend, tmp_path):
    """The front has not probed since the host died (a long health interval): the forward is refused before
    anything was sent, so the front moves the job to the other host instead of answering 502."""
    east_engine, west_engine = make_backend(), make_backend()
    east = HostProcess(tmp_path, east_engine, free_port())
    try:
        east.start()
        west = start_host(make_app, tmp_path, "west", west_engine)
        front = make_app({"SLUICE_LOG_DIR": tmp_path / "front" / "logs", "SLUICE_HEALTH_INTERVAL_S": 600},
                         toml=front_toml(east.port, west.port))
        east_url = f"http://127.0.0.1:{east.port}/v1"
        status, headers, _ = chat(front, "before")
        assert status == 200 and headers["X-Sluice-Backend"] == "east"

        east.kill()
        status, headers, body = chat(front, "meets-the-dead-host")
        assert status == 200 and headers["X-Sluice-Backend"] == "west", body
        assert west_engine.prompts() == ["meets-the-dead-host"]
        assert front_backends(front)[east_url] == "down"            # marked at the refusal, not at a probe

        east.start()                                                # back; then it dies again, mid-stream this time
        front.health.kick()
        until(lambda: front_backends(front)[east_url] == "ready", what="the front to take east back")
        east.kill()
        status, headers, body = call(front, "POST", "/v1/chat/completions", {
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "streamed"}]})
        assert status == 200 and headers["X-Sluice-Backend"] == "west", body
        assert body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in body
        assert west_engine.prompts()[-1] == "streamed"
        t = queue_totals_add_up(front)
        assert (t["total_received"], t["total_served"], t["total_errors"]) == (3, 3, 0)
    finally:
        east.kill()


def test_a_refused_request_waits_its_turn_when_the_other_host_is_full(make_app, make_backend, tmp_path):
    """East dies while west's one slot is taken: the refused request queues again at the front (nothing is
    answered 502) and west serves it when its slot frees."""
    east_engine, west_engine = make_backend(), make_backend()
    east = HostProcess(tmp_path, east_engine, free_port())
    try:
        east.start()
        west = start_host(make_app, tmp_path, "west", west_engine)
        front = make_app({"SLUICE_LOG_DIR": tmp_path / "front" / "logs", "SLUICE_HEALTH_INTERVAL_S": 600},
                         toml=front_toml(east.port, west.port, slots=4, per_host=1))
        east_engine.holding = west_engine.holding = True
        first = in_thread(chat, front, "first")
        until(lambda: east_engine.prompts() == ["first"], what="the first request held at east")
        second = in_thread(chat, front, "second")
        until(lambda: west_engine.prompts() == ["second"], what="the second request held at west")
        east_engine.release_all()
        first[0].join(10)
        assert first[1][0][0] == 200

        east.kill()
        third = in_thread(chat, front, "third")                  # granted east, the one free slot: refused
        until(lambda: call(front, "GET", "/v1/queue/status")[2]["pending"] == 1, what="the refused request queued")
        assert west_engine.prompts() == ["second"]
        west_engine.release_all()
        for t, out in (second, third):
            t.join(10)
            assert out[0][0] == 200, out
        assert third[1][0][1]["X-Sluice-Backend"] == "west" and west_engine.prompts() == ["second", "third"]
        t = queue_totals_add_up(front)
        assert (t["total_received"], t["total_served"]) == (3, 3)
    finally:
        east.kill()
