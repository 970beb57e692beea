"""Supervisor: real processes (tests/fake_engine.py) started, probed, restarted, slept, woken and stopped.

Time-dependent decisions (backoff, idle unload, probe schedule) are driven by a fake clock where that makes
a test deterministic; real process start/exit is waited for on conditions with deadlines.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fakes import FakeClock
from sluice import errors
from sluice.backend_rules import ALLOWED, State
from sluice.monitor import Supervisor
from sluice.processes import (ENGINES, ProcessSpec, Registry, build_argv, free_port, process_start_time,
                              ram_tier_idle_s, spec_for, total_memory_bytes)
from sluice.supervisor import ManagedBackend

FAKE = str(Path(__file__).with_name("fake_engine.py"))


def make_spec(tmp_path: Path, *flags: str, name: str = "eng", **kw) -> ProcessSpec:
    port = free_port()
    argv = (sys.executable, FAKE, "--port", str(port), "--events", str(tmp_path / f"{name}.events"), *flags)
    opts = dict(start_timeout_s=10.0, stop_timeout_s=2.0, start_retries=0, backoff_s=0.05, probe_interval_s=0.1,
                probe_timeout_s=1.0, log_path=tmp_path / f"{name}.log")
    opts.update(kw)
    return ProcessSpec(name, argv, port, **opts)


def events(spec: ProcessSpec, kind: str | None = None) -> list[dict]:
    path = Path(spec.argv[spec.argv.index("--events") + 1])
    if not path.exists():
        return []
    evs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in evs if kind is None or e["event"] == kind]


def wait_until(pred, timeout: float = 10.0) -> bool:
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        pause.wait(0.02)
    return True


def http_call(port: int, method: str, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}) if method == "POST" else None
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def alive(pid: int) -> bool:
    return process_start_time(pid) is not None


@pytest.fixture
def managed():
    made: list[ManagedBackend] = []

    def make(spec: ProcessSpec, **kw) -> ManagedBackend:
        b = ManagedBackend(spec, **kw)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


@pytest.fixture
def supervisors():
    made: list[Supervisor] = []

    def make(*a, **kw) -> Supervisor:
        s = Supervisor(*a, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


# ---- lifecycle ------------------------------------------------------------------------------------------
def test_lazy_start_serves_registers_and_stops(tmp_path, supervisors):
    spec = make_spec(tmp_path)
    changes = []
    sup = supervisors([spec], tmp_path / "run", on_change=lambda n, a, b: changes.append((n, a, b))).start()
    b = sup.get("eng")
    assert b.state is State.STOPPED and events(spec) == []          # lazy: nothing runs until asked
    b.ensure_ready(10)
    assert b.state is State.READY and http_call(spec.port, "POST", "/v1/chat/completions") == 200
    pid = b.pid
    [reg] = (tmp_path / "run").glob("processes-*.json")
    [child] = json.loads(reg.read_text())["children"]
    assert (child["pid"], child["pgid"], child["argv"]) == (pid, pid, list(spec.argv))
    assert child["start_time"] == process_start_time(pid)
    assert sup.snapshot()[0]["state"] == "ready" and sup.snapshot()[0]["pid"] == pid

    t0 = time.monotonic()
    sup.stop()
    assert time.monotonic() - t0 < 2.0
    assert b.state is State.STOPPED and b.info()["last_exit"] == -signal.SIGTERM and not alive(pid)
    assert not reg.exists()
    assert [(a, c) for _, a, c in changes] == [(State.STOPPED, State.STARTING), (State.STARTING, State.READY),
                                               (State.READY, State.STOPPING), (State.STOPPING, State.STOPPED)]
    with pytest.raises(errors.Unavailable):
        b.ensure_ready(1)                                           # closed: no start after shutdown


def test_eager_start_needs_no_request(tmp_path, supervisors):
    spec = make_spec(tmp_path, start="eager")
    sup = supervisors([spec], tmp_path / "run").start()
    assert sup.get("eng").wait_for(State.READY, 10)


def test_concurrent_callers_share_one_spawn(tmp_path, managed):
    spec = make_spec(tmp_path, "--start-delay", "0.3")
    b = managed(spec)
    barrier = threading.Barrier(8)
    results = []

    def caller():
        barrier.wait()
        try:
            b.ensure_ready(10)
            results.append(b.pid)
        except errors.SluiceError as e:       # pragma: no cover - reported by the assert below
            results.append(e)
    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(results) == 8 and len(set(results)) == 1 and isinstance(results[0], int)
    assert len(events(spec, "start")) == 1 and b.spawns == 1


def test_start_timeout_kills_fails_and_answers_503_fast(tmp_path, managed):
    spec = make_spec(tmp_path, "--start-delay", "30", start_timeout_s=0.5, start_retries=3)
    b = managed(spec)
    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable) as exc:
        b.ensure_ready(20)
    assert time.monotonic() - t0 < 5
    assert exc.value.status == 503 and "start_timeout_s" in exc.value.message
    assert b.state is State.FAILED and "start_timeout_s=0.5" in b.last_error
    [start] = events(spec, "start")                                  # a timeout is not retried
    assert not alive(start["pid"])
    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable) as exc:
        b.ensure_ready(20)
    assert time.monotonic() - t0 < 0.2 and exc.value.status == 503
    b.stop()                                                         # stop resets FAILED
    assert b.state is State.STOPPED


def test_exit_during_start_is_seen_at_once(tmp_path, managed):
    spec = make_spec(tmp_path, "--exit-during-start", start_timeout_s=60)
    b = managed(spec)
    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable):
        b.ensure_ready(60)
    assert time.monotonic() - t0 < 5                                 # not after the 60 s start timeout
    assert b.state is State.FAILED and "exited with code 3 during start" in b.last_error


def test_early_exits_retry_with_backoff_then_fail(tmp_path, managed):
    spec = make_spec(tmp_path, "--exit-during-start", start_retries=2, backoff_s=0.05)
    b = managed(spec)
    with pytest.raises(errors.Unavailable) as exc:
        b.ensure_ready(20)
    assert len(events(spec, "start")) == 3 and b.restarts == 2
    assert "gave up after 3 failed attempt(s)" in b.last_error and "exited with code 3" in exc.value.message


def test_sigterm_ignored_gets_sigkill_after_stop_timeout(tmp_path, managed):
    spec = make_spec(tmp_path, "--ignore-sigterm", stop_timeout_s=0.5)
    b = managed(spec)
    b.ensure_ready(10)
    pid = b.pid
    t0 = time.monotonic()
    b.stop()
    elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 4
    assert b.info()["last_exit"] == -signal.SIGKILL and not alive(pid) and b.state is State.STOPPED


def test_stop_preempts_a_start_and_waiters_get_503(tmp_path, managed):
    spec = make_spec(tmp_path, "--start-delay", "30", start_timeout_s=60)
    b = managed(spec)
    failures = []

    def waiter():
        try:
            b.ensure_ready(30)
        except errors.Unavailable as e:
            failures.append(e)
    t = threading.Thread(target=waiter)
    t.start()
    assert wait_until(lambda: events(spec, "start"))
    t0 = time.monotonic()
    b.stop()
    t.join(5)
    assert time.monotonic() - t0 < 3 and b.state is State.STOPPED and len(failures) == 1
    assert not alive(events(spec, "start")[0]["pid"])


class HeldRegistry(Registry):
    """The real registry, whose record() first waits for `go`: holds a spawn between Popen and adoption."""

    def __init__(self, state_dir: Path):
        super().__init__(state_dir)
        self.recording, self.go, self.pids = threading.Event(), threading.Event(), []

    def record(self, name, proc, argv, stop_timeout_s) -> None:
        self.pids.append(proc.pid)
        self.recording.set()
        self.go.wait(20)
        super().record(name, proc, argv, stop_timeout_s)


def test_spawn_io_runs_outside_the_lock_and_a_stop_meanwhile_kills_the_new_process(tmp_path, managed):
    spec = make_spec(tmp_path)
    registry = HeldRegistry(tmp_path / "run")
    b = managed(spec, registry=registry)
    b.start()
    assert registry.recording.wait(10)
    assert b.info()["state"] == "starting"          # info() takes the lock: the spawn does not hold it
    [pid] = registry.pids
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    assert wait_until(lambda: b.state is State.STOPPING)
    stopper.join(0.2)
    assert stopper.is_alive()                       # stop() waits for the preempted spawn to kill its process
    registry.go.set()
    stopper.join(20)
    assert not stopper.is_alive() and b.state is State.STOPPED and not alive(pid) and b.pid is None
    assert json.loads(registry.path.read_text())["children"] == []


# ---- crashes, wedges, backoff --------------------------------------------------------------------------
def test_crash_restarts_after_backoff(tmp_path, managed):
    clock = FakeClock()
    spec = make_spec(tmp_path, start_retries=2, backoff_s=5.0)
    b = managed(spec, clock=clock)
    b.ensure_ready(10)
    pid1 = b.pid
    os.kill(pid1, signal.SIGKILL)
    # Ticks until one sees the exit: /proc shows a killed multi-threaded child as a zombie before it can be reaped.
    assert wait_until(lambda: (b.check(), b.state)[1] is not State.READY)
    assert b.state is State.STARTING and "killed by SIGKILL" in b.last_error
    threading.Event().wait(0.3)
    assert len(events(spec, "start")) == 1                          # still backing off (5 s of fake time)
    clock.advance(5.0)
    assert b.wait_for(State.READY, 10)
    assert b.pid != pid1 and b.restarts == 1 and len(events(spec, "start")) == 2
    b.ensure_ready(1)
    assert http_call(spec.port, "POST", "/v1/chat/completions") == 200


def test_restarts_exhausted_fail_with_reason(tmp_path, managed):
    flag = tmp_path / "fail-start"
    spec = make_spec(tmp_path, "--fail-start-file", str(flag), start_retries=2, backoff_s=0.05)
    b = managed(spec)
    b.ensure_ready(10)
    flag.touch()                                                     # every restart now dies during start
    os.kill(b.pid, signal.SIGKILL)
    assert wait_until(lambda: (b.check(), b.state)[1] is not State.READY)
    assert b.wait_for(State.FAILED, 10)
    assert len(events(spec, "start")) == 3 and b.restarts == 2
    assert "gave up" in b.last_error and "exited with code 3" in b.last_error
    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable) as exc:
        b.ensure_ready(10)
    assert time.monotonic() - t0 < 0.2 and "gave up" in exc.value.message
    flag.unlink()
    b.start()                                                        # admin `load`: clears FAILED, tries again
    assert b.wait_for(State.READY, 10) and b.last_error is not None


def test_unhealthy_after_consecutive_failed_probes_restarts(tmp_path, managed):
    clock = FakeClock()
    spec = make_spec(tmp_path, "--wedge-after", "1", unhealthy_after=3, probe_interval_s=2.0, start_retries=1,
                     backoff_s=1.0)
    b = managed(spec, clock=clock)
    b.ensure_ready(10)
    pid1 = b.pid
    assert http_call(spec.port, "POST", "/v1/chat/completions") == 200   # the generation thread "dies"
    for _ in range(2):
        clock.advance(2.0)
        b.check()
        assert b.state is State.READY                                # 1 and 2 failures: not yet
    clock.advance(2.0)
    b.check()
    assert b.state is State.STARTING and "unhealthy" in b.last_error and "HTTP 503" in b.last_error
    clock.advance(1.0)                                               # the backoff
    assert b.wait_for(State.READY, 10)
    assert b.pid != pid1 and not alive(pid1) and b.restarts == 1


def test_wedge_detected_and_restarted_by_the_monitor(tmp_path, supervisors):
    wedge = tmp_path / "wedge"
    spec = make_spec(tmp_path, "--wedge-file", str(wedge), unhealthy_after=2, probe_interval_s=0.1,
                     start_retries=1)
    sup = supervisors([spec], tmp_path / "run").start()
    b = sup.get("eng")
    b.ensure_ready(10)
    pid1 = b.pid
    wedge.touch()
    assert wait_until(lambda: b.pid not in (None, pid1) and b.state is State.READY, 10)
    assert events(spec, "wedged") and b.restarts == 1 and not alive(pid1)
    assert http_call(spec.port, "GET", "/health") == 200


# ---- idle unload ---------------------------------------------------------------------------------------
def test_idle_unload_after_idle_and_never_while_busy(tmp_path, managed):
    clock = FakeClock()
    spec = make_spec(tmp_path, idle_unload_s=1.0, probe_interval_s=100.0)
    b = managed(spec, clock=clock)
    with b.use(10):                                                  # READY and counted busy, atomically
        assert b.info()["inflight"] == 1
        clock.advance(60.0)
        b.check()
        assert b.state is State.READY                                # busy: never unloaded
    clock.advance(0.5)
    b.check()
    assert b.state is State.READY                                    # idle only 0.5 s
    clock.advance(0.6)
    b.check()
    assert b.wait_for(State.STOPPED, 5)
    assert not alive(events(spec, "start")[0]["pid"])
    b.ensure_ready(10)                                               # the next request loads it again
    assert b.spawns == 2


def test_idle_unload_respects_is_busy_callback(tmp_path, managed):
    clock = FakeClock()
    busy = [True]
    b = managed(make_spec(tmp_path, idle_unload_s=1.0, probe_interval_s=100.0), clock=clock,
                is_busy=lambda: busy[0])
    b.ensure_ready(10)
    clock.advance(5.0)
    b.check()
    assert b.state is State.READY
    busy[0] = False
    b.check()
    assert b.wait_for(State.STOPPED, 5)


def test_idle_unload_in_real_time_by_the_monitor(tmp_path, supervisors):
    spec = make_spec(tmp_path, idle_unload_s=1.0)
    sup = supervisors([spec], tmp_path / "run").start()
    b = sup.get("eng")
    b.ensure_ready(10)
    t0 = time.monotonic()
    assert b.wait_for(State.STOPPED, 5)
    assert time.monotonic() - t0 >= 0.9


# ---- sleep / wake --------------------------------------------------------------------------------------
def control_events(spec):
    return [(e["event"], e.get("level") or e.get("method")) for e in events(spec)
            if e["event"] in ("sleep", "wake_up", "collective_rpc", "reset_prefix_cache")]


@pytest.mark.parametrize("level", [1, 2])
def test_vllm_sleep_and_wake(tmp_path, managed, level):
    spec = make_spec(tmp_path, sleep_method=f"vllm-sleep-{level}")
    b = managed(spec)
    b.ensure_ready(10)
    pid = b.pid
    assert b.sleep() is State.SLEEPING
    assert http_call(spec.port, "POST", "/v1/chat/completions") == 503       # the engine refuses while asleep
    b.ensure_ready(10)                                                       # wakes, does not respawn
    assert b.state is State.READY and b.pid == pid and b.spawns == 1
    assert http_call(spec.port, "POST", "/v1/chat/completions") == 200
    expected = [("sleep", level), ("wake_up", None)]
    if level == 2:
        expected += [("collective_rpc", "reload_weights"), ("reset_prefix_cache", None)]
    assert control_events(spec) == expected


def test_idle_unload_sleeps_a_vllm_backend(tmp_path, managed):
    clock = FakeClock()
    spec = make_spec(tmp_path, sleep_method="vllm-sleep-1", idle_unload_s=1.0, probe_interval_s=100.0)
    b = managed(spec, clock=clock)
    b.ensure_ready(10)
    clock.advance(2.0)
    b.check()
    assert b.wait_for(State.SLEEPING, 5) and b.pid is not None
    assert control_events(spec) == [("sleep", 1)]


def test_failed_sleep_escalates_to_stop(tmp_path, managed):
    spec = make_spec(tmp_path, "--fail-sleep", sleep_method="vllm-sleep-1")
    b = managed(spec)
    b.ensure_ready(10)
    pid = b.pid
    assert b.sleep() is State.STOPPED
    assert "sleep failed" in b.last_error and "HTTP 500" in b.last_error and not alive(pid)
    assert control_events(spec) == [("sleep", 1)]


def test_sleep_by_stop_for_engines_without_sleep(tmp_path, managed):
    spec = make_spec(tmp_path, sleep_method="stop")
    b = managed(spec)
    b.ensure_ready(10)
    assert b.sleep() is State.STOPPED
    b.ensure_ready(10)
    assert b.state is State.READY and b.spawns == 2


# ---- orphans -------------------------------------------------------------------------------------------
def test_orphans_of_a_crashed_sluice_are_stopped_and_recycled_pids_left_alone(tmp_path, supervisors):
    state_dir = tmp_path / "run"
    state_dir.mkdir()
    spec = make_spec(tmp_path, name="orphan")
    orphan = subprocess.Popen(spec.argv, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    decoy_argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    decoy = subprocess.Popen(decoy_argv, start_new_session=True)
    try:
        assert wait_until(lambda: events(spec, "listening"))
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()

        def entry(name, pid, argv, start_time):
            return {"name": name, "pid": pid, "pgid": pid, "argv": list(argv), "start_time": start_time,
                    "stop_timeout_s": 2.0, "started_at": time.time()}
        (state_dir / f"processes-{dead.pid}-dead.json").write_text(json.dumps({
            "version": 1, "owner": {"pid": dead.pid, "start_time": "long gone", "argv": ["sluice"]},
            "children": [
                entry("orphan", orphan.pid, spec.argv, process_start_time(orphan.pid)),
                # the pid now runs another command / the same command started at another time:
                entry("other-argv", decoy.pid, spec.argv, process_start_time(decoy.pid)),
                entry("other-start", decoy.pid, decoy_argv, "0:12345"),
            ]}))
        live_owner = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "argv": []}
        (state_dir / "processes-live.json").write_text(json.dumps({   # a sluice that is still running
            "version": 1, "owner": live_owner,
            "children": [entry("theirs", decoy.pid, decoy_argv, process_start_time(decoy.pid))]}))

        sup = supervisors([], state_dir).start()
        assert orphan.wait(timeout=5) == -signal.SIGTERM
        assert [o["name"] for o in sup.orphans_stopped] == ["orphan"]
        assert decoy.poll() is None
        assert not (state_dir / f"processes-{dead.pid}-dead.json").exists()
        assert (state_dir / "processes-live.json").exists()
    finally:
        for p in (orphan, decoy):
            if p.poll() is None:
                p.kill()
            p.wait()


# ---- argv, engines, tiers, spec --------------------------------------------------------------------------
def test_build_argv_fills_each_argument_after_splitting():
    model = "/models/my model; rm -rf ~ $(id) {port}"
    argv = build_argv(None, "vllm", model, 8001)
    assert argv[:3] == ("vllm", "serve", model)                       # one argument, verbatim, not re-filled
    assert argv[3:] == ("--host", "127.0.0.1", "--port", "8001", "--enable-sleep-mode")
    assert build_argv(None, "llama.cpp", "a b.gguf", 9)[1:3] == ("-m", "a b.gguf")
    assert build_argv('srv --name="x {model}" --p={port}', None, "q w", 7) == ("srv", "--name=x q w", "--p=7")
    assert build_argv(["srv", "--m", "{model}"], None, "it's", 7) == ("srv", "--m", "it's")
    assert build_argv("srv --model={model}", None, "-dash", 7) == ("srv", "--model=-dash")   # cannot be an option
    for bad in ("-rf", "--help"):
        with pytest.raises(ValueError, match="option"):
            build_argv(None, "mlx-lm", bad, 7)
    assert build_argv(None, "mlx-lm", "./-rf", 7)[2] == "./-rf"
    with pytest.raises(ValueError):
        build_argv(None, None, "m", 7)
    with pytest.raises(ValueError):
        build_argv(None, "ollama", "m", 7)


def test_engine_presets_and_spec_for(tmp_path):
    assert set(ENGINES) == {"mlx-lm", "llama.cpp", "vllm"}
    s = spec_for("big", model="Qwen/Qwen3-8B", engine="vllm", port=8100, log_dir=tmp_path)
    assert s.env["VLLM_SERVER_DEV_MODE"] == "1" and s.sleep_method == "vllm-sleep-1"
    assert s.argv[:3] == ("vllm", "serve", "Qwen/Qwen3-8B") and s.log_path == tmp_path / "big.log"
    m = spec_for("small", model="mlx-community/x", engine="mlx-lm", idle_unload_s=300)
    assert m.sleep_method == "stop" and m.health_path == "/health" and 0 < m.port < 65536
    assert m.idle_unload_s == 300
    with pytest.raises(ValueError, match="sleep"):
        ProcessSpec("x", ("a",), 1, sleep_method="hibernate")
    assert State.READY not in ALLOWED[State.STOPPED] and State.STARTING in ALLOWED[State.SLEEPING]


def test_ram_tiers():
    gib = 1 << 30
    assert ram_tier_idle_s(128 * gib) == 600 and ram_tier_idle_s(64 * gib) == 600
    assert ram_tier_idle_s(62 * gib) == 600                          # a 64 GB machine after the kernel's share
    assert ram_tier_idle_s(63 * 10**9) == 300 and ram_tier_idle_s(64 * 10**9) == 600
    assert ram_tier_idle_s(32 * gib) == 300 and ram_tier_idle_s(24 * 10**9) == 300
    assert ram_tier_idle_s(int(23.9 * 10**9)) == 180
    assert ram_tier_idle_s(16 * gib) == 180 and ram_tier_idle_s(8 * gib) == 180
    assert ram_tier_idle_s(None) in (180, 300, 600)
    total = total_memory_bytes()
    assert total is None or total > 0
