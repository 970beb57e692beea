"""Jobs and their queues: one fair-queued `_Level` per (model, priority), and `Queues`, all of them.

Plain state: the Scheduler's lock guards every field here (see sluice/scheduler.py).

Each level is FIFO per client, clients interleaved fairly. Each client's head is its oldest job, so the
most-aged job of a level is among the heads: a level ranks by the best *effective* priority of its heads
(priority improved one level per `aging_s` waited), which gives exact aging without re-heaping (see
docs/design.md).
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from sluice import errors
from sluice.ids import new_id
from sluice.policies import Waiting

LEVELS = 5  # priorities 0 (P_CRITICAL) .. 4 (P_BG)


class Outcome(str, enum.Enum):
    OK = "ok"
    REJECTED = "rejected"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    ERROR = "error"


class JobState(enum.Enum):
    NEW = 0
    QUEUED = 1
    GRANTED = 2
    DONE = 3


COUNTER = {Outcome.OK: "served", Outcome.REJECTED: "rejected", Outcome.TIMEOUT: "timed_out",
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

    def waiter(self) -> threading.Event:
        """The Event its waiting thread sleeps on, made on first use (most jobs are granted inline and never
        wait: no Event for them). Called under the scheduler's lock."""
        if self._signal is None:
            self._signal = threading.Event()
        return self._signal

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


class Queues:
    """Every queued job, by model and priority, and how many there are (`depth`)."""

    def __init__(self, aging_s: float):
        self.aging_s = aging_s
        self.depth = 0
        self._levels: dict[str, list[_Level]] = {}

    def add(self, model: str) -> None:
        """Give `model` its queues (kept once made, even empty: see Scheduler.set_models)."""
        if model not in self._levels:
            self._levels[model] = [_Level() for _ in range(LEVELS)]

    def __contains__(self, model: str) -> bool:
        return model in self._levels

    def models(self) -> list[str]:
        return list(self._levels)

    def push(self, job: Job) -> None:
        self._levels[job.model][job.priority].push(job)
        self.depth += 1

    def pass_through(self, job: Job) -> None:
        self._levels[job.model][job.priority].pass_through(job)

    def remove(self, job: Job, granted: bool = False) -> None:
        self._levels[job.model][job.priority].remove(job, granted)
        self.depth -= 1

    def jobs(self, models: Iterable[str] | None = None) -> Iterator[Job]:
        """The queued jobs (of `models`, else all)."""
        for m in self._levels if models is None else models:
            for q in self._levels.get(m, ()):
                yield from q

    def has(self, models: Iterable[str]) -> bool:
        return any(q for m in models for q in self._levels.get(m, ()))

    def count(self, models: Iterable[str]) -> int:
        return sum(len(q) for m in models for q in self._levels[m])

    def of_client(self, client: str | None) -> int:
        return sum(len(q.by_client.get(client, ())) for qs in self._levels.values() for q in qs)

    def refusal(self, job: Job, max_depth: int) -> errors.SluiceError | None:
        """Why there is no room in the queue for `job`: its key's own limit, or the queue's; None if there is."""
        if job.max_queued is not None:
            mine = self.of_client(job.client)
            if mine >= job.max_queued:
                return errors.TooManyRequests(
                    f"key {job.client!r} already has {mine} queued request(s), its max_queued; retry later",
                    retry_after=1)
        if self.depth >= max_depth:
            return errors.QueueFull(
                f"queue full ({self.depth} waiting, limit SLUICE_MAX_QUEUE_DEPTH={max_depth}); "
                "retry later or raise the limit", retry_after=1,
                headers={"X-Queue-Position": str(self.depth + 1)})
        return None

    def view(self, now: float) -> list[dict]:
        """Every queued job, in the order it would be granted, for status pages."""
        return [{"id": j.id, "model": j.model, "priority": j.priority, "effective_priority": self.effective(j, now),
                 "age_s": round(now - j.enqueued_at, 3), "position": i + 1}
                for i, j in enumerate(sorted(self.jobs(), key=lambda j: (self.effective(j, now), j.seq)))]

    def effective(self, job: Job, now: float) -> int:
        return max(0, job.priority - int((now - job.enqueued_at) / self.aging_s))

    def position(self, job: Job, now: float) -> int:
        key = (self.effective(job, now), job.seq)
        return 1 + sum(1 for j in self.jobs() if (self.effective(j, now), j.seq) < key)

    def waiting(self, models: Iterable[str], now: float) -> tuple[Waiting, ...]:
        """The queued jobs of `models`, as a switch policy sees them."""
        return tuple(Waiting(j.model, self.effective(j, now), j.seq, j.enqueued_at) for j in self.jobs(models))

    def best(self, models: Iterable[str], now: float) -> Job | None:
        """Each non-empty level nominates its fair next job; a level ranks by its most-aged job (each
        client's head is that client's oldest), so aging lifts a level as soon as any of its jobs waited."""
        best, best_key = None, None
        for m in models:
            for q in self._levels[m]:
                if q:
                    job = q.nominee()
                    key = (min(self.effective(h, now) for h in q.heads()), job.seq)
                    if best_key is None or key < best_key:
                        best, best_key = job, key
        return best
