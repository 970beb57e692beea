"""Jobs and the Scheduler: admission, priority queues, aging, cancellation and every grant.

Lock contract (as in CPython's queue.py): one mutex, `self._lock`, guards every field of the scheduler,
of each Job's scheduling state and of each Gate's counters. `self._work` (a Condition on that lock) is
notified whenever a grant might have become possible: a job arrived, a slot freed, a backend's health
changed. Grants are decided only under the lock: inline on submit when the gate is idle with nothing
waiting (the fast path), otherwise by the one dispatcher thread.

Queues are one `_Level` per (model, priority): FIFO per client, clients interleaved fairly. Each client's
head is its oldest job, so the most-aged job of a level is among the heads: a level ranks by the best
*effective* priority of its heads (priority improved one level per `aging_s` waited), which gives exact
aging without re-heaping (see docs/design.md).
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from sluice import errors
from sluice import policies
from sluice.gates import Gate, SwitchOrder
from sluice.ids import new_id
from sluice.policies import GateView, SwitchCosts, Waiting, next_deadline

log = logging.getLogger("sluice.scheduler")

LEVELS = 5  # priorities 0 (P_CRITICAL) .. 4 (P_BG)


class Outcome(str, enum.Enum):
    OK = "ok"
    REJECTED = "rejected"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    ERROR = "error"


class Health(str, enum.Enum):
    PENDING = "pending"   # not probed yet
    READY = "ready"
    DOWN = "down"         # its probe failed (on an exclusive gate that may just mean asleep: not trusted)
    FAILED = "failed"     # a managed backend out of restarts: down everywhere until an operator loads it


class JobState(enum.Enum):
    NEW = 0
    QUEUED = 1
    GRANTED = 2
    DONE = 3


_COUNTER = {Outcome.OK: "served", Outcome.REJECTED: "rejected", Outcome.TIMEOUT: "timed_out",
            Outcome.CANCELLED: "cancelled", Outcome.ERROR: "failed"}      # the totals key of each outcome


@dataclass(eq=False)
class Job:
    model: str                      # canonical model name (aliases resolved), or "cloud"
    priority: int = 2
    route: str = "/v1/query"
    payload: Any = None
    stream: bool = False
    timeout_s: float = 300.0
    id: str = field(default_factory=new_id)
    client: str | None = None       # API key name, for logs and fair share
    max_queued: int | None = None   # that key's limit on its own queued jobs (429 beyond)
    # Set by the scheduler:
    seq: int = 0
    tag: int = 0                    # fair-queuing tag within its priority level
    state: JobState = JobState.NEW
    enqueued_at: float = 0.0
    deadline: float = 0.0
    granted_at: float | None = None
    finished_at: float | None = None
    backend: str | None = None
    gate: str | None = None
    outcome: Outcome | None = None
    error: errors.SluiceError | None = None
    # Recorded by the request's thread while it serves the job:
    status: int = 0
    first_byte_at: float | None = None
    usage: dict | None = None
    cancel_hook: Callable[[], None] | None = None  # closes the upstream connection of a job in flight
    abort_error: errors.SluiceError | None = None  # why sluice (not the client) aborted it
    fallback_at: float | None = None  # when still queued at this time, leave the queue for the cloud route
    rerouted: bool = False            # it left its gate for the cloud route (fallback)
    _signal: threading.Event | None = field(default=None, repr=False)   # made by a waiter, under the lock

    def wake(self) -> None:
        """Wake the thread waiting for this job, if one is (the scheduler calls this under its lock)."""
        if self._signal is not None:
            self._signal.set()

    @property
    def wait_s(self) -> float:
        end = self.granted_at if self.granted_at is not None else self.finished_at
        return max(0.0, (end or self.enqueued_at) - self.enqueued_at)


class _Level:
    """The queue of one (model, priority): FIFO per client, clients interleaved by start-time fair queuing.

    A job's tag is max(level virtual time, its client's last tag) + 1, so a client with 500 queued jobs
    holds tags V+1..V+500 while another client's single job gets V+1 and runs next. With one client (no
    API keys) tags follow arrival order: plain FIFO.
    """

    __slots__ = ("by_client", "vtime", "last_tag", "n")

    def __init__(self):
        self.by_client: dict[str | None, deque[Job]] = {}
        self.vtime = 0
        self.last_tag: dict[str | None, int] = {}
        self.n = 0

    def push(self, job: "Job") -> None:
        job.tag = max(self.vtime, self.last_tag.get(job.client, 0)) + 1
        self.last_tag[job.client] = job.tag
        self.by_client.setdefault(job.client, deque()).append(job)
        self.n += 1

    def pass_through(self, job: "Job") -> None:
        """A job granted with nothing queued: tags and virtual time move as if it was queued and granted."""
        job.tag = self.vtime = max(self.vtime, self.last_tag.pop(job.client, 0)) + 1

    def remove(self, job: "Job", granted: bool = False) -> None:
        d = self.by_client[job.client]
        if d[0] is job:
            d.popleft()
        else:
            d.remove(job)
        self.n -= 1
        if granted:
            self.vtime = max(self.vtime, job.tag)
        if not d:
            del self.by_client[job.client]
            if self.last_tag.get(job.client, 0) <= self.vtime:
                self.last_tag.pop(job.client, None)   # an idle client starts again from the virtual time

    def heads(self):
        return [d[0] for d in self.by_client.values()]

    def nominee(self) -> "Job":
        """The fair next job of this level."""
        return min((d[0] for d in self.by_client.values()), key=lambda j: (j.tag, j.seq))

    def __iter__(self):
        return (j for d in self.by_client.values() for j in d)

    def __len__(self) -> int:
        return self.n


@dataclass(frozen=True)
class BackendSpec:
    """What the scheduler needs to know of a backend: where it sits and what it serves."""
    name: str
    gate: str
    models: frozenset[str]
    slots: int | None = None      # None: as many as the gate allows
    jit_swap: bool = False        # loads models on demand (LM Studio JIT): never mix models in flight


@dataclass
class _Backend:
    spec: BackendSpec
    gate: Gate
    slots: int
    inflight: int = 0
    health: Health = Health.PENDING
    current: str | None = None    # the model it last served (affinity; JIT drain guard while inflight)
    reserved: bool = False        # JIT: draining so a better-placed job for another model can load
    why: str | None = None        # what made it FAILED

    @property
    def out(self) -> bool:
        """It cannot take work now. A failed probe on an exclusive gate does not count: a sleeping backend
        fails its probe, and waking it is the switch's job."""
        return self.health is Health.FAILED or (self.health is Health.DOWN and not self.gate.exclusive)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def models(self) -> frozenset[str]:
        return self.spec.models

    def can_take(self, model: str) -> bool:
        if self.inflight >= self.slots or not self.gate.has_slot():
            return False
        if self.gate.exclusive:
            # Only the resident model's backend is awake; a failed probe of a sleeping one means nothing.
            if self.gate.resident != model or self.gate.drain_target is not None or self.gate.order is not None:
                return False
        elif self.health is not Health.READY:
            return False
        # Drain guard: a server that swaps models on demand must finish model A before it sees model B,
        # and takes no more A while a B that is ahead in the queue waits for it to drain.
        return not (self.spec.jit_swap and self.inflight and (self.current != model or self.reserved))


