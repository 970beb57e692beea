"""REFERENCE BASELINES, NOT PRODUCT CODE: llmux's three switch policies re-expressed over sluice's GateView.

Re-implemented from reading doublewordai/llmux src/policy/{fifo,cost_aware,time_slice}.rs and the engine
of tests/policy_sim.rs (commit cf67a9f, before llmux dropped CostAware and TimeSlice), so that
bench/trace_sim.py can run them through sluice's real Scheduler (`Scheduler(decide=...)`) beside sluice's
own policies. Each is `decide(policy_name, view, costs) -> model | None` like `sluice.policies.decide`,
plus `deadline(view, costs)`: the next time its answer can change with no event (llmux's Defer timers).

llmux reacts to events (a request arriving for a model that is not active); a GateView is a snapshot. An
arrival that llmux would have reacted to is a waiting job of another model that arrived after the resident
finished waking (`enqueued_at >= resident_since`): llmux ignores arrivals during a switch. Shared engine
rules (policy_sim.rs):

- cold start: nothing resident, wake the first job's model (the simulator charges nothing for it);
- drain before switch (sluice's scheduler does that for every policy);
- `min_active_duration`: no switch until the resident has been active that long (llmux's cooldown);
- when the resident's queue is empty and nothing is in flight, switch to the model with the stalest job
  (the simulator does this after every finished job, for every policy).

Where these differ from llmux: the staleness bound is checked on arrival only, as llmux does (its known
defect), and CostAware's deferrals fire on time (production `Defer` sleeps), not at the next finished job.
"""

from __future__ import annotations

import math

from sluice.policies import GateView, SwitchCosts, Waiting

AMORTIZATION = 0.5       # llmux defaults (Report 4): required depth = ceil(0.5 x switch cost s)
COALESCE_S = 2.0


def _others(view: GateView) -> dict[str, list[Waiting]]:
    by: dict[str, list[Waiting]] = {}
    for w in sorted(view.waiting, key=lambda w: (w.enqueued_at, w.seq)):
        if w.model != view.resident:
            by.setdefault(w.model, []).append(w)
    return by


def _arrivals(view: GateView, jobs: list[Waiting]) -> list[Waiting]:
    """The jobs llmux saw arrive while this resident was active (each one ran its on_pending_request)."""
    return [w for w in jobs if w.enqueued_at >= view.resident_since]


def _common(view: GateView, min_active_s: float) -> tuple[bool, str | None]:
    """The engine's rules: (decided, answer)."""
    if not view.waiting:
        return True, None
    if view.resident is None:
        return True, min(view.waiting, key=lambda w: (w.enqueued_at, w.seq)).model
    if view.now - view.resident_since < min_active_s:
        return True, view.resident
    if not any(w.model == view.resident for w in view.waiting) and view.inflight == 0:
        return True, min(view.waiting, key=lambda w: (w.enqueued_at, w.seq)).model   # idle: the stalest
    return False, None


def _stale_arrival(view: GateView, jobs: list[Waiting], max_wait_s: float) -> float | None:
    """When an arrival for this model first found its oldest job max_wait_s old (llmux's staleness check)."""
    oldest = jobs[0].enqueued_at
    return next((w.enqueued_at for w in _arrivals(view, jobs) if w.enqueued_at - oldest >= max_wait_s), None)


class Fifo:
    """llmux FifoPolicy: SwitchNow on every request for another model; drain first; cooldown."""
    name = "llmux FIFO"

    def __init__(self, min_active_s: float = 0.0):
        self.min_active_s = min_active_s

    def decide(self, policy: str, view: GateView, costs: SwitchCosts) -> str | None:
        done, answer = _common(view, self.min_active_s)
        if done:
            return answer
        triggered = [(_arrivals(view, jobs), m) for m, jobs in _others(view).items()]
        triggered = [(a[0].enqueued_at, a[0].seq, m) for a, m in triggered if a]
        return min(triggered)[2] if triggered else view.resident

    def deadline(self, view: GateView, costs: SwitchCosts) -> float | None:
        t = view.resident_since + self.min_active_s
        return t if view.resident is not None and t > view.now else None


class CostAware:
    """llmux CostAwarePolicy, on each arrival for another model, in order: staleness -> SwitchNow; serving
    window (active < switch cost) -> Defer to its end; depth >= ceil(0.5 x cost) -> SwitchNow; else Defer
    for the 2 s coalesce window. A due deferral switches unconditionally (after the drain)."""
    name = "llmux CostAware"

    def __init__(self, max_wait_s: float, min_active_s: float = 0.0):
        self.max_wait_s = max_wait_s
        self.min_active_s = min_active_s

    def _due(self, view: GateView, costs: SwitchCosts) -> dict[str, float]:
        due = {}
        for m, jobs in _others(view).items():
            cost = costs.get(view.resident, m)
            required = max(1, math.ceil(AMORTIZATION * cost))
            times = []
            for depth, w in enumerate(jobs, 1):
                a = w.enqueued_at
                if a < view.resident_since:
                    continue
                if a - jobs[0].enqueued_at >= self.max_wait_s:
                    times.append(a)
                elif a - view.resident_since < cost:
                    times.append(view.resident_since + cost)
                elif depth >= required:
                    times.append(a)
                else:
                    times.append(a + COALESCE_S)
            if times:
                due[m] = min(times)
        return due

    def decide(self, policy: str, view: GateView, costs: SwitchCosts) -> str | None:
        done, answer = _common(view, self.min_active_s)
        if done:
            return answer
        ready = [(t, m) for m, t in self._due(view, costs).items() if t <= view.now]
        return min(ready)[1] if ready else view.resident

    def deadline(self, view: GateView, costs: SwitchCosts) -> float | None:
        if view.resident is None:
            return None
        times = [t for t in self._due(view, costs).values()] + [view.resident_since + self.min_active_s]
        future = [t for t in times if t > view.now]
        return min(future) if future else None


class TimeSlice:
    """llmux TimeSlicePolicy: never preempt; when the resident has drained (nothing queued or in flight),
    switch to the deepest queue; the only reactive switch is the staleness check on arrival."""
    name = "llmux TimeSlice"

    def __init__(self, max_wait_s: float, min_active_s: float = 0.0):
        self.max_wait_s = max_wait_s
        self.min_active_s = min_active_s

    def decide(self, policy: str, view: GateView, costs: SwitchCosts) -> str | None:
        if not view.waiting:
            return None
        if view.resident is None:
            return min(view.waiting, key=lambda w: (w.enqueued_at, w.seq)).model
        if view.now - view.resident_since < self.min_active_s:
            return view.resident
        others = _others(view)
        stale = [(t, m) for m, jobs in others.items()
                 if (t := _stale_arrival(view, jobs, self.max_wait_s)) is not None]
        if stale:
            return min(stale)[1]
        if any(w.model == view.resident for w in view.waiting) or view.inflight:
            return view.resident
        # deepest queue; llmux's max_by_key over a HashMap breaks ties arbitrarily: the stalest here
        return max(others, key=lambda m: (len(others[m]), -others[m][0].enqueued_at))

    def deadline(self, view: GateView, costs: SwitchCosts) -> float | None:
        t = view.resident_since + self.min_active_s
        return t if view.resident is not None and t > view.now else None


def baselines(max_wait_s: float, min_active_s: float = 0.0) -> list:
    return [Fifo(min_active_s), CostAware(max_wait_s, min_active_s), TimeSlice(max_wait_s, min_active_s)]
