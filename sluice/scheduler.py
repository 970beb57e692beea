"""The Scheduler: admission, waiting, cancellation, finishing and every grant.

Lock contract (as in CPython's queue.py): one mutex, `self._lock`, guards every field of the scheduler,
of each Job's scheduling state, and of the Queues, the Pool with its Gates and Backends, the Dispatcher,
the Switcher and SwitchCosts, which share it. `self._work` (a Condition on it) is notified whenever a
grant may have become possible. Grants are decided only under the lock: inline on submit when the gate
has nothing waiting (the fast path), otherwise by the dispatcher thread. Exclusive gates are switched by
the Switcher, on a switch thread that calls the backends without the lock. The lock order of the whole
daemon, and the one thing called under this lock (a cancel hook on a drain timeout), are in
docs/design.md ("Lock order").
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from typing import Callable, Iterable, Mapping

from sluice import errors
from sluice import policies
from sluice.dispatcher import Dispatcher
from sluice.gates import Backend, BackendSpec, Gate, Health, Pool
from sluice.policies import GateView, SwitchCosts
from sluice.queues import COUNTER, LEVELS, Job, JobState, Outcome, Queues
from sluice.switching import Switcher

# Where the rest of sluice (and the tests) import them from; they live in gates.py and queues.py.
__all__ = ["BackendSpec", "Health", "Job", "JobState", "Outcome", "Scheduler"]

log = logging.getLogger("sluice.scheduler")


class Scheduler:
    """Owns pending jobs and slots. Knows nothing of HTTP.

    `gates`: GateConfig list; `backends`: BackendSpec list. `clock` is injected (monotonic seconds) so
    tests drive aging, timeouts and switch decisions without sleeping. `switcher(backend, action)` puts a
    backend to sleep, stops or wakes it ("sleep" / "stop" / "wake"), raising on failure; it runs on a switch
    thread (see sluice/switching.py)."""

    def __init__(self, gates, backends: list[BackendSpec], *,
                 max_queue_depth: int = 20, aging_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_finish: Callable[[Job], None] | None = None,
                 switcher: Callable[[str, str], None] | None = None,
                 on_switch: Callable[[str, dict], None] | None = None,
                 decide: Callable[[str, GateView, SwitchCosts], str | None] | None = None):
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)   # a grant may have become possible
        self._idle = threading.Condition(self._lock)   # no job is in flight
        self._idle_waiters = 0                          # notify only then: a notify costs the request path
        self._clock = clock
        self.clock = clock          # the request path times jobs on the scheduler's clock too
        self._queued = Queues(aging_s)
        self.max_queue_depth = max_queue_depth
        self._on_finish = on_finish
        self._pool = Pool(gates, backends)
        self._gates, self._backends = self._pool.gates, self._pool.backends
        # the exclusive-gate switching (switching.py); public for its readers: switch costs, operators' orders
        self.switching = Switcher(
            self._work, self._gates.values(), clock=clock, act=switcher or (lambda backend, action: None),
            on_switch=on_switch, decide=decide or policies.decide,   # injectable: a test's failing policy
            waiting=self._queued.waiting, fail_waiting=self._fail_waiting_locked, abort=self._abort_gate_locked,
            finished=self._notify_finished, woken=lambda b: self._pool.set_health(b.name, Health.READY, None))
        self._dispatcher = Dispatcher(self._work, self._queued, self._pool, self.switching,
                                      grant=self._grant_locked, clock=clock)
        for m in self._pool.models():
            self._queued.add(m)
        self._seq = itertools.count()
        # granted and not finished, in grant order; keyed by the job itself (a client's X-Request-Id may repeat)
        self._active: dict[Job, None] = {}
        self._closed: errors.SluiceError | None = None
        self._closing = False             # close() (shutdown) is final; a drain() can be resumed
        self._retired: frozenset[str] = frozenset()   # models that take no new jobs (see set_models)
        self.totals = dict.fromkeys(("received", "served", "rejected", "timed_out", "cancelled", "failed"), 0)
        self._latency_sum = 0.0

    @property
    def aging_s(self) -> float:
        return self._queued.aging_s

    @aging_s.setter
    def aging_s(self, value: float) -> None:
        self._queued.aging_s = value    # a reload; one float, read under the lock

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._dispatcher.start()

    def stop(self) -> None:
        self._dispatcher.stop()

    def drain(self, error: errors.SluiceError) -> None:
        """Refuse new jobs with `error`; queued and in-flight ones still run."""
        with self._lock:
            self._closed = error

    def resume(self) -> bool:
        """Admit new jobs again after a drain; False if there was none (or sluice is shutting down)."""
        with self._lock:
            if self._closed is None or self._closing:
                return False
            self._closed = None
            return True

    def close(self, error: errors.SluiceError) -> int:
        """Stop admitting; answer every queued job with `error`. Returns how many were answered."""
        with self._lock:
            self._closed, self._closing = error, True
            queued = list(self._queued.jobs())
            for job in queued:
                self._finish_locked(job, Outcome.REJECTED, error)
        self._notify_finished(queued)
        return len(queued)

    def is_exclusive(self, gate: str) -> bool:
        return self._gates[gate].exclusive

    @contextlib.contextmanager
    def holding(self, backend: str, what: str):
        """Nothing is granted to `backend` while the block runs (an operator putting it down on a shared
        gate): checked idle and held under one lock hold, so no job slips in between. Conflict if it has
        work in flight or waiting."""
        with self._lock:
            b = self._backends[backend]
            if self._busy_locked(b) or b.held:
                raise errors.Conflict(f"backend {backend!r} has requests in flight or queued; {what} it when "
                                      "they are done (POST /admin/drain stops new ones)")
            b.held = True
        try:
            yield
        finally:
            with self._lock:
                b.held = False
                self._work.notify()

    def busy(self, backend: str) -> bool:
        """Whether a backend has work in flight or waiting (idle unload must not happen then)."""
        with self._lock:
            return self._busy_locked(self._backends[backend])

    def _busy_locked(self, b: Backend) -> bool:
        return b.inflight > 0 or self._queued.has(b.models)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no granted job is in flight; False if some still are after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle_waiters += 1
                try:
                    self._idle.wait(remaining)
                finally:
                    self._idle_waiters -= 1
            return True

    # ---- submission and waiting (request threads) -------------------------------------------------
    def submit(self, job: Job) -> None:
        """Admit `job` (granting it at once when its gate is idle) or raise the error that refuses it."""
        if not (type(job.priority) is int and 0 <= job.priority < LEVELS):
            raise ValueError(f"job priority must be an int 0..{LEVELS - 1}, got {job.priority!r}")  # before counting
        finished = None
        with self._lock:
            now = self._clock()
            job.seq = next(self._seq)
            job.enqueued_at = now
            job.deadline = now + job.timeout_s
            self.totals["received"] += 1
            err = self._refusal_locked(job)
            if err is not None and job.fallback_at is not None and isinstance(err, errors.Unavailable) \
                    and not isinstance(err, errors.QueueFull) and self._closed is None:
                self._reroute_locked(job, now)       # nothing local is up: the cloud route, now
            elif err is not None:
                self._finish_locked(job, Outcome.REJECTED, err)
                finished = job
            elif job.model not in self._queued:       # cloud: no gate, no queue
                self._grant_locked(job, None, now)
            else:
                free = self._pool.candidates(job.model)
                if free and not self._queued.depth:
                    self._queued.pass_through(job)   # nothing waits: no queue to pass
                    self._grant_locked(job, free[0], now)
                else:
                    job.state = JobState.QUEUED
                    self._queued.push(job)
                    if not self._grant_fast_locked(job, free, now):
                        self._work.notify()
        if finished is not None:
            self._notify_finished([finished])
            raise finished.error

    def _refusal_locked(self, job: Job) -> errors.SluiceError | None:
        if self._closed is not None:
            return self._closed
        if job.model not in self._queued:
            return None
        full = self._queued.refusal(job, self.max_queue_depth)
        if full is not None:
            return full
        if job.model in self._retired:
            return errors.NotFound(f"model {job.model!r} was removed from the configuration; it takes no new "
                                   "requests", param="model", code="model_not_found")
        return self._pool.unservable(job.model)

    def wait(self, job: Job, tick: Callable[[int], None] | None = None,
             first_tick_s: float = 10.0, tick_every_s: float = 5.0) -> None:
        """Block until `job` is granted. Raises its error if it was refused, cancelled or timed out.

        `tick(position)` is called after `first_tick_s` queued and then every `tick_every_s` (SSE keepalives).
        """
        next_tick = job.enqueued_at + first_tick_s
        while True:
            with self._lock:
                if job.state is JobState.GRANTED:
                    return
                if job.state is JobState.DONE:
                    raise job.error or errors.Unavailable("request ended before it was granted")
                now = self._clock()
                remaining = job.deadline - now
                if remaining <= 0:
                    err = errors.QueueTimeout(
                        f"waited {job.timeout_s:g}s in the queue without a free slot; "
                        "retry later, raise the timeout, or use a higher priority",
                        headers={"X-Queue-Position": str(self._queued.position(job, now))})
                    self._finish_locked(job, Outcome.TIMEOUT, err)
                    break
                if job.fallback_at is not None and now >= job.fallback_at:
                    self._reroute_locked(job, now)
                    return
                due = next_tick - now if tick is not None else remaining
                if job.fallback_at is not None:
                    due = min(due, job.fallback_at - now)
                if due <= 0 and tick is not None:
                    position = self._queued.position(job, now)
                signal = job.waiter()
            if tick is not None and due <= 0:
                tick(position)           # outside the lock: it writes to the client's socket
                next_tick += tick_every_s
                continue
            signal.wait(min(remaining, due))
            signal.clear()
        self._notify_finished([job])
        raise job.error

    def cancel(self, job: Job, reason: str = "client disconnected") -> None:
        """The client went away: a queued job is removed at once; one in flight has its upstream closed."""
        with self._lock:
            if job.state is JobState.QUEUED:
                self._finish_locked(job, Outcome.CANCELLED, errors.Cancelled(reason))
                hook = None
            elif job.state is JobState.GRANTED:
                job.outcome = Outcome.CANCELLED  # provisional: finish() keeps it
                if job.cancel_hook is None:
                    return                        # attach() will refuse the upstream call
                hook = job.cancel_hook
            else:
                return
        if hook is None:
            self._notify_finished([job])
        else:
            hook()

    def reroute(self, job: Job) -> None:
        """Move a job off its gate to the cloud route (fallback): its slot is freed, it stays one job."""
        with self._lock:
            if job.state is not JobState.DONE:
                self._reroute_locked(job, self._clock())

    def requeue(self, job: Job) -> bool:
        """A granted job's backend refused the connection (nothing was sent): move it to another backend of
        its model. Its turn had come, so it takes a free slot there at once; with none free it waits in the
        queue again (its age kept, behind the jobs of its own priority already waiting). False, nothing
        changed, when no other backend of the model is up or the job is ending (its client left, sluice
        aborted it, shutting down)."""
        with self._lock:
            refused = job.backend
            if job.state is not JobState.GRANTED or refused is None or job.outcome is not None \
                    or job.abort_error is not None or self._closing or not self._pool.up_elsewhere(job.model, refused):
                return False
            self._let_go_locked(job)
            free = [b for b in self._pool.candidates(job.model) if b.name != refused]
            if free:
                self._pool.take(free[0], job.model)
                job.backend, job.gate = free[0].name, free[0].gate.name
                return True
            del self._active[job]
            job.backend = job.gate = job.granted_at = None
            job.state = JobState.QUEUED
            self._queued.push(job)
            self._work.notify()
            return True

    def _reroute_locked(self, job: Job, now: float) -> None:
        self._let_go_locked(job)
        job.backend = job.gate = None
        job.rerouted = True
        job.state = JobState.GRANTED
        job.granted_at = job.granted_at or now
        self._active[job] = None

    def attach(self, job: Job, hook: Callable[[], None]) -> None:
        """Register how to abort a granted job's upstream call; raises Cancelled if its client already left."""
        with self._lock:
            if job.outcome is Outcome.CANCELLED:
                raise errors.Cancelled("client disconnected")
            job.cancel_hook = hook

    def finish(self, job: Job, outcome: Outcome, error: errors.SluiceError | None = None) -> None:
        """Record the one final outcome of a granted job and free its slot. Idempotent."""
        with self._lock:
            if job.state is JobState.DONE:
                return
            if job.outcome is Outcome.CANCELLED:
                outcome = Outcome.CANCELLED
            self._finish_locked(job, outcome, error)
        self._notify_finished([job])

    def set_health(self, backend: str, health: Health, why: str | None = None) -> None:
        """Record a probe result (or FAILED with its reason). A backend going out fails the jobs that now
        have nowhere to go."""
        failed: list[Job] = []
        with self._lock:
            b = self._pool.set_health(backend, health, why)
            if b is None:
                return
            if b.out:
                for model in b.models:
                    self._strand_locked(model, self._pool.unservable(model), failed)
            self._work.notify()
        self._notify_finished(failed)

    def set_models(self, serving: Mapping[str, Iterable[str]], *, known: Iterable[str] = (),
                   retired: Iterable[str] | None = None, limits: Mapping[str, int] | None = None,
                   reason: str = "is no longer served by any backend") -> None:
        """Replace which models backends serve, in one step under the lock (discovery, reload), so a model
        moving from backend A to B never passes through "served by nobody". `serving` and `limits` as in
        Pool.set_models; `known`: models that get a queue even while no backend serves them; `retired`, when
        given, replaces the models that take no new jobs but still serve the queued ones. Jobs in flight
        finish where they are; queued jobs of a model nothing can serve now go to the cloud route or get 503
        `model ... {reason}` at once (docs/design.md, "The live model table")."""
        failed: list[Job] = []
        with self._lock:
            self._pool.set_models(serving, limits, self.switching.unsettle_locked)
            for m in itertools.chain(known, self._pool.models()):
                self._queued.add(m)
            if retired is not None:
                self._retired = frozenset(retired)
            # Queues are kept even when empty and unserved: a request that resolved the model a moment
            # before the change must meet a clear 503 here, not be taken for a gate-less (cloud) job.
            for model in self._queued.models():
                if self._queued.has([model]):
                    self._strand_locked(model, self._pool.unservable(model, reason), failed)
            self._work.notify()
        self._notify_finished(failed)

    def has_jobs(self, model: str) -> bool:
        """Whether any job for `model` is queued or in flight."""
        with self._lock:
            return self._queued.has([model]) or any(j.model == model for j in self._active)

    # ---- internals (all *_locked: caller holds self._lock) -----------------------------------------
    def _strand_locked(self, model: str, err: errors.SluiceError | None, failed: list[Job]) -> None:
        """Every queued job of `model` has nowhere to go (`err` says why; None: it has somewhere, nothing to
        do): to the cloud route if it may, else failed now."""
        if err is None:
            return
        for job in list(self._queued.jobs([model])):
            if job.fallback_at is not None:
                self._reroute_locked(job, self._clock())
                job.wake()
                continue
            self._finish_locked(job, Outcome.ERROR, err)
            failed.append(job)

    def _let_go_locked(self, job: Job) -> None:
        """Take a job out of its queue, or give back the slot it holds."""
        if job.state is JobState.QUEUED:
            self._queued.remove(job)
        elif job.state is JobState.GRANTED and job.backend is not None:
            b = self._backends[job.backend]
            self._pool.give_back(b, job.model)
            if self._queued.depth or b.gate.exclusive:     # wake the dispatcher only when a grant may follow
                self._work.notify()

    def _finish_locked(self, job: Job, outcome: Outcome, error: errors.SluiceError | None) -> None:
        if outcome is Outcome.OK and job.state is JobState.GRANTED and job.gate is not None \
                and self._gates[job.gate].exclusive:
            # cost-aware weighs each model's queue by how long its jobs hold the gate
            self.switching.costs[job.gate].observe_service(job.model, self._clock() - job.granted_at)
        self._let_go_locked(job)
        if job in self._active:
            del self._active[job]
            if not self._active and self._idle_waiters:
                self._idle.notify_all()
        job.state = JobState.DONE
        job.outcome, job.error = outcome, error
        job.finished_at = self._clock()
        self.totals[COUNTER[outcome]] += 1
        if outcome is Outcome.OK:
            self._latency_sum += job.finished_at - job.enqueued_at
        job.wake()

    def _notify_finished(self, jobs: list[Job]) -> None:
        if self._on_finish is not None:
            for job in jobs:
                try:
                    self._on_finish(job)
                except Exception:  # a broken observer must never break the request path
                    log.exception("on_finish observer failed for job %s", job.id)

    def _grant_locked(self, job: Job, backend: Backend | None, now: float) -> None:
        if job.state is JobState.QUEUED:
            self._queued.remove(job, granted=True)
        if backend is not None:
            self._pool.take(backend, job.model)
            job.backend, job.gate = backend.name, backend.gate.name
        job.state = JobState.GRANTED
        job.granted_at = now
        self._active[job] = None
        job.wake()

    def _grant_fast_locked(self, job: Job, free: list[Backend], now: float) -> bool:
        """Grant a just-queued job inline, on one of the backends `free` to take it, when its gate has nothing
        else waiting (no thread hop)."""
        for b in free:
            if self._queued.count(b.gate.models()) == 1:     # only this job waits for the gate
                self._grant_locked(job, b, now)
                return True
        return False

    def _fail_waiting_locked(self, model: str, err: errors.SluiceError) -> list[Job]:
        """Answer every queued job of `model` with `err` (its switch failed); returns them."""
        failed = list(self._queued.jobs([model]))
        for job in failed:
            self._finish_locked(job, Outcome.ERROR, err)
        return failed

    def _abort_gate_locked(self, gate: Gate, err: errors.SluiceError) -> None:
        hooks = []
        for job in self._active:
            if job.gate == gate.name and job.abort_error is None:
                job.abort_error = err
                if job.cancel_hook is not None:
                    hooks.append(job.cancel_hook)
        # Hooks only shut sockets down; calling them under the lock cannot block (see the lock order above).
        for hook in hooks:
            hook()

    # ---- switching on demand (operators) ----------------------------------------------------------
    def switch_now(self, gate: str, target: str | None, *, evict: str | None = None, how: str = "sleep",
                   timeout: float = 600.0) -> dict:
        """Make `target` the resident model of exclusive `gate` (or, with target None, take `evict` off it,
        `how` = "sleep" or "stop") through the same drain -> sleep -> wake path as a request-driven switch.
        Blocks until done. Raises Conflict while another switch runs or is ordered, Unavailable when it
        failed, was aborted or did not finish within `timeout`."""
        return self.switching.order(gate, target, evict, how, timeout)

    def dispatch_once(self) -> float | None:
        """One dispatch pass, as the dispatcher thread makes it (for tests driving an injected clock).
        Returns when a time-based decision is next due, or None."""
        with self._lock:
            return self._dispatcher.pass_locked()

    def dispatcher_problem(self) -> str | None:
        """Why grants may not be made (the dispatcher thread died, or its last pass raised); None when fine."""
        return self._dispatcher.problem()

    def active(self) -> list[Job]:
        """The jobs granted and not yet finished, in grant order."""
        with self._lock:
            return list(self._active)

    # ---- reading ----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """A consistent view for status pages: counters add up because they are read under one lock."""
        with self._lock:
            now = self._clock()
            served = self.totals["served"]
            return {
                "pending": self._queued.depth,
                "active": len(self._active),
                "totals": dict(self.totals), "draining": self._closed is not None,
                "avg_latency_ms": round(1000 * self._latency_sum / served) if served else 0,
                "waiting": self._queued.view(now),
                "active_jobs": [{"id": j.id, "model": j.model, "priority": j.priority, "backend": j.backend,
                                 "gate": j.gate, "elapsed_s": round(now - (j.granted_at or now), 3)}
                                for j in self._active],
                "gates": {g.name: g.view() for g in self._gates.values()},
                "dispatcher": self.dispatcher_problem(),
                "backends": self._pool.view(),
            }
