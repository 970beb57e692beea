"""Switch policies for an exclusive gate: pure functions of a snapshot, so they are tested without threads.

The scheduler builds a `GateView` under its lock and asks `decide()` which model to serve next: the
resident one (keep serving), another (drain, then switch), or None (nothing waits). Rules every policy
honours, in this order:

1. a job of another model that has waited `max_wait_s` wins (checked by time: see `next_deadline`);
2. a P0 job of another model wins over a resident model with no P0 work (priority first);
3. `min_active_s`: a freshly woken model keeps the gate until it served a job and min_active_s passed,
   so A<->B cannot livelock;
then the policy itself:
- `fifo`: the model of the best waiting job (priority, then arrival);
- `cost-aware`: keep the resident model while it has work, unless another model's waiting work outweighs
  the resident's own waiting work by more than the round trip the switch forces (resident -> other ->
  back, each the EMA of measured switch seconds), or a job more urgent than all of the resident's waits;
  work = job-seconds already waited (sum of ages). Weighing against the resident's own backlog and the
  way back is what stops A<->B thrash;
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


def _overrides(view: GateView) -> str | None:
    """Rules 1 and 2, shared by every policy: an overdue job, or a P0 the resident model cannot match."""
    others = [w for w in view.waiting if w.model != view.resident]
    if not others:
        return None
    overdue = [w for w in others if view.now - w.enqueued_at >= view.max_wait_s]
    if overdue:
        return min(overdue, key=lambda w: (w.enqueued_at, w.seq)).model
    best_other = _best(others)
    mine = [w.priority for w in view.waiting if w.model == view.resident]
    if best_other.priority == 0 and min(mine, default=5) > 0:
        return best_other.model
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
    forced = _overrides(view)
    if forced is not None:
        return forced
    mine = [w for w in view.waiting if w.model == view.resident]
    if mine and _settling(view):
        return view.resident
    if policy == "fifo":
        return _best(view.waiting).model
    if not mine:
        return min(view.waiting, key=lambda w: (w.priority, w.enqueued_at, w.seq)).model
    if policy == "drain-first":
        return view.resident
    # cost-aware
    best_other = _best([w for w in view.waiting if w.model != view.resident] or mine)
    if best_other.model != view.resident and best_other.priority < min(w.priority for w in mine):
        return best_other.model
    own = _work(view, view.resident)
    others = {w.model for w in view.waiting} - {view.resident}
    heavy = [(m, _work(view, m)) for m in others if _work(view, m) > own + _round_trip(costs, view.resident, m)]
    if heavy:
        return max(heavy, key=lambda mw: (mw[1], -min(w.seq for w in view.waiting if w.model == mw[0])))[0]
    return view.resident


def next_deadline(view: GateView, costs: SwitchCosts | None = None) -> float | None:
    """The earliest time after `now` at which `decide` could answer differently with no new arrival:
    a job turning overdue, the settling period ending, or (cost-aware) waiting work crossing the cost."""
    times = [w.enqueued_at + view.max_wait_s for w in view.waiting if w.model != view.resident]
    if view.resident is not None:
        times.append(view.resident_since + view.min_active_s)
        if costs is not None:
            mine = [w.enqueued_at for w in view.waiting if w.model == view.resident]
            for m in {w.model for w in view.waiting} - {view.resident}:
                theirs = [w.enqueued_at for w in view.waiting if w.model == m]
                # sum(t - e_m) - sum(t - e_r) = cost  =>  t = (cost + sum(e_m) - sum(e_r)) / (n_m - n_r)
                if len(theirs) > len(mine):
                    cost = _round_trip(costs, view.resident, m)
                    times.append((cost + sum(theirs) - sum(mine)) / (len(theirs) - len(mine)))
    future = [t for t in times if t > view.now]
    return min(future) if future else None
