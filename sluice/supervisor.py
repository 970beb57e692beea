"""Backend process lifecycle: start, probe, restart, sleep/wake, idle unload, stop.

`ManagedBackend`, one per process sluice runs, is the one writer of its state; its ownership and lock
contract (owner tokens, preemption by stop(), nothing blocking under `_cond`) is in docs/design.md "Lock
order". The injected `clock` drives every decision that depends on time, so tests can move it; waits for real
things (a process to exit, a caller's timeout) use real deadlines, never a bare sleep. Elsewhere: its states,
transition table, pure decisions and vLLM calls in sluice/backend_rules.py; what a transition leaves to do
outside the lock in sluice/outbox.py; process mechanics in sluice/processes.py; the `Supervisor` in
sluice/monitor.py.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from sluice import errors
from sluice.backend_rules import (ALLOWED, State, VllmSleep, ask_busy, asleep_too_long, await_ready, discard,
                                  idle_due, launch, probe, probe_verdict, restart_plan, retry_plan)
from sluice.outbox import Outbox
from sluice.processes import ProcessSpec, Registry, describe_exit, kill_group

log = logging.getLogger("sluice.supervisor")


# ---- one managed process ---------------------------------------------------------------------------------
class ManagedBackend:
    """One backend process. Its ownership and lock rules: docs/design.md "Lock order"."""

    def __init__(self, spec: ProcessSpec, *, clock: Callable[[], float] = time.monotonic,
                 registry: Registry | None = None,
                 on_change: Callable[[str, State, State], None] | None = None,
                 is_busy: Callable[[], bool] | None = None):
        self.spec = spec
        self.name = spec.name
        self._clock = clock
        self._registry = registry
        self._out = Outbox(spec.name, registry, on_change)   # its own leaf lock; flushed outside ours
        self._is_busy = is_busy
        self._cond = threading.Condition()     # guards everything below; predicate: "state settled"
        self._state = State.STOPPED
        self._owner: object | None = None      # token of the operation that owns the current transition
        self._op: str | None = None            # its name: start | restart | wake | sleep | stop | unload
        self._proc: subprocess.Popen | None = None
        self._spawned_at: float | None = None
        self._ready_since: float | None = None
        self._last_used: float = clock()
        self._inflight = 0
        self._failures = 0                     # consecutive
        self._unhealthy = 0                    # consecutive failed probes
        self._next_probe = 0.0
        self._gen = 0                          # bumped on every spawn: stale probe results are dropped
        self._spawning = False                 # an owner is spawning outside the lock (design.md)
        self._closed = False
        self.restarts = 0
        self.spawns = 0
        self.last_error: str | None = None
        self.last_exit: int | None = None
        # vLLM sleep levels (backends.py BackendOps sets them through adapt_sleep)
        self._choose_level: Callable[[], int] | None = None
        self._stop_after_s: float | None = None
        self._sleep_level = 1                  # the level of its current (or last) vLLM sleep
        self._slept_at: float | None = None    # when that sleep began; None once woken or stopped
        self.last_sleep_s: float | None = None # how long its last vLLM sleep lasted (at least, if stopped asleep)
        self._vllm = VllmSleep(spec)

    # ---- read-only views (lock-free reads of single attributes are atomic) -----------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def info(self) -> dict:
        with self._cond:
            proc = self._proc
            alive = proc is not None and proc.returncode is None
            return {"name": self.name, "state": self._state.value, "pid": proc.pid if alive else None,
                    "port": self.spec.port,
                    "uptime_s": round(self._clock() - self._spawned_at, 3) if alive and self._spawned_at else None,
                    "restarts": self.restarts, "spawns": self.spawns, "last_error": self.last_error,
                    "last_exit": self.last_exit, "inflight": self._inflight, "op": self._op,
                    "sleep_method": self.spec.sleep_method,
                    "sleep_level": self._sleep_level if self._state is State.SLEEPING else None}

    def wait_for(self, states: State | Sequence[State], timeout: float) -> bool:
        """Wait (real time) until the state is one of `states` and no transition is under way."""
        wanted = {states} if isinstance(states, State) else set(states)
        with self._cond:
            return self._cond.wait_for(lambda: self._state in wanted and self._owner is None, timeout)

    # ---- the public operations ---------------------------------------------------------------------------
    def adapt_sleep(self, choose_level: Callable[[], int] | None, stop_after_s: float | None) -> None:
        """`choose_level()`: the level of each vLLM sleep, asked outside our lock just before it (it may not
        call back into this backend); `stop_after_s`: stop it once asleep this long (the monitor's tick)."""
        with self._cond:
            self._choose_level, self._stop_after_s = choose_level, stop_after_s

    def start(self) -> None:
        """Begin starting (or waking) without waiting; clears FAILED. For eager start and admin `load`."""
        with self._cond:
            if not self._closed and self._owner is None:
                self._begin_use_locked()
        self._out.flush()

    def ensure_ready(self, timeout: float) -> None:
        """Return once READY, starting it if STOPPED and waking it if SLEEPING. Concurrent callers share one
        start. Raises errors.Unavailable at once when FAILED, when the start fails, or after `timeout` s."""
        self._acquire(timeout, busy=False)

    @contextmanager
    def use(self, timeout: float) -> Iterator["ManagedBackend"]:
        """`with backend.use(30): forward(...)`: READY and counted busy for the block, in one step with the
        start or wake, so no idle unload can slip in between."""
        self._acquire(timeout, busy=True)
        try:
            yield self
        finally:
            with self._cond:
                self._inflight = max(0, self._inflight - 1)
                self._last_used = self._clock()

    def sleep(self, timeout: float | None = None) -> State:
        """Free the GPU: vLLM sleep (level 1 or 2), or stop for `stop` engines; `none` keeps it running.
        A failed sleep escalates to stop. Blocks until settled; returns the state it settled in. Raises
        errors.Unavailable when another transition (a start, restart or wake) has not settled by `timeout`."""
        t = self.spec.start_timeout_s if timeout is None else timeout
        with self._cond:
            if not self._cond.wait_for(lambda: self._owner is None, t):
                # Not taken down: returning would let a gate switch load the next model beside this one while
                # it is still loading (a slow restart after a crash). Failing makes the switch stop() it,
                # which preempts that transition.
                raise errors.Unavailable(f"backend {self.name} could not be put to sleep: still {self._op} "
                                         f"({self._state.value}) after {t:g}s", retry_after=5)
            if self._state is not State.READY or self.spec.sleep_method == "none":
                return self._state
            work = self._claim_sleep_locked("sleep")
        self._out.flush()
        work()
        return self._state

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after stop_timeout_s; blocks until STOPPED. Preempts a
        start, restart, sleep or wake in progress. From FAILED it resets to STOPPED."""
        with self._cond:
            self._cond.wait_for(lambda: self._op != "stop" or self._owner is None)   # another stop: wait for it
            if self._state is State.STOPPED:
                return
            token = self._claim_locked("stop", State.STOPPING)
            proc = self._proc
        self._out.flush()
        self._run_stop(token, proc, State.STOPPED)

    def close(self) -> None:
        """Stop, and refuse every later start (sluice is shutting down)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.stop()

    def check(self) -> None:
        """One monitor tick: notice an exit, probe health when due, restart a crashed or wedged process
        (with backoff), unload after idle_unload_s with nothing in flight. Never blocks long: restarts and
        unloads run in their own thread; a probe waits at most probe_timeout_s."""
        try:
            with self._cond:
                action, gen, busy = self._check_locked()
            if action == "ask":   # the external is_busy veto: asked outside our lock, decision re-made under it
                external = ask_busy(self._is_busy, self.name)
                with self._cond:
                    if not external and self._idle_due_locked() and self._gen == gen:
                        self._begin_unload_locked()
                        return
                    action = "probe" if self._clock() >= self._next_probe else None
            if action == "probe":
                self._check_health(gen, busy)
        finally:
            self._out.flush()

    def _idle_due_locked(self) -> bool:
        return (self._owner is None and self._state is State.READY and not self._closed
                and idle_due(self.spec, self._clock(), self._last_used, self._inflight))

    def _check_locked(self) -> tuple[str | None, int, bool]:
        """The decisions of one tick that need no I/O; returns what is left to do outside the lock."""
        if self._owner is not None or self._closed:
            return None, self._gen, False
        if self._state is State.SLEEPING:
            rc = self._proc.poll() if self._proc is not None else -1
            if rc is not None:
                self._proc_gone_locked(rc)
                self.last_error = f"{describe_exit(rc)} while sleeping"
                self._set_state_locked(State.STOPPED)
            elif asleep_too_long(self._stop_after_s, self._slept_at, self._clock()):
                self.last_sleep_s, self._slept_at = self._clock() - self._slept_at, None
                log.info("backend %s: asleep for %.0fs (stop_after_s), stopping it", self.name, self.last_sleep_s)
                self._begin_stop_locked("unload", self._proc, State.STOPPED)
            return None, self._gen, False
        if self._state is not State.READY:
            return None, self._gen, False
        rc = self._proc.poll() if self._proc is not None else -1
        if rc is not None:
            self._begin_restart_locked(describe_exit(rc))
            return None, self._gen, False
        now = self._clock()
        if self._failures and self._ready_since is not None and now - self._ready_since >= self.spec.stable_s:
            self._failures = 0
        if self._idle_due_locked():
            if self._is_busy is None:
                self._begin_unload_locked()
                return None, self._gen, False
            return "ask", self._gen, False
        if now >= self._next_probe:
            return "probe", self._gen, self._inflight > 0
        return None, self._gen, False

    def _check_health(self, gen: int, busy: bool) -> None:
        spec = self.spec
        ok, why, timed_out = probe(spec, spec.probe_timeout_s)
        with self._cond:
            if self._gen != gen or self._state is not State.READY or self._owner is not None:
                return     # something else happened meanwhile: this result is stale
            self._next_probe = self._clock() + spec.probe_interval_s
            self._unhealthy, reason = probe_verdict(spec, self.name, ok, why, timed_out, busy or self._inflight > 0,
                                                    self._unhealthy)
            if reason is not None:
                self._begin_restart_locked(reason)

    # ---- internals: transitions (all *_locked run under self._cond) --------------------------------------
    def _set_state_locked(self, new: State) -> None:
        old = self._state
        if new is old:
            return
        if new not in ALLOWED[old]:
            raise RuntimeError(f"backend {self.name}: illegal transition {old.value} -> {new.value}")
        self._state = new
        self._out.changed(old, new)
        log.info("backend %s: %s -> %s%s", self.name, old.value, new.value,
                 f" ({self.last_error})" if new in (State.FAILED,) and self.last_error else "")
        self._cond.notify_all()

    def _claim_locked(self, op: str, state: State) -> object:
        token = object()
        self._owner, self._op = token, op
        self._set_state_locked(state)
        self._cond.notify_all()
        return token

    def _settle_locked(self, token: object, state: State) -> bool:
        if self._owner is not token:
            return False
        self._owner = self._op = None
        self._set_state_locked(state)
        self._cond.notify_all()     # also when the state did not change: "settled" is what waiters wait for
        return True

    def _thread(self, target, *args) -> None:
        threading.Thread(target=target, args=args, name=f"sluice-{self.name}-{self._op}", daemon=True).start()

    def _begin_use_locked(self) -> bool:
        """Unowned: start it (a fresh count of failures) or wake it; False when it is neither down nor asleep."""
        if self._state in (State.STOPPED, State.FAILED):
            self._failures = 0
            self._thread(self._run_start, self._claim_locked("start", State.STARTING), None, None, False)
        elif self._state is State.SLEEPING:
            self._thread(self._run_wake, self._claim_locked("wake", State.STARTING))
        else:
            return False
        return True

    def _begin_stop_locked(self, op: str, proc: subprocess.Popen | None, final: State) -> None:
        token = self._claim_locked(op, State.STOPPING)
        self._thread(self._run_stop, token, proc, final)

    def _claim_sleep_locked(self, op: str) -> Callable[[], None]:
        """READY -> STOPPING (`stop` engines) or SLEEPING (vLLM); returns the owner's work, to run unlocked."""
        if self.spec.sleep_method == "stop":
            token, proc = self._claim_locked(op, State.STOPPING), self._proc
            return lambda: self._run_stop(token, proc, State.STOPPED)
        token = self._claim_locked(op, State.SLEEPING)
        return lambda: self._run_sleep(token)

    def _begin_unload_locked(self) -> None:
        log.info("backend %s: idle for %.0fs, unloading (%s)", self.name, self._clock() - self._last_used,
                 self.spec.sleep_method)
        self._thread(self._claim_sleep_locked("unload"))

    def _begin_restart_locked(self, reason: str) -> None:
        """A READY process crashed or wedged: restart with backoff, or FAILED when retries are spent."""
        self._failures += 1
        self.last_error, delay = restart_plan(self.spec, self._failures, reason)
        old = self._proc
        if delay is None:
            log.error("backend %s: %s", self.name, self.last_error)
            if old is not None and old.poll() is None:
                self._begin_stop_locked("restart", old, State.FAILED)
            else:
                self._proc_gone_locked(old.returncode if old is not None else None)
                self._set_state_locked(State.FAILED)
            return
        log.warning("backend %s: %s; restarting in %.2fs (failure %d of at most %d)", self.name, reason, delay,
                    self._failures, self.spec.start_retries)
        token = self._claim_locked("restart", State.STARTING)
        self._thread(self._run_start, token, self._clock() + delay, old, True)

    def _proc_gone_locked(self, rc: int | None) -> None:
        if self._proc is not None:
            self._out.gone(self._proc.pid)
        self._proc = None
        self._spawned_at = self._ready_since = None
        if rc is not None:
            self.last_exit = rc

    # ---- internals: the owners' work (outside the lock) --------------------------------------------------
    def _owns(self, token: object) -> bool:
        return self._owner is token

    def _run_start(self, token: object, not_before: float | None, old: subprocess.Popen | None,
                   restart: bool) -> None:
        """Owner of a STARTING phase: kill `old`, wait until clock() >= `not_before` (the backoff, fixed when
        the failure was decided), spawn, wait for health; retry early exits
        with backoff up to start_retries; READY or FAILED at the end (unless preempted by stop)."""
        spec = self.spec
        try:
            if old is not None:
                self._terminate(old)
                with self._cond:
                    if not self._owns(token):
                        return
                    if self._proc is old:
                        self._proc_gone_locked(old.returncode)
            while True:
                with self._cond:
                    if not_before is not None:
                        while self._owns(token) and self._clock() < not_before and not self._closed:
                            self._cond.wait(min(0.05, max(0.001, not_before - self._clock())))
                    if not self._owns(token):
                        return
                    if self._closed:
                        self.last_error = "sluice is shutting down"
                        self._settle_locked(token, State.FAILED)
                        return
                    if restart:
                        self.restarts += 1
                    restart = True     # every later spawn by this owner is a retry
                    self._spawning = True
                proc = self._spawn(token)
                if proc is None:
                    return
                failure, timed_out = await_ready(spec, proc, self._clock, lambda: self._owns(token))
                if failure is None:
                    self._settle_ready(token, spawned=True)
                    return
                if not self._owns(token):
                    return
                self._terminate(proc)
                with self._cond:
                    if not self._owns(token):
                        return
                    if self._proc is proc:
                        self._proc_gone_locked(proc.returncode)
                    self._failures += 1
                    self.last_error, delay = retry_plan(spec, self._failures, failure, timed_out)
                    if delay is None:
                        self._settle_locked(token, State.FAILED)
                        return
                    not_before = self._clock() + delay
                    log.warning("backend %s: %s; retrying in %.2fs", self.name, failure, delay)
        finally:
            self._out.flush()

    def _spawn(self, token: object) -> subprocess.Popen | None:
        """Spawn and register the process outside the lock, then adopt it under the lock. None when it
        could not be run (FAILED) or stop() preempted us meanwhile (then we kill it: no one else knows it)."""
        spec = self.spec
        try:
            try:
                proc = launch(spec, self._registry)
            except OSError as e:   # recorded, not raised; retrying a missing binary is pointless
                with self._cond:
                    if self._owns(token):
                        self.last_error = f"cannot run {spec.argv[0]!r}: {e}"
                        self._settle_locked(token, State.FAILED)
                return None
            with self._cond:
                adopted = self._owns(token)
                if adopted:
                    self._proc, self._spawned_at, self._ready_since = proc, self._clock(), None
                    self._gen += 1
                    self.spawns += 1
            if adopted:
                log.info("backend %s: spawned pid %d: %s", spec.name, proc.pid, shlex.join(spec.argv))
                return proc
            discard(spec, self._registry, proc)
            return None
        finally:
            with self._cond:
                self._spawning = False
                self._cond.notify_all()

    def _terminate(self, proc: subprocess.Popen | None) -> None:
        kill_group(proc, self.spec.stop_timeout_s, f"backend {self.name}")

    def _run_stop(self, token: object, proc: subprocess.Popen | None, final: State) -> None:
        try:
            self._terminate(proc)
            with self._cond:
                self._cond.wait_for(lambda: not self._spawning)   # a spawn we preempted: its owner kills it
                if not self._owns(token):
                    return
                if proc is not None and self._proc is proc:
                    self._proc_gone_locked(proc.returncode)
                elif proc is None and self._proc is not None:
                    self._proc_gone_locked(None)
                self._settle_locked(token, final)
        finally:
            self._out.flush()

    def _run_sleep(self, token: object) -> None:
        """Owner of READY -> SLEEPING (state already SLEEPING): POST /sleep?level=N; on failure, stop."""
        try:
            with self._cond:
                choose = self._choose_level
            level = self._vllm.level(choose)
            with self._cond:
                if not self._owns(token):
                    return
                self._sleep_level = level
            try:
                self._vllm.sleep(level)
            except errors.SluiceError as e:
                with self._cond:
                    if not self._owns(token):
                        return
                    self.last_error = f"sleep failed ({e}); stopped instead"
                    log.warning("backend %s: %s", self.name, self.last_error)
                    self._set_state_locked(State.STOPPING)
                    proc = self._proc
                self._out.flush()
                self._run_stop(token, proc, State.STOPPED)
                return
            with self._cond:
                if self._owns(token):
                    self._slept_at = self._clock()
                self._settle_locked(token, State.SLEEPING)
        finally:
            self._out.flush()

    def _run_wake(self, token: object) -> None:
        """Owner of SLEEPING -> READY (state already STARTING). A failed wake restarts the process."""
        with self._cond:
            level = self._sleep_level
            if self._slept_at is not None:
                self.last_sleep_s, self._slept_at = self._clock() - self._slept_at, None
        try:
            self._vllm.wake(level)
        except (errors.SluiceError, RuntimeError) as e:
            with self._cond:
                if not self._owns(token):
                    return
                self.last_error = f"wake failed ({e}); restarting"
                log.warning("backend %s: %s", self.name, self.last_error)
                old = self._proc
            self._out.flush()
            self._run_start(token, None, old, True)
            return
        self._settle_ready(token, spawned=False)
        self._out.flush()

    def _settle_ready(self, token: object, spawned: bool) -> None:
        """READY with a fresh probe schedule; `spawned`: a new process (a woken one keeps its ready_since)."""
        with self._cond:
            if self._owns(token):
                now = self._clock()
                if spawned:
                    self._ready_since = now
                self._last_used = now
                self._next_probe = now + self.spec.probe_interval_s
                self._unhealthy = 0
                self._settle_locked(token, State.READY)

    def _acquire(self, timeout: float, busy: bool) -> None:
        deadline = time.monotonic() + timeout
        triggered = False
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise errors.Unavailable(f"backend {self.name} is shutting down", retry_after=5)
                    st = self._state
                    if st is State.READY and self._owner is None:
                        if busy:
                            self._inflight += 1
                        return
                    if st is State.FAILED and self._owner is None:
                        raise errors.Unavailable(f"backend {self.name} failed: {self.last_error}",
                                                 retry_after=30)
                    if self._owner is None:
                        if triggered:   # we started it and someone stopped it before it was ready
                            raise errors.Unavailable(f"backend {self.name} was {st.value} while starting",
                                                     retry_after=1)
                        triggered = self._begin_use_locked()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise errors.Unavailable(
                            f"backend {self.name} is not ready after {timeout:g}s (state {self._state.value}"
                            f"{', ' + self._op if self._op else ''})", retry_after=5)
                    self._cond.wait(remaining)
        finally:
            self._out.flush()


__all__ = ["ALLOWED", "ManagedBackend", "State"]
