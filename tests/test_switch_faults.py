"""Faults during a model switch: a backend process killed while an exclusive gate wakes, starts or sleeps it.

Real sluice in front of real processes (tests/fake_engine.py) on one exclusive gate with two models, `qwen`
on backend A and `llama` on backend B. The engine blocks in the phase under test (its start, a POST /sleep
or a POST /wake_up) and logs a "held" event first, so the test kills it exactly there: no timing guesses.
Each scenario checks the jobs waiting on the switch get one clean answer within a bound (served, or a 503
with a JSON body saying what to do), the counters add up, and the next request succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import call
from sluice.processes import free_port, process_start_time
from test_api_native import totals_add_up, until
from test_gates import exclusive_toml

ENGINE = Path(__file__).with_name("fake_engine.py")
ANSWER_WITHIN_S = 15.0      # after the kill: a waiting job is answered by then, or it hung


def events(path: Path, kind: str | None = None) -> list[dict]:
    evs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in evs if kind is None or e["event"] == kind]


def held(path: Path, phase: str) -> dict:
    """Wait until the engine logging to `path` blocks in `phase`; its "held" event (with its pid)."""
    until(lambda: any(e["phase"] == phase for e in events(path, "held")), timeout=15, what=f"engine held in {phase}")
    return [e for e in events(path, "held") if e["phase"] == phase][-1]


def chat(app, model: str, text: str = "hi", timeout: float = 30):
    return call(app, "POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}]},
                timeout=timeout)


class Waiters:
    """`n` requests for `model` sent at once from threads; each answer kept with the time it came."""

    def __init__(self, app, model: str, n: int):
        self.results: list[tuple[float, tuple]] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._one, args=(app, model, f"w{i}")) for i in range(n)]
        for t in self.threads:
            t.start()

    def _one(self, app, model, text):
        r = chat(app, model, text, timeout=60)
        with self._lock:
            self.results.append((time.monotonic(), r))

    def join(self, timeout: float) -> list[tuple]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a request waiting on the switch hung"
        return [r for _, r in self.results]

    def answered_by(self) -> float:
        return max(t for t, _ in self.results)


def engine_cmd(events_path: Path, *flags: str) -> list[str]:
    return [sys.executable, str(ENGINE), "--port", "{port}", "--model", "{model}", "--events", str(events_path),
            *flags]


def managed_toml(tmp_path: Path, *, a_flags=(), b_flags=(), engine: str | None = None, a_opts=None,
                 **b_opts) -> str:
    """Two managed engines on one exclusive gate. `engine = "vllm"` gives them vLLM's sleep method (POST
    /sleep, /wake_up) with our stand-in's command; without it they are `stop` engines (killed to switch)."""
    def backend(name, flags, opts):
        opts = {"idle_unload_s": 0, "start_timeout_s": 20, "stop_timeout_s": 5, **opts}
        lines = [f'name = "{name}"', 'gate = "gpu0"', f'model_path = "{name.lower()}-model"',
                 f"command = {json.dumps(engine_cmd(tmp_path / f'{name}.events', *flags))}"]
        if engine:
            lines.append(f'engine = "{engine}"')
        lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
        return "[[backends]]\n" + "\n".join(lines) + "\n"
    return ('[[gates]]\nname = "gpu0"\nmode = "exclusive"\npolicy = "fifo"\nslots = 2\n\n'
            + backend("A", a_flags, a_opts or {}) + "\n" + backend("B", b_flags, b_opts)
            + '\n[[models]]\nname = "qwen"\nbackends = ["A"]\n\n[[models]]\nname = "llama"\nbackends = ["B"]\n')


def status(app) -> dict:
    return call(app, "GET", "/admin/status")[2]


def backend_info(app, name: str) -> dict:
    return next(b for b in status(app)["backends"] if b["name"] == name)


def gate(app) -> dict:
    return status(app)["gates"][0]


def settled(app) -> dict:
    """Nothing queued or in flight, and the counters add up."""
    until(lambda: app.scheduler.snapshot()["active"] == 0, what="no job in flight")
    s = totals_add_up(app)
    assert s["pending"] == 0 and s["active_count"] == 0
    return s


def kill(pid: int) -> float:
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def assert_clean_503(status_code, headers, body, *words: str) -> None:
    assert status_code == 503, body
    assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "code"}, body
    assert headers["Retry-After"] and headers["X-Request-Id"]
    for w in words:
        assert w in body["error"]["message"], body