class Scheduler:
    """Owns pending jobs and slots. Knows nothing of HTTP.

    `gates`: GateConfig list; `backends`: BackendSpec list. `clock` is injected (monotonic seconds) so
    tests drive aging, timeouts and switch decisions without sleeping. `switcher(backend, action)` puts a
    backend to sleep or wakes it ("sleep" / "wake"), raising on failure; it runs on a switch thread.
    """

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
        self.aging_s = aging_s
        self.max_queue_depth = max_queue_depth
        self._on_finish = on_finish
        self._gates = {g.name: Gate(g) for g in gates}
        self._backends = {b.name: _Backend(b, self._gates[b.gate], b.slots or self._gates[b.gate].slots)
                          for b in backends}
        self._switcher = switcher or (lambda backend, action: None)
        self._on_switch = on_switch
        self._decide = decide or policies.decide      # injectable: a test's failing policy
        self._fault: str | None = None     # the last dispatch pass that raised, until one passes again
        self._costs = {g.name: SwitchCosts(seed_s=g.switch_cost_s) for g in gates}
        self._queues: dict[str, list[_Level]] = {}
        for b in self._backends.values():
            for m in b.models:
                self._queues.setdefault(m, [_Level() for _ in range(LEVELS)])
        self._seq = itertools.count()
        self._depth = 0
        # granted and not finished, in grant order; keyed by the job itself (a client's X-Request-Id may repeat)
        self._active: dict[Job, None] = {}
        self._closed: errors.SluiceError | None = None
        self._closing = False             # close() (shutdown) is final; a drain() can be resumed
        self._retired: frozenset[str] = frozenset()   # models that take no new jobs (see set_models)
        self._stale_switch: set[str] = set()          # gates whose running switch the model table overtook
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.totals = dict.fromkeys(("received", "served", "rejected", "timed_out", "cancelled", "failed"), 0)
        self._latency_sum = 0.0

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._dispatch_loop, name="sluice-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._work.notify_all()
        if self._thread:
            self._thread.join(timeout=5)

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
            queued = [j for qs in self._queues.values() for q in qs for j in q]
            for job in queued:
                self._finish_locked(job, Outcome.REJECTED, error)
        self._notify_finished(queued)
        return len(queued)

    def is_exclusive(self, gate: str) -> bool:
        return self._gates[gate].exclusive

    def busy(self, backend: str) -> bool:
        """Whether a backend has work in flight or waiting (idle unload must not happen then)."""
        with self._lock:
            b = self._backends[backend]
            return b.inflight > 0 or any(len(q) for m in b.models for q in self._queues[m])

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
            elif job.model not in self._queues:       # cloud: no gate, no queue
                self._grant_locked(job, None, now)
            else:
                free = self._candidates_locked(job.model)
                if free and not self._depth:
                    self._queues[job.model][job.priority].pass_through(job)   # nothing waits: no queue to pass
                    self._grant_locked(job, free[0], now)
                else:
                    job.state = JobState.QUEUED
                    self._queues[job.model][job.priority].push(job)
                    self._depth += 1
                    if not self._grant_fast_locked(job, free, now):
                        self._work.notify()
        if finished is not None:
            self._notify_finished([finished])
            raise finished.error

    def _refusal_locked(self, job: Job) -> errors.SluiceError | None:
        if self._closed is not None:
            return self._closed
        if job.model not in self._queues:
            return None
        if job.max_queued is not None:
            mine = sum(len(q.by_client.get(job.client, ())) for qs in self._queues.values() for q in qs)
            if mine >= job.max_queued:
                return errors.TooManyRequests(
                    f"key {job.client!r} already has {mine} queued request(s), its max_queued; retry later",
                    retry_after=1)
        if self._depth >= self.max_queue_depth:
            return errors.QueueFull(
                f"queue full ({self._depth} waiting, limit SLUICE_MAX_QUEUE_DEPTH={self.max_queue_depth}); "
                "retry later or raise the limit", retry_after=1,
                headers={"X-Queue-Position": str(self._depth + 1)})
        if job.model in self._retired:
            return errors.NotFound(f"model {job.model!r} was removed from the configuration; it takes no new "
                                   "requests", param="model", code="model_not_found")
        return self._unservable_locked(job.model)

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
                        headers={"X-Queue-Position": str(self._position_locked(job, now))})
                    self._finish_locked(job, Outcome.TIMEOUT, err)
                    break
                if job.fallback_at is not None and now >= job.fallback_at:
                    self._reroute_locked(job, now)
                    return
                due = next_tick - now if tick is not None else remaining
                if job.fallback_at is not None:
                    due = min(due, job.fallback_at - now)
                if due <= 0 and tick is not None:
                    position = self._position_locked(job, now)
                if job._signal is None:       # most jobs are granted inline and never wait: no Event for them
                    job._signal = threading.Event()
                signal = job._signal
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
            b = self._backends.get(backend)
            if b is None or b.health is health:
                return
            b.health, b.why = health, why
            if b.out:
                for model in b.models:
                    self._strand_locked(model, self._unservable_locked(model), failed)
            self._work.notify()
        self._notify_finished(failed)

    def set_models(self, serving: Mapping[str, Iterable[str]], *, known: Iterable[str] = (),
                   retired: Iterable[str] | None = None, reason: str = "is no longer served by any backend") -> None:
        """Replace which models backends serve, all in one step under the lock (manifest discovery, reload).

        `serving`: backend name -> every model it serves from now on (backends not named keep theirs; the
        set of backends itself is fixed). `known`: models that get a queue even while no backend serves them
        (their jobs are refused 503 until one does). `retired`, when given, replaces the set of models that
        take no new jobs but still serve the ones queued (a model a reload removed, until its queue empties).

        One step matters: a model moving from backend A to B never passes through "served by nobody".
        Jobs in flight are not touched (they finish where they are). Queued jobs of a model some backend
        still serves stay in place and go to whichever backend frees first; queued jobs of a model that no
        backend serves now (or only backends that are down) go to the cloud route (fallback) or are
        failed at once with 503 `model ... {reason}`: never left to time out.
        """
        failed: list[Job] = []
        with self._lock:
            unknown = set(serving) - set(self._backends)
            if unknown:
                raise ValueError(f"no backend named {', '.join(sorted(unknown))}")
            for name, models in serving.items():
                b = self._backends[name]
                new = frozenset(models)
                if new != b.spec.models:
                    self._unsettle_gate_locked(b, new)
                    b.spec = replace(b.spec, models=new)
            for m in itertools.chain(known, (m for b in self._backends.values() for m in b.models)):
                if m not in self._queues:
                    self._queues[m] = [_Level() for _ in range(LEVELS)]
            if retired is not None:
                self._retired = frozenset(retired)
            # Queues are kept even when empty and unserved: a request that resolved the model a moment
            # before the change must meet a clear 503 here, not be taken for a gate-less (cloud) job.
            for model, qs in self._queues.items():
                if any(qs):
                    self._strand_locked(model, self._unservable_locked(model, reason), failed)
            self._work.notify()
        self._notify_finished(failed)

    def has_jobs(self, model: str) -> bool:
        """Whether any job for `model` is queued or in flight."""
        with self._lock:
            return any(self._queues.get(model, ())) or any(j.model == model for j in self._active)

    # ---- internals (all *_locked: caller holds self._lock) -----------------------------------------
    def _unservable_locked(self, model: str, unserved: str | None = None) -> errors.SluiceError | None:
        """Why no backend can take `model` now (none serves it: `unserved` says why, all failed, all down);
        None while one can."""
        backends = []
        for b in self._backends.values():
            if model in b.models:
                if not b.out:
                    return None                  # the usual answer, found without building the rest
                backends.append(b)
        if not backends:
            why = f"model {model!r} {unserved}" if unserved else \
                f"no backend serves model {model!r} right now (none is configured for it or lists it at /v1/models)"
            return errors.Unavailable(f"{why}; retry later", retry_after=5)
        if all(b.health is Health.FAILED for b in backends):
            why = "; ".join(f"{b.name}: {b.why}" if b.why else b.name for b in backends)
            return errors.Unavailable(f"model {model!r} cannot be served: its backend failed and is not restarted "
                                      f"on its own ({why}); see /admin/status, then POST /admin/models/{model}/load "
                                      "to try again", retry_after=30)
        return errors.Unavailable(
            f"no backend for model {model!r} is up ({', '.join(b.name for b in backends)} down); "
            "start the inference server or check its URL, and retry when it is back", retry_after=5)

    def _strand_locked(self, model: str, err: errors.SluiceError | None, failed: list[Job]) -> None:
        """Every queued job of `model` has nowhere to go (`err` says why; None: it has somewhere, nothing to
        do): to the cloud route if it may, else failed now."""
        if err is None:
            return
        for job in [j for q in self._queues[model] for j in q]:
            if job.fallback_at is not None:
                self._reroute_locked(job, self._clock())
                job.wake()
                continue
            self._finish_locked(job, Outcome.ERROR, err)
            failed.append(job)

    def _unsettle_gate_locked(self, b: _Backend, new: frozenset[str]) -> None:
        """`b` is about to serve `new`. On an exclusive gate, if that changes which backends serve the
        resident model, the backend awake for it may no longer be the one that serves it (or a sleeping one
        now claims it): forget the resident, so the next grant goes through a full switch that drains, puts
        every other backend to sleep and wakes the right one."""
        gate = b.gate
        if not gate.exclusive:
            return
        if gate.switching:
            self._stale_switch.add(gate.name)     # the switch thread forgets it when it hands the gate back
        elif gate.resident is not None and (gate.resident in b.models) != (gate.resident in new):
            gate.resident = None

    def _position_locked(self, job: Job, now: float) -> int:
        key = (self._effective(job, now), job.seq)
        return 1 + sum(1 for qs in self._queues.values() for q in qs for j in q
                       if (self._effective(j, now), j.seq) < key)

    def _remove_locked(self, job: Job, granted: bool = False) -> None:
        self._queues[job.model][job.priority].remove(job, granted)
        self._depth -= 1

    def _let_go_locked(self, job: Job) -> None:
        """Take a job out of its queue, or give back the slot it holds."""
        if job.state is JobState.QUEUED:
            self._remove_locked(job)
        elif job.state is JobState.GRANTED and job.backend is not None:
            b = self._backends[job.backend]
            b.inflight -= 1
            b.gate.inflight -= 1
            if self._depth or b.gate.exclusive:     # wake the dispatcher only when a grant may follow
                self._work.notify()

    def _finish_locked(self, job: Job, outcome: Outcome, error: errors.SluiceError | None) -> None:
        if outcome is Outcome.OK and job.state is JobState.GRANTED and job.gate is not None \
                and self._gates[job.gate].exclusive:
            # cost-aware weighs each model's queue by how long its jobs hold the gate
            self._costs[job.gate].observe_service(job.model, self._clock() - job.granted_at)
        self._let_go_locked(job)
        if job in self._active:
            del self._active[job]
            if not self._active and self._idle_waiters:
                self._idle.notify_all()
        job.state = JobState.DONE
        job.outcome, job.error = outcome, error
        job.finished_at = self._clock()
        self.totals[_COUNTER[outcome]] += 1
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

    def _grant_locked(self, job: Job, backend: _Backend | None, now: float) -> None:
        if job.state is JobState.QUEUED:
            self._remove_locked(job, granted=True)
        if backend is not None:
            backend.inflight += 1
            backend.current = job.model
            backend.gate.inflight += 1
            backend.gate.served_since_switch += 1
            job.backend, job.gate = backend.name, backend.gate.name
        job.state = JobState.GRANTED
        job.granted_at = now
        self._active[job] = None
        job.wake()

    def _grant_fast_locked(self, job: Job, free: list[_Backend], now: float) -> bool:
        """Grant a just-queued job inline, on one of the backends `free` to take it, when its gate has nothing
        else waiting (no thread hop)."""
        for b in free:
            if self._waiting_on_locked(b.gate) == 1:     # only this job waits for the gate
                self._grant_locked(job, b, now)
                return True
        return False

    def _candidates_locked(self, model: str, gate: Gate | None = None) -> list[_Backend]:
        """Backends (on `gate`, if given) that can take `model` now: the one that already has it loaded
        first (affinity), then the least loaded."""
        free = [b for b in self._backends.values()
                if model in b.models and (gate is None or b.gate is gate) and b.can_take(model)]
        if len(free) < 2:
            return free
        return sorted(free, key=lambda b: (b.current != model, b.inflight / b.slots))

    def _waiting_on_locked(self, gate: Gate) -> int:
        models = {m for b in self._backends.values() if b.gate is gate for m in b.models}
        return sum(len(q) for m in models for q in self._queues[m])

    def _effective(self, job: Job, now: float) -> int:
        return max(0, job.priority - int((now - job.enqueued_at) / self.aging_s))

    def _best_locked(self, models, now: float) -> Job | None:
        """Each non-empty level nominates its fair next job; a level ranks by its most-aged job (each
        client's head is that client's oldest), so aging lifts a level as soon as any of its jobs waited."""
        best, best_key = None, None
        for m in models:
            for q in self._queues[m]:
                if q:
                    job = q.nominee()
                    key = (min(self._effective(h, now) for h in q.heads()), job.seq)
                    if best_key is None or key < best_key:
                        best, best_key = job, key
        return best

    def _dispatch_locked(self) -> float | None:
        """Grant what can be granted; returns when a time-based decision is next due (or None)."""
        now = self._clock()
        due: list[float] = []
        for gate in self._gates.values():
            when = self._dispatch_exclusive_locked(gate, now) if gate.exclusive else None
            if when is not None:
                due.append(when)
        # Shared gates (and the resident model of exclusive ones): best job among the models that a free
        # backend can take. A job blocked on one gate never blocks another gate (no head-of-line blocking).
        self._reserve_jit_locked(now)
        progress = True
        while progress and self._depth:
            progress = False
            for gate in self._gates.values():
                if not gate.has_slot():
                    continue
                runnable = {m for b in self._backends.values() if b.gate is gate for m in b.models
                            if b.can_take(m)}
                job = self._best_locked(runnable, now)
                if job is not None:
                    self._grant_locked(job, self._candidates_locked(job.model, gate)[0], now)
                    progress = True
        return min(due, default=None)

    def _reserve_jit_locked(self, now: float) -> None:
        """A swapping server whose best waiting job is for another model drains: it takes nothing more."""
        for b in self._backends.values():
            if b.spec.jit_swap:
                best = self._best_locked(b.models, now) if b.inflight else None
                b.reserved = best is not None and best.model != b.current

    def _gate_models_locked(self, gate: Gate) -> set[str]:
        return {m for b in self._backends.values() if b.gate is gate for m in b.models}

    def _dispatch_exclusive_locked(self, gate: Gate, now: float) -> float | None:
        """Decide whether an exclusive gate keeps serving its resident model or switches (drain first)."""
        if gate.switching:
            return None
        if gate.order is not None:
            return self._run_order_locked(gate, now)
        models = self._gate_models_locked(gate)
        waiting = tuple(Waiting(j.model, self._effective(j, now), j.seq, j.enqueued_at)
                        for m in models for q in self._queues[m] for j in q)
        view = GateView(now=now, resident=gate.resident, inflight=gate.inflight,
                        resident_since=gate.resident_since, served_since_switch=gate.served_since_switch,
                        waiting=waiting, max_wait_s=gate.config.max_wait_s, min_active_s=gate.config.min_active_s)
        target = self._decide(gate.config.policy, view, self._costs[gate.name]) if waiting else None
        if target is None or target == gate.resident:
            gate.drain_target = gate.drain_started = None   # nothing to switch to (a cancel can end a drain)
            return next_deadline(view, self._costs[gate.name]) if waiting else None
        if gate.drain_target != target:
            gate.drain_target, gate.drain_started = target, now
        if gate.inflight:
            deadline = gate.drain_started + gate.config.drain_timeout_s
            if now < deadline:
                return min(deadline, next_deadline(view, self._costs[gate.name]) or deadline)
            self._abort_gate_locked(gate, errors.Unavailable(
                f"cancelled after {gate.config.drain_timeout_s:g}s: gate {gate.name!r} must switch to model "
                f"{target!r} (drain_timeout_s); retry", retry_after=1))
            return None
        self._start_switch_locked(gate, target, now)
        return None

    def _abort_gate_locked(self, gate: Gate, err: errors.SluiceError) -> None:
        hooks = []
        for job in self._active:
            if job.gate == gate.name and job.abort_error is None:
                job.abort_error = err
                if job.cancel_hook is not None:
                    hooks.append(job.cancel_hook)
        # Hooks only shut sockets down; calling them under the lock cannot block.
        for hook in hooks:
            hook()

    def _run_order_locked(self, gate: Gate, now: float) -> float | None:
        """An operator's order overrides the policy: drain the resident if the order takes it down, then
        switch. Returns when to look again (the drain timeout), or None."""
        order = gate.order
        if order.target is not None or order.evict == gate.resident:
            if gate.inflight:
                if gate.drain_started is None:
                    gate.drain_started = now
                deadline = gate.drain_started + gate.config.drain_timeout_s
                if now < deadline:
                    return deadline
                self._abort_gate_locked(gate, errors.Unavailable(
                    f"cancelled after {gate.config.drain_timeout_s:g}s: an operator took model {gate.resident!r} "
                    f"off gate {gate.name!r} (drain_timeout_s); retry", retry_after=1))
                return None
        self._start_switch_locked(gate, order.target, now, order)
        return None

    def _start_switch_locked(self, gate: Gate, target: str | None, now: float,
                             order: SwitchOrder | None = None) -> None:
        old = gate.resident
        gate.switching = True
        gate.order = None                 # it travels with the switch thread now
        drain_s = now - gate.drain_started if gate.drain_started is not None else 0.0
        gate.drain_target = gate.drain_started = None
        mine = [b for b in self._backends.values() if b.gate is gate]
        if target is not None:
            sleepers = [b.name for b in mine if target not in b.models and (old is None or old in b.models)]
            wakers = [b.name for b in mine if target in b.models]
        else:                             # evict: its backends go down, unless one also serves the resident
            sleepers = [b.name for b in mine if order.evict in b.models
                        and (old is None or old == order.evict or old not in b.models)]
            wakers = []
        how = order.how if order is not None else "sleep"
        threading.Thread(target=self._switch, args=(gate, old, target, sleepers, wakers, drain_s, how, order),
                         name=f"sluice-switch-{gate.name}", daemon=True).start()

    def _take_down(self, gate: Gate, sleepers: list[str], how: str) -> str | None:
        """Put every sleeper to sleep (or stop it); None once each is verified asleep or gone, else why not.
        A failed sleep falls back to "stop", which for a server sluice does not run means: seen asleep
        (`/is_sleeping`) or gone. Anything else leaves it possibly awake, so the switch must not wake another."""
        for name in sleepers:
            try:
                self._switcher(name, how)
                continue
            except Exception as e:
                if how != "sleep":
                    return f"{how} {name} failed: {e}"
                log.warning("gate %s: sleeping %s failed (%s); stopping it instead", gate.name, name, e)
                first = e
            try:
                self._switcher(name, "stop")
            except Exception as e2:
                return f"putting {name} to sleep failed ({first}) and it is neither stopped nor seen asleep ({e2})"
        return None

    def _switch(self, gate: Gate, old: str | None, target: str | None, sleepers: list[str], wakers: list[str],
                drain_s: float, how: str = "sleep", order: SwitchOrder | None = None) -> None:
        """Runs off the dispatcher: take the old model down, bring the new one up, then hand the gate back.
        Whatever happens here (a bug included), the gate is handed back and waiting jobs are answered."""
        t0 = t1 = t2 = self._clock()
        phases = {"from": old, "to": target, "drain_s": round(drain_s, 3)}
        failure = aborted = None
        try:
            aborted = self._take_down(gate, sleepers, how)
            t1 = self._clock()
            if aborted is None:
                for name in wakers:
                    try:
                        self._switcher(name, "wake")
                    except Exception as e:
                        failure = f"waking {name} failed: {e}"
                        break
            t2 = self._clock()
        except Exception as e:        # a bug in the switch itself: fail safe (the old model may be awake)
            log.exception("gate %s: switch %s -> %s crashed", gate.name, old, target)
            aborted = f"the switch crashed: {e!r}"
        result = "aborted" if aborted else "failed" if failure else "ok"
        phases.update(sleep_s=round(t1 - t0, 3), wake_s=round(t2 - t1, 3), result=result)
        failed: list[Job] = []
        try:
            with self._lock:
                self._hand_back_locked(gate, old, target, wakers, order, phases, failure, aborted, t0, t2, failed)
            if aborted:
                log.error("gate %s: switch %s -> %s aborted, %s stays loaded: %s", gate.name, old, target, old,
                          aborted)
            elif failure:
                log.error("gate %s: switch %s -> %s failed: %s", gate.name, old, target, failure)
            else:
                log.info("gate %s: switched %s -> %s (drain %.2fs, sleep %.2fs, wake %.2fs)", gate.name, old,
                         target, drain_s, t1 - t0, t2 - t1)
            if self._on_switch is not None:
                try:
                    self._on_switch(gate.name, phases)
                except Exception:
                    log.exception("gate %s: on_switch callback failed", gate.name)
        finally:
            self._notify_finished(failed)
            if order is not None:
                if order.result is None and order.error is None:
                    order.error = errors.Unavailable("the switch ended without a result; see the log")
                order.done.set()

    def _hand_back_locked(self, gate: Gate, old, target, wakers, order, phases, failure, aborted,
                          t0: float, t2: float, failed: list[Job]) -> None:
        gate.switching = False
        gate.last_switch = phases
        stale = gate.name in self._stale_switch
        self._stale_switch.discard(gate.name)
        err = None
        if aborted:
            # Nothing was woken: the old model stays resident. The target's waiting jobs are answered now.
            gate.switch_failures += 1
            err = errors.Unavailable(f"model {target or order.evict!r} was not switched: {aborted}; "
                                     f"{old!r} stays loaded; retry later", retry_after=5)
        elif failure is None:
            if target is not None:
                gate.resident, gate.resident_since, gate.served_since_switch = target, t2, 0
                gate.switches += 1
                for name in wakers:
                    self._backends[name].health = Health.READY
                self._costs[gate.name].observe(old, target, t2 - t0)
            elif order is not None and old == order.evict:
                gate.resident = None
            if stale:      # the model table changed under the switch: the next grant switches afresh
                gate.resident = None
        else:
            # Nothing is awake now; fail this model's waiting jobs fast so the next model can go.
            gate.resident = None
            gate.switch_failures += 1
            err = errors.Unavailable(f"model {target!r} could not be loaded ({failure}); retry later",
                                     retry_after=5)
        if err is not None and target is not None:
            for job in [j for q in self._queues[target] for j in q]:
                failed.append(job)
                self._finish_locked(job, Outcome.ERROR, err)
        if order is not None:
            order.result, order.error = dict(phases, resident=gate.resident), err
        self._work.notify()

    def _dispatch_loop(self) -> None:
        with self._lock:
            while not self._stopping:
                try:
                    due = self._dispatch_locked()
                    timeout = None if due is None else max(0.0, due - self._clock())
                    self._fault = None
                except Exception as e:
                    # One bad pass must not end every grant: log it, say so in health, look again soon.
                    log.exception("dispatcher: a dispatch pass failed; retrying in 1s")
                    self._fault = f"a dispatch pass failed: {e!r}"
                    timeout = 1.0
                self._work.wait(timeout)

    # ---- switching on demand (operators) ----------------------------------------------------------
    def switch_now(self, gate: str, target: str | None, *, evict: str | None = None, how: str = "sleep",
                   timeout: float = 600.0) -> dict:
        """Make `target` the resident model of exclusive `gate` (or, with target None, take `evict` off it,
        `how` = "sleep" or "stop") through the same drain -> sleep -> wake path as a request-driven switch.
        Blocks until done. Raises Conflict while another switch runs or is ordered, Unavailable when it
        failed, was aborted or did not finish within `timeout`."""
        with self._lock:
            g = self._gates[gate]
            if not g.exclusive:
                raise ValueError(f"gate {gate!r} is not exclusive")
            if g.switching or g.order is not None:
                raise errors.Conflict(f"a model switch is running on gate {gate!r}; retry when it ends")
            if target is not None and target == g.resident:
                return {"from": target, "to": target, "result": "ok", "resident": target}
            order = g.order = SwitchOrder(target, evict, how)
            self._work.notify()
        if not order.done.wait(timeout):
            raise errors.Unavailable(f"the switch on gate {gate!r} is still running after {timeout:g}s; "
                                     "see /admin/status", retry_after=5)
        if order.error is not None:
            raise order.error
        return order.result

    def dispatch_once(self) -> float | None:
        """One dispatch pass, as the dispatcher thread makes it (for tests driving an injected clock).
        Returns when a time-based decision is next due, or None."""
        with self._lock:
            return self._dispatch_locked()

    def dispatcher_problem(self) -> str | None:
        """Why grants may not be made (the dispatcher thread died, or its last pass raised); None when fine."""
        t = self._thread
        if t is not None and not t.is_alive() and not self._stopping:
            return "the dispatcher thread is not running; queued requests are not granted (see the log)"
        return self._fault

    def service_cost(self, gate: str, model: str) -> float:
        """The gate's current estimate of one job's service seconds for `model` (measured EMA, else seeded)."""
        with self._lock:
            return self._costs[gate].service(model)

    def active(self) -> list[Job]:
        """The jobs granted and not yet finished, in grant order."""
        with self._lock:
            return list(self._active)

    def switch_cost(self, gate: str, frm: str | None, to: str) -> float:
        """The gate's current estimate of a switch's seconds (measured EMA, else the configured guess)."""
        with self._lock:
            return self._costs[gate].get(frm, to)

    # ---- reading ----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """A consistent view for status pages: counters add up because they are read under one lock."""
        with self._lock:
            now = self._clock()
            waiting = sorted((j for qs in self._queues.values() for q in qs for j in q),
                             key=lambda j: (self._effective(j, now), j.seq))
            served = self.totals["served"]
            return {
                "pending": self._depth,
                "active": len(self._active),
                "totals": dict(self.totals), "draining": self._closed is not None,
                "avg_latency_ms": round(1000 * self._latency_sum / served) if served else 0,
                "waiting": [{"id": j.id, "model": j.model, "priority": j.priority,
                             "effective_priority": self._effective(j, now), "age_s": round(now - j.enqueued_at, 3),
                             "position": i + 1} for i, j in enumerate(waiting)],
                "active_jobs": [{"id": j.id, "model": j.model, "priority": j.priority, "backend": j.backend,
                                 "gate": j.gate, "elapsed_s": round(now - (j.granted_at or now), 3)}
                                for j in self._active],
                "gates": {g.name: g.view() for g in self._gates.values()},
                "dispatcher": self.dispatcher_problem(),
                "backends": {b.name: {"health": b.health.value, "inflight": b.inflight, "slots": b.slots,
                                      "gate": b.gate.name, "current": b.current, "models": sorted(b.models)}
                             for b in self._backends.values()},
            }
