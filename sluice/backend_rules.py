"""The rules of a managed backend's lifecycle, apart from the state machine that applies them
(sluice/supervisor.py `ManagedBackend`): the states, the table of allowed transitions, the decisions its
monitor tick and its owners make (pure functions over values: times, counts, the spec), and the I/O an owner
runs outside the lock (readiness checks, vLLM's sleep and wake calls). Nothing here holds or writes a
backend's state: the callers write what these return.
"""

from __future__ import annotations

import enum
import http.client
import logging
import socket
import subprocess
from typing import Callable

from sluice.processes import ProcessSpec, Registry, describe_exit, health_status, kill_group, spawn
from sluice.upstream import Upstream

log = logging.getLogger("sluice.supervisor")


class State(enum.Enum):
    """
        STOPPED -> STARTING -> READY <-> SLEEPING
           ^          |          |          |
           +------ STOPPING <----+----------+         FAILED (sticky until start() or stop())

    `STARTING` covers everything between "asked for" and "ready": spawning, readiness probes, the backoff
    between failed attempts, a restart of a crashed or wedged process, and waking from sleep.
    """
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


def probe_verdict(spec: ProcessSpec, name: str, ok: bool, why: str, timed_out: bool, busy: bool,
                  unhealthy: int) -> tuple[int, str | None]:
    """A READY backend's health probe came back: (its new count of consecutive failed probes, the reason to
    restart it, or None). A probe that timed out while requests are in flight is not counted: a busy engine
    may answer its health path late."""
    if ok:
        return 0, None
    if timed_out and busy:
        log.info("backend %s: health probe timed out while busy; not counted", name)
        return unhealthy, None
    unhealthy += 1
    log.warning("backend %s: health probe failed (%d/%d): %s", name, unhealthy, spec.unhealthy_after, why)
    if unhealthy < spec.unhealthy_after:
        return unhealthy, None
    return unhealthy, (f"unhealthy: {spec.unhealthy_after} consecutive failed probes of {spec.health_path} "
                       f"(last: {why})")


# ---- process and callback I/O (no state) -------------------------------------------------------------------
def launch(spec: ProcessSpec, registry: Registry | None) -> subprocess.Popen:
    """Spawn the process and record it in the registry; raises OSError when it cannot be run."""
    proc = spawn(spec)
    if registry is not None:
        registry.record(spec.name, proc, spec.argv, spec.stop_timeout_s)
    return proc


def discard(spec: ProcessSpec, registry: Registry | None, proc: subprocess.Popen) -> None:
    """Kill and forget a process nobody adopted (stop() preempted its spawn): no one else knows of it."""
    kill_group(proc, spec.stop_timeout_s, f"backend {spec.name}")
    if registry is not None:
        registry.forget(spec.name, proc.pid)


def ask_busy(is_busy: Callable[[], bool], name: str) -> bool:
    """The external veto of an idle unload; a failing callback counts as busy (never unload on a bug)."""
    try:
        return bool(is_busy())
    except Exception:
        log.exception("is_busy callback for %s failed; treating as busy", name)
        return True


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


# ---- vLLM sleep and wake (I/O, no state) -------------------------------------------------------------------
class VllmSleep:
    """One managed vLLM's sleep API: the same client code the gate's switch uses for servers sluice doesn't
    run. It chooses levels and makes the calls; the ManagedBackend records what came of them."""

    def __init__(self, spec: ProcessSpec):
        self.spec = spec
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        self._api = Upstream(spec.name, f"http://{host}:{spec.port}")

    def level(self, choose: Callable[[], int] | None) -> int:
        """The level of the next sleep: `choose()` (see ManagedBackend.adapt_sleep), else the spec's."""
        if choose is None:
            return default_sleep_level(self.spec)
        try:
            return choose()
        except Exception:       # a bug there must not leave the backend owned forever
            log.exception("backend %s: choosing its sleep level failed; level 2", self.spec.name)
            return 2

    def sleep(self, level: int) -> None:
        """POST /sleep?level=N; raises errors.SluiceError when it did not sleep."""
        self._api.vllm_sleep(level, timeout=self.spec.sleep_timeout_s)

    def wake(self, level: int) -> None:
        """POST /wake_up, then one health probe; raises errors.SluiceError or RuntimeError when it is not back."""
        self._api.vllm_wake(level, timeout=self.spec.sleep_timeout_s)
        ok, why, _ = probe(self.spec, self.spec.probe_timeout_s)
        if not ok:
            raise RuntimeError(f"not healthy after wake_up: {why}")


__all__ = ["ALLOWED", "State", "VllmSleep", "ask_busy", "asleep_too_long", "await_ready", "default_sleep_level",
           "discard", "idle_due", "launch", "probe", "probe_verdict", "restart_plan", "retry_plan"]
