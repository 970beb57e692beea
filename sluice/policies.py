"""Switch policies for an exclusive gate: pure functions of a snapshot, so they are tested without threads.

The scheduler builds a `GateView` under its lock and asks `decide()` which model to serve next: the
resident one (keep serving), another (drain, then switch), or None (nothing waits). Rules every policy
honours, in this order:

0. a freshly woken model serves at least one of its waiting jobs before anything can take the gate
   away (without this, two models with overdue jobs would swap forever and serve nothing);
1. a P0 job of another model wins over a resident model with no P0 work (priority first);
2. a job of another model that has waited `max_wait_s` wins (checked by time: see `next_deadline`),
   unless the resident's own oldest job is about as late (within a round trip of switches, capped at
   max_wait_s): so no job waits much past 2 x max_wait_s, and overload does not turn into thrash;
3. `min_active_s`: otherwise the woken model keeps the gate until min_active_s passed, so A<->B cannot
   thrash;
then the policy itself:
- `fifo`: the model of the best waiting job (priority, then arrival);
- `cost-aware`: keep the resident model while it has work (coalescing its requests), unless a job more
  urgent than all of the resident's waits; when the resident has nothing left, wake the model whose
  waiting work (job-seconds already waited) minus the measured cost of switching to it (EMA per pair,
  seeded by config) is largest. With unequal switch costs it prefers the cheap neighbour;
- `drain-first`: finish the resident model's queue, then the model with the most urgent job (ties: the
  oldest wait).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping

POLICIES = ("fifo", "cost-aware", "drain-first")


@dataclass(frozen=True)
class Waiting:
    model: str
    priority: int        # effective priority (aging applied), 0 = most urgent
    seq: int
    enqueued_at: float


@dataclass(frozen=True)
class GateView:
    now: float
    resident: str | None
    inflight: int
    resident_since: float
    served_since_switch: int
    waiting: tuple[Waiting, ...]
    max_wait_s: float
    min_active_s: float


class SwitchCosts:
    """Measured seconds per (from, to) switch, as an exponential moving average seeded from config."""

    def __init__(self, seed_s: float = 5.0, alpha: float = 0.3,
                 seeds: Mapping[tuple[str | None, str], float] | None = None):
        self._seed = seed_s
        self._alpha = alpha
        self._ema: dict[tuple[str | None, str], float] = dict(seeds or {})
        self._lock = threading.Lock()

    def get(self, frm: str | None, to: str) -> float:
        with self._lock:
            return self._ema.get((frm, to), self._seed)

    def observe(self, frm: str | None, to: str, seconds: float) -> None:
        with self._lock:
            old = self._ema.get((frm, to))
            self._ema[(frm, to)] = seconds if old is None else old + self._alpha * (seconds - old)


def _best(jobs) -> Waiting:
    return min(jobs, key=lambda w: (w.priority, w.seq))


def _overrides(view: GateView, costs: SwitchCosts) -> str | None:
    """Rules 1 and 2, shared by every policy: a P0 the resident model cannot match, then an overdue job
    that has waited longer than the resident's own oldest by more than the round trip (under overload
    everything is overdue; switching for each late job would serve nothing but switches)."""
    others = [w for w in view.waiting if w.model != view.resident]
    if not others:
        return None
    mine = [w for w in view.waiting if w.model == view.resident]
    best_other = _best(others)
    if best_other.priority == 0 and min((w.priority for w in mine), default=5) > 0:
        return best_other.model
    overdue = [w for w in others if view.now - w.enqueued_at >= view.max_wait_s]
    if overdue:
        oldest = min(overdue, key=lambda w: (w.enqueued_at, w.seq))
        my_oldest = min((w.enqueued_at for w in mine), default=view.now)
        margin = min(_round_trip(costs, view.resident, oldest.model), view.max_wait_s)
        if not mine or my_oldest - oldest.enqueued_at > margin:
            return oldest.model
    return None


def _settling(view: GateView) -> bool:
    """Rule 3: the resident model was just woken and has not yet had its turn."""
    return view.served_since_switch < 1 or view.now - view.resident_since < view.min_active_s


def _work(view: GateView, model: str) -> float:
    return sum(view.now - w.enqueued_at for w in view.waiting if w.model == model)


def _round_trip(costs: SwitchCosts, resident: str, other: str) -> float:
    return costs.get(resident, other) + costs.get(other, resident)


def decide(policy: str, view: GateView, costs: SwitchCosts) -> str | None:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if not view.waiting:
        return None
    if view.resident is None:
        return _best(view.waiting).model
    mine = [w for w in view.waiting if w.model == view.resident]
    if mine and view.served_since_switch < 1:
        return view.resident
    forced = _overrides(view, costs)
    if forced is not None:
        return forced
    if mine and _settling(view):
        return view.resident
    if policy == "fifo":
        return _best(view.waiting).model
    if not mine:
        if policy == "cost-aware" and min(w.priority for w in view.waiting) == max(w.priority for w in view.waiting):
            return _next_by_cost(view, costs)
        return min(view.waiting, key=lambda w: (w.priority, w.enqueued_at, w.seq)).model
    if policy == "drain-first":
        return view.resident
    # cost-aware: a more urgent job elsewhere switches now; otherwise the resident keeps the gate while it
    # has work, and then the model whose waiting work best repays its switch cost goes next.
    best_other = _best([w for w in view.waiting if w.model != view.resident] or mine)
    if best_other.model != view.resident and best_other.priority < min(w.priority for w in mine):
        return best_other.model
    return view.resident


def _next_by_cost(view: GateView, costs: SwitchCosts) -> str:
    """The model to wake when the resident has nothing left: waiting work (job-seconds) minus the cost
    of getting there; ties go to the oldest wait."""
    models = {w.model for w in view.waiting}
    oldest = {m: min(w.enqueued_at for w in view.waiting if w.model == m) for m in models}
    return max(models, key=lambda m: (_work(view, m) - costs.get(view.resident, m), -oldest[m]))


def next_deadline(view: GateView, costs: SwitchCosts | None = None) -> float | None:
    """The earliest time after `now` at which `decide` could answer differently with no new arrival:
    a job of another model turning overdue, or the settling period ending."""
    times = [w.enqueued_at + view.max_wait_s for w in view.waiting if w.model != view.resident]
    if view.resident is not None:
        times.append(view.resident_since + view.min_active_s)
    future = [t for t in times if t > view.now]
    return min(future) if future else None
