"""The rules of a managed backend's lifecycle, apart from the state machine that applies them
(sluice/supervisor.py `ManagedBackend`): the states, the table of allowed transitions, the decisions its
monitor tick and its owners make (pure functions over values: times, counts, the spec), and the readiness
checks an owner runs outside the lock. Nothing here holds or writes a backend's state.
"""

from __future__ import annotations

import enum
import http.client
import socket
import subprocess
from typing import Callable

from sluice.processes import ProcessSpec, describe_exit, health_status


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"
    STOPPING = "stopping"
    FAILED = "failed"


ALLOWED: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.STOPPING, State.FAILED}),
    State.READY: frozenset({State.STARTING, State.SLEEPING, State.STOPPING, State.FAILED}),
    State.SLEEPING: frozenset({State.STARTING, State.STOPPING, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING, State.STOPPED}),
}


# ---- decisions (pure) --------------------------------------------------------------------------------------
def idle_due(spec: ProcessSpec, now: float, last_used: float, inflight: int) -> bool:
    """A settled READY backend is due for its idle unload: it has a way to free the GPU, nothing is in flight
    and it went unused for idle_unload_s."""
    return (spec.idle_unload_s is not None and spec.sleep_method != "none"
            and inflight == 0 and now - last_used >= spec.idle_unload_s)


def asleep_too_long(stop_after_s: float | None, slept_at: float | None, now: float) -> bool:
    """A vLLM sleep has lasted stop_after_s: stop the process rather than keep its weights in RAM."""
    return stop_after_s is not None and slept_at is not None and now - slept_at >= stop_after_s


def restart_plan(spec: ProcessSpec, failures: int, reason: str) -> tuple[str, float | None]:
    """After the `failures`-th consecutive crash or wedge of a READY process: (its last_error, the backoff
    before the restart), the backoff None once start_retries restarts are spent (it is FAILED then)."""
    if failures > spec.start_retries:
        return f"{reason}; gave up after {spec.start_retries} restart(s)", None
    return reason, spec.backoff(failures)


def retry_plan(spec: ProcessSpec, failures: int, failure: str, timed_out: bool) -> tuple[str, float | None]:
    """After the `failures`-th consecutive failed start attempt: (its last_error, the backoff before the next
    attempt), None when it is FAILED instead: a start that timed out is not retried (the next would take
    as long), and an early exit is retried up to start_retries times."""
    if timed_out:
        return failure, None
    if failures > spec.start_retries:
        return f"{failure}; gave up after {failures} failed attempt(s)", None
    return failure, spec.backoff(failures)


def default_sleep_level(spec: ProcessSpec) -> int:
    """The vLLM sleep level when nothing chooses one (see ManagedBackend.adapt_sleep)."""
    return 2 if spec.sleep_method == "vllm-sleep-2" else 1


# ---- readiness (I/O, no state) -----------------------------------------------------------------------------
def probe(spec: ProcessSpec, timeout: float) -> tuple[bool, str, bool]:
    """One health probe: (healthy, what it saw, whether it timed out)."""
    try:
        status = health_status(spec.host, spec.port, spec.health_path, timeout)
    except (socket.timeout, TimeoutError) as e:
        return False, f"timed out: {e}", True
    except (OSError, http.client.HTTPException) as e:
        return False, f"{type(e).__name__}: {e}", False
    return status == 200, f"HTTP {status}", False


def await_ready(spec: ProcessSpec, proc: subprocess.Popen, clock: Callable[[], float],
                owned: Callable[[], bool]) -> tuple[str | None, bool]:
    """Probe a fresh process until healthy: (None, False); else (why, timed_out). An exit is seen within one
    short wait; `owned()` False (preempted by stop) ends the wait at once."""
    t0 = clock()
    step = 0.02
    while True:
        rc = proc.poll()
        if rc is not None:
            return f"{describe_exit(rc)} during start (see {spec.log_path or 'its output'})", False
        if not owned():
            return "preempted", False
        ok, _, _ = probe(spec, min(1.0, spec.probe_timeout_s))
        if ok:
            return None, False
        if clock() - t0 >= spec.start_timeout_s:
            return f"not ready within start_timeout_s={spec.start_timeout_s:g}s", True
        try:
            proc.wait(step)
        except subprocess.TimeoutExpired:
            pass
        step = min(step * 1.5, 0.25)


__all__ = ["ALLOWED", "State", "asleep_too_long", "await_ready", "default_sleep_level", "idle_due", "probe",
           "restart_plan", "retry_plan"]