# ---- (a) the managed backend the gate switches to is killed while it starts ----------------------------------
def test_killed_while_starting_with_no_retries_fails_its_waiting_jobs_fast_then_the_gate_serves_again(
        make_app, tmp_path):
    """start_retries = 0: the kill ends the start (FAILED), the switch fails, both waiting llama jobs get a
    503 that says why and how to load it again, the gate is left idle (not stuck switching), and
    the next qwen job switches back and is served."""
    hold = tmp_path / "hold-B"
    app = make_app(toml=managed_toml(tmp_path, b_flags=("--hold-start-file", str(hold)), start_retries=0))
    assert chat(app, "qwen")[0] == 200
    hold.touch()
    waiters = Waiters(app, "llama", 2)
    pid = held(tmp_path / "B.events", "start")["pid"]
    until(lambda: app.scheduler.snapshot()["pending"] == 2, what="both llama jobs queued")
    assert gate(app)["state"] == "switching" and backend_info(app, "A")["state"] == "stopped"
    killed_at = kill(pid)
    for r in waiters.join(ANSWER_WITHIN_S):
        assert_clean_503(*r, "SIGKILL", "/admin/models/llama/load")   # why, and what to do next
    assert waiters.answered_by() - killed_at < ANSWER_WITHIN_S
    g = gate(app)
    assert g["resident"] is None and g["state"] != "switching" and g["switch_failures"] == 1
    assert backend_info(app, "B")["state"] == "failed"
    s = settled(app)
    assert s["total_errors"] == 2
    status_code, _, body = chat(app, "qwen")           # the next job succeeds
    assert status_code == 200, body
    assert gate(app)["resident"] == "qwen"
    # B stays FAILED (sticky, as configured): its next job is refused at once with the reason, never hangs,
    # and without a switch: the working model stays up (no stop of A for a wake that cannot succeed)
    switches, a_pid = gate(app)["switches"], backend_info(app, "A")["pid"]
    t0 = time.monotonic()
    assert_clean_503(*chat(app, "llama"), "SIGKILL", "/admin/models/llama/load")
    assert time.monotonic() - t0 < 5
    assert gate(app)["switches"] == switches and gate(app)["resident"] == "qwen"
    assert chat(app, "qwen")[0] == 200 and backend_info(app, "A")["pid"] == a_pid
    settled(app)


def test_killed_while_starting_is_restarted_and_its_waiting_jobs_are_served(make_app, tmp_path):
    """start_retries = 1: the supervisor restarts the killed engine (after its backoff) inside the same
    switch, so the jobs that waited for it are served by the new process; no job sees an error."""
    hold = tmp_path / "hold-B"
    app = make_app(toml=managed_toml(tmp_path, b_flags=("--hold-start-file", str(hold)), start_retries=1))
    assert chat(app, "qwen")[0] == 200
    hold.touch()
    waiters = Waiters(app, "llama", 2)
    pid = held(tmp_path / "B.events", "start")["pid"]
    until(lambda: app.scheduler.snapshot()["pending"] == 2, what="both llama jobs queued")
    killed_at = kill(pid)
    for status_code, headers, body in waiters.join(ANSWER_WITHIN_S):
        assert status_code == 200, body
        assert headers["X-Sluice-Backend"] == "B"
    assert waiters.answered_by() - killed_at < ANSWER_WITHIN_S
    info = backend_info(app, "B")
    assert info["state"] == "ready" and info["pid"] not in (None, pid) and info["restarts"] == 1
    assert [e["pid"] for e in events(tmp_path / "B.events", "chat")] == [info["pid"]] * 2
    g = gate(app)
    assert g["resident"] == "llama" and g["switch_failures"] == 0 and g["last_switch"]["result"] == "ok"
    assert chat(app, "qwen")[0] == 200 and chat(app, "llama")[0] == 200
    assert settled(app)["total_served"] == 5


def test_vllm_engine_killed_mid_wake_up_is_restarted_and_serves(make_app, tmp_path):
    """A managed vLLM-style engine asleep on the gate is killed inside POST /wake_up: the failed wake
    restarts the process (a fresh one needs no wake), and the llama jobs waiting on the switch are served."""
    hold = tmp_path / "hold-B"
    app = make_app(toml=managed_toml(tmp_path, b_flags=("--hold-wake-file", str(hold)), engine="vllm"))
    assert chat(app, "llama")[0] == 200
    assert chat(app, "qwen")[0] == 200                  # B is put to sleep, not stopped
    assert backend_info(app, "B")["state"] == "sleeping"
    old_pid = events(tmp_path / "B.events", "listening")[-1]["pid"]
    hold.touch()
    waiters = Waiters(app, "llama", 2)
    pid = held(tmp_path / "B.events", "wake_up")["pid"]
    assert pid == old_pid
    until(lambda: app.scheduler.snapshot()["pending"] == 2, what="both llama jobs queued")
    killed_at = kill(pid)
    for status_code, _, body in waiters.join(ANSWER_WITHIN_S):
        assert status_code == 200, body
    assert waiters.answered_by() - killed_at < ANSWER_WITHIN_S
    info = backend_info(app, "B")
    assert info["state"] == "ready" and info["pid"] not in (None, pid) and "wake failed" in info["last_error"]
    assert backend_info(app, "A")["state"] == "sleeping"
    assert chat(app, "qwen")[0] == 200
    assert settled(app)["total_served"] == 5


# ---- (b) the old backend is killed while the gate puts it to sleep ------------------------------------------
def test_old_engine_killed_mid_sleep_escalates_to_stop_and_the_switch_proceeds(make_app, tmp_path):
    """A (vLLM-style, managed) dies inside POST /sleep: its sleep fails, the supervisor stops it instead
    (reaping the dead process), B wakes and the llama jobs are served; switching back starts A afresh."""
    hold = tmp_path / "hold-A"
    app = make_app(toml=managed_toml(tmp_path, a_flags=("--hold-sleep-file", str(hold)), engine="vllm"))
    assert chat(app, "qwen")[0] == 200
    hold.touch()
    waiters = Waiters(app, "llama", 2)
    pid = held(tmp_path / "A.events", "sleep")["pid"]
    until(lambda: app.scheduler.snapshot()["pending"] == 2, what="both llama jobs queued")
    assert events(tmp_path / "B.events") == []          # B is not started before A is down
    killed_at = kill(pid)
    for status_code, headers, body in waiters.join(ANSWER_WITHIN_S):
        assert status_code == 200, body
        assert headers["X-Sluice-Backend"] == "B"
    assert waiters.answered_by() - killed_at < ANSWER_WITHIN_S
    a = backend_info(app, "A")
    assert a["state"] == "stopped" and a["pid"] is None and "sleep failed" in a["last_error"]
    g = gate(app)
    assert g["resident"] == "llama" and g["last_switch"]["result"] == "ok"
    assert chat(app, "qwen")[0] == 200                  # A starts again: a new process
    assert len(events(tmp_path / "A.events", "listening")) == 2
    assert backend_info(app, "B")["state"] == "sleeping"
    assert settled(app)["total_served"] == 4


def test_old_engine_killed_while_draining_fails_its_own_job_and_the_switch_proceeds(make_app, tmp_path):
    """A dies with a qwen job in flight while the gate drains it for waiting llama jobs: the qwen job gets a
    clean 502, the drain ends, A is taken down (whether or not its supervisor began restarting it) and the
    llama jobs are served by B."""
    hold = tmp_path / "hold-A"
    app = make_app(toml=managed_toml(tmp_path, a_flags=("--hold-chat-file", str(hold)), engine="vllm"))
    assert chat(app, "qwen")[0] == 200
    hold.touch()
    inflight = Waiters(app, "qwen", 1)
    pid = held(tmp_path / "A.events", "chat")["pid"]
    waiters = Waiters(app, "llama", 2)
    until(lambda: gate(app)["state"] == "draining" and app.scheduler.snapshot()["pending"] == 2,
          what="gate draining with both llama jobs queued")
    killed_at = kill(pid)
    (status_code, headers, body), = inflight.join(ANSWER_WITHIN_S)
    assert status_code == 502 and isinstance(body, dict) and body["error"]["message"], body
    for status_code, headers, body in waiters.join(ANSWER_WITHIN_S):
        assert status_code == 200 and headers["X-Sluice-Backend"] == "B", body
    assert waiters.answered_by() - killed_at < ANSWER_WITHIN_S
    assert backend_info(app, "A")["state"] in ("stopped", "sleeping") and gate(app)["resident"] == "llama"
    assert chat(app, "qwen")[0] == 200
    s = settled(app)
    assert s["total_served"] == 4 and s["total_errors"] == 1


def alive(pid: int) -> bool:
    return process_start_time(pid) is not None


def test_old_engine_restarting_after_a_crash_is_stopped_before_the_new_one_starts(make_app, tmp_path):
    """A crashed and the supervisor is restarting it (a slow load that ignores SIGTERM) when the gate must
    switch to B. Sleeping A cannot happen until that restart settles; when the wait runs out the switch must
    still take A down (stop preempts the restart) before it starts B: two models never load at once."""
    hold = tmp_path / "hold-A"
    app = make_app(toml=managed_toml(tmp_path, a_flags=("--hold-start-file", str(hold), "--ignore-sigterm"),
                                     a_opts={"start_timeout_s": 2, "stop_timeout_s": 2}))
    assert chat(app, "qwen")[0] == 200
    first = events(tmp_path / "A.events", "listening")[0]["pid"]
    hold.touch()
    kill(first)                                         # the crash: the supervisor restarts A
    pid = held(tmp_path / "A.events", "start")["pid"]
    assert pid != first and backend_info(app, "A")["state"] == "starting"
    waiters = Waiters(app, "llama", 1)
    until(lambda: events(tmp_path / "B.events", "start"), timeout=20, what="B started")
    assert not alive(pid), "B was started while A's restart was still loading"
    for status_code, _, body in waiters.join(ANSWER_WITHIN_S):
        assert status_code == 200, body
    assert chat(app, "qwen")[0] == 200
    settled(app)


# ---- unmanaged vLLM-style servers: processes sluice does not run -------------------------------------------
@pytest.fixture
def engines(tmp_path):
    """start(name, *flags) -> (url, events path): a fake_engine process sluice only talks to over HTTP."""
    procs: list[subprocess.Popen] = []

    def start(name: str, *flags: str) -> tuple[str, Path]:
        port, ev = free_port(), tmp_path / f"{name}.events"
        procs.append(subprocess.Popen([sys.executable, str(ENGINE), "--port", str(port), "--model", name.lower(),
                                       "--events", str(ev), *flags], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        until(lambda: events(ev, "listening"), timeout=15, what=f"{name} listening")
        return f"http://127.0.0.1:{port}/v1", ev
    yield start
    for p in procs:
        p.kill()
        p.wait(5)


def test_unmanaged_server_killed_mid_wake_up_answers_503_and_the_next_model_runs(make_app, engines, tmp_path):
    """B (a server sluice does not run) dies inside POST /wake_up: its waiting jobs get a 503 at once, the
    gate is left idle, and qwen's next job goes through a switch whose failed sleep of the dead B does not
    stop it from waking A."""
    hold = tmp_path / "hold-B"
    a_url, _ = engines("A")
    b_url, b_ev = engines("B", "--hold-wake-file", str(hold))
    app = make_app(toml=exclusive_toml(a_url, b_url))
    assert chat(app, "llama")[0] == 200
    assert chat(app, "qwen")[0] == 200                  # B asleep now
    hold.touch()
    waiters = Waiters(app, "llama", 2)
    pid = held(b_ev, "wake_up")["pid"]
    until(lambda: app.scheduler.snapshot()["pending"] == 2, what="both llama jobs queued")
    killed_at = kill(pid)
    for r in waiters.join(ANSWER_WITHIN_S):
        assert_clean_503(*r, "could not be loaded", "wake_up")
    assert waiters.answered_by() - killed_at < ANSWER_WITHIN_S
    assert gate(app)["resident"] is None and gate(app)["switch_failures"] == 1
    settled(app)
    status_code, headers, body = chat(app, "qwen")
    assert status_code == 200 and headers["X-Sluice-Backend"] == "A", body
    assert gate(app)["resident"] == "qwen"
    assert settled(app)["total_errors"] == 2


def test_unmanaged_server_killed_mid_sleep_still_lets_the_switch_proceed(make_app, engines, tmp_path):
    """A dies inside POST /sleep: sleep fails, stop is impossible (sluice does not run it) and is logged, and
    B still wakes and serves; the dead A then answers its next job with a clean 503, not a hang."""
    hold = tmp_path / "hold-A"
    a_url, a_ev = engines("A", "--hold-sleep-file", str(hold))
    b_url, _ = engines("B")
    app = make_app(toml=exclusive_toml(a_url, b_url))
    assert chat(app, "qwen")[0] == 200
    hold.touch()
    waiters = Waiters(app, "llama", 2)
    pid = held(a_ev, "sleep")["pid"]
    until(lambda: app.scheduler.snapshot()["pending"] == 2, what="both llama jobs queued")
    killed_at = kill(pid)
    for status_code, headers, body in waiters.join(ANSWER_WITHIN_S):
        assert status_code == 200 and headers["X-Sluice-Backend"] == "B", body
    assert waiters.answered_by() - killed_at < ANSWER_WITHIN_S
    assert gate(app)["resident"] == "llama" and gate(app)["last_switch"]["result"] == "ok"
    t0 = time.monotonic()
    assert_clean_503(*chat(app, "qwen"), "could not be loaded")
    assert time.monotonic() - t0 < ANSWER_WITHIN_S
    assert chat(app, "llama")[0] == 200
    assert settled(app)["total_served"] == 4
