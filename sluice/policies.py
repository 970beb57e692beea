"""Switch policies for an exclusive gate: pure functions of a snapshot, so they are tested without threads.

An exclusive gate holds one model at a time; switching means draining the in-flight requests, sleeping
the old model and waking the new one, which costs seconds. The scheduler builds a `GateView` under its
lock and asks `decide()` which model's job to grant next:

    the resident model  -> keep serving it (or keep it loaded while idle)
    another model       -> drain, then switch to it
    None                -> nothing waits

Every policy obeys the same rules first, in this order (each says why):

1. Nothing resident: wake the model of the best job (priority, then arrival); there is nothing to drain.
2. Priority first: a P0 job of another model takes the gate as soon as the current requests drain,
   unless the resident model has a P0 of its own waiting (that one goes first).
3. Starvation bound, checked by time and not on arrival (llmux checked it only when a request arrived,
   so a quiet gate let a job wait on): a job of another model that has waited `max_wait_s` takes the
   gate, unless the resident's own oldest job has waited nearly as long (less than max_wait_s less).
   Under overload every job is late; switching for each one would spend the GPU on switches and make
   the overload worse, so then each model keeps the gate for a max_wait_s window of its backlog. While
   the resident has a P0 waiting, only an overdue P0 elsewhere counts. `next_deadline()` tells the
   scheduler when to look again.
4. Settling: a freshly woken model keeps the gate until it has served one job it was woken for and
   `min_active_s` has passed (even while idle: that is what keeps a model warm between bursts). Only
   rules 2 and 3 override it.

None of this can livelock (switch back and forth, serving nothing): the model rule 2 switches to holds
a P0, which blocks rules 2 and 3 until it is served; the model rule 3 switches to holds the oldest job,
older than anything elsewhere (under `lookahead`: an overdue job within max_wait_s of it, which the overload
guard keeps); any other switch is followed by rule 4.

Then the policy itself:

- `fifo`: the model of the best waiting job (priority, then arrival). Thrashes on interleaved arrivals;
  it is the baseline (llmux's and llama-swap's behaviour).
- `drain-first`: serve the resident model while it has waiting jobs; then the model with the most urgent
  job, ties broken by the oldest wait.
- `cost-aware`: Smith's rule over per-model batches with switch times. A model's *work* is the
  priority-weighted service time of its waiting jobs: sum of weight(priority) x service(model), with
  weight 2**(4 - priority) (each level counts twice the next) and service(model) the measured seconds a
  job holds a slot (`SwitchCosts.service`). Its index is work per second of GPU time, counting the
  switch needed to reach it:

      index(m) = sum(weight) / (count(m) x service(m) + switch seconds)

  The resident needs no switch. Another model is charged the round trip while the resident still has
  work (those jobs will wait for the switch back) and the one-way switch when it has none. The gate
  goes to the highest index, ties to the oldest wait, then the model name; leaving the resident for o
  lowers the total weighted waiting exactly when index(o) > index(resident). Consequences: with equal
  priorities the resident keeps the gate while it has work, so interleaved requests coalesce; a more
  urgent job elsewhere wins only when its urgency repays the round trip (a P0 always does, rule 2);
  when the resident runs dry, cheap switches and big or urgent queues go first.

- `lookahead` (the default): cost-aware, except for which overdue model rule 3 serves when jobs of several
  are overdue (and no P0 waits): not simply the oldest, but the one whose visit first gives the lowest
  worst wait over a two-visit plan (its batch, then every other batch after its work and a switch), among
  those whose oldest job is within max_wait_s of the oldest (so the overload guard keeps it until it has
  served). Under a backlog it is the order, not the number, of visits that sets the worst wait; llmux's
  workloads (bench/README.md) are where it shows.

Switch and service times are exponential moving averages of measurements (`SwitchCosts`), seeded
from the configuration. `inflight` is carried for the scheduler (it drains before switching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

POLICIES = ("fifo", "cost-aware", "drain-first", "lookahead")


@dataclass(frozen=True)
class Waiting:
    """One runnable queued job on the gate. A cancelled or timed-out job is simply not here."""
    model: str
    priority: int        # effective priority, aging already applied: 0 = most urgent .. 4
    seq: int             # admission order, unique
    enqueued_at: float


@dataclass(frozen=True)
class GateView:
    now: float
    resident: str | None
    inflight: int
    resident_since: float          # when the resident model became resident (its wake finished)
    served_since_switch: int       # jobs granted to the resident model since then
    waiting: tuple[Waiting, ...]
    max_wait_s: float
    min_active_s: float


class SwitchCosts:
    """What the gate has measured: seconds per switch (from, to) and seconds per job of each model.

    Both are exponential moving averages. Until a pair is measured its switch cost is the configured guess
    (`seeds[(from, to)]`, else `seed_s`); until a model has finished a job its service time is `service_s`.
    The first measurement replaces the guess (a measurement beats a guess); later ones move the average by
    `alpha`. `from` is None for a wake with nothing resident. Not locked itself: every reader and writer
    (the dispatcher, a switch thread handing its gate back, a finishing request) holds the scheduler's lock.
    """

    def __init__(self, seed_s: float = 5.0, alpha: float = 0.3,
                 seeds: Mapping[tuple[str | None, str], float] | None = None, service_s: float = 2.0):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._seed = float(seed_s)
        self._service_seed = float(service_s)
        self._alpha = alpha
        self._guess = dict(seeds or {})
        self._switch: dict[tuple[str | None, str], float] = {}
        self._service: dict[str, float] = {}

    def get(self, frm: str | None, to: str) -> float:
        ema = self._switch.get((frm, to))
        return ema if ema is not None else self._guess.get((frm, to), self._seed)

    def observe(self, frm: str | None, to: str, seconds: float) -> None:
        self._update(self._switch, (frm, to), seconds)

    def service(self, model: str) -> float:
        return self._service.get(model, self._service_seed)

    def observe_service(self, model: str, seconds: float) -> None:
        self._update(self._service, model, seconds)

    def round_trip(self, frm: str | None, to: str) -> float:
        """There and back: what leaving `frm` costs while it still has work."""
        return self.get(frm, to) + (self.get(to, frm) if frm is not None else 0.0)

    def _update(self, table: dict, key, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return                       # a clock glitch must not poison the average
        old = table.get(key)
        table[key] = seconds if old is None else old + self._alpha * (seconds - old)


# ---- helpers -----------------------------------------------------------------------------------------

def _first(jobs: Iterable[Waiting]) -> Waiting:
    """The best job: most urgent, then first admitted (the scheduler's own order)."""
    return min(jobs, key=lambda w: (w.priority, w.seq))


def _oldest(jobs: Iterable[Waiting]) -> Waiting:
    """The longest-waiting job, most urgent first: ties broken deterministically."""
    return min(jobs, key=lambda w: (w.priority, w.enqueued_at, w.seq))


def _split(view: GateView) -> tuple[list[Waiting], list[Waiting]]:
    mine = [w for w in view.waiting if w.model == view.resident]
    others = [w for w in view.waiting if w.model != view.resident]
    return mine, others


# ---- rules every policy obeys ------------------------------------------------------------------------

def _forced(view: GateView) -> str | None:
    """Rules 2 and 3: a switch that overrides the policy and the settling period."""
    mine, others = _split(view)
    if not others:
        return None
    if any(w.priority == 0 for w in mine):
        # The resident's own P0 goes first; only a P0 elsewhere that has waited max_wait_s may still win.
        mine = [w for w in mine if w.priority == 0]
        others = [w for w in others if w.priority == 0]
        if not others:
            return None
    else:
        p0 = [w for w in others if w.priority == 0]
        if p0:
            return _oldest(p0).model
    oldest = min(others, key=lambda w: (w.enqueued_at, w.seq))
    if view.now - oldest.enqueued_at < view.max_wait_s:
        return None
    if not mine:
        return oldest.model
    # Overload guard: the resident's own backlog is nearly as old, so serve it; switching for each late
    # job would spend the GPU on switches. The overdue job waits at most one more max_wait_s window.
    if min(w.enqueued_at for w in mine) - oldest.enqueued_at > view.max_wait_s:
        return oldest.model
    return None


def _settling(view: GateView) -> bool:
    """Rule 4: the woken model has not served a job it was woken for yet, or min_active_s has not passed.
    A model whose jobs were all cancelled is held only for min_active_s (it has nothing to serve)."""
    has_work = any(w.model == view.resident for w in view.waiting)
    return (has_work and view.served_since_switch < 1) or view.now - view.resident_since < view.min_active_s


# ---- the policies ------------------------------------------------------------------------------------

def _fifo(view: GateView, costs: SwitchCosts) -> str:
    return _first(view.waiting).model


def _drain_first(view: GateView, costs: SwitchCosts) -> str:
    mine, _ = _split(view)
    if mine:
        return view.resident                               # finish the resident queue
    return _oldest(view.waiting).model                     # then the most urgent, oldest wait first


def _weight(priority: int) -> float:
    """What a job's urgency is worth: each level twice the next (P4 = 1 .. P0 = 16)."""
    return 2.0 ** (4 - min(4, max(0, priority)))


def _cost_aware(view: GateView, costs: SwitchCosts) -> str:
    """Smith's rule over per-model batches with switch times: serve the batch that delivers the most
    priority-weighted work per second of GPU time, counting the switch needed to reach it.

    index(m) = sum of the weights of m's waiting jobs / (count x service(m) + switch seconds), where the
    resident needs no switch and any other model is charged the round trip when the resident still has
    work (its jobs will wait for the switch back) or the one-way switch when it has none. Leaving the
    resident for o lowers the total weighted waiting exactly when index(o) > index(resident). With equal
    priorities that never holds, so the resident keeps the gate while it has work: requests coalesce.
    """
    mine, others = _split(view)
    r = view.resident
    if not others:
        return r
    by_model: dict[str, list[Waiting]] = {}
    for w in others:
        by_model.setdefault(w.model, []).append(w)

    def index(m: str, jobs: list[Waiting], switch_s: float) -> float:
        return sum(_weight(w.priority) for w in jobs) / max(len(jobs) * costs.service(m) + switch_s, 1e-9)

    keep = index(r, mine, 0.0) if mine else 0.0
    scored = {m: index(m, jobs, costs.round_trip(r, m) if mine else costs.get(r, m))
              for m, jobs in by_model.items()}
    # highest index, then the oldest wait, then the name (sorted, and max keeps the first): deterministic
    best = max(sorted(scored), key=lambda m: (scored[m], -min(w.enqueued_at for w in by_model[m])))
    return best if scored[best] > keep else r


def _batch(view: GateView, costs: SwitchCosts, model: str) -> tuple[float, float]:
    """A model's waiting jobs as one visit: (seconds of work, the worst wait if the visit started now).
    Jobs go in the scheduler's order (priority, then admission); the j-th starts (j-1) services in."""
    jobs = sorted((w for w in view.waiting if w.model == model), key=lambda w: (w.priority, w.seq))
    s = costs.service(model)
    return len(jobs) * s, max(view.now - w.enqueued_at + i * s for i, w in enumerate(jobs))


def _plan_score(view: GateView, costs: SwitchCosts, x: str) -> float:
    """The worst wait of a two-visit plan: X's batch right after the switch to it, then every other waiting
    batch Y (the resident's own included) after X's work and the switch X -> Y:

        score(X) = max(C(r, X) + worst(X),  max over Y of C(r, X) + work(X) + C(X, Y) + worst(Y))"""
    batches = {m: _batch(view, costs, m) for m in {w.model for w in view.waiting}}
    c = costs.get(view.resident, x)
    work_x, worst_x = batches[x]
    rest = [c + work_x + costs.get(x, y) + worst for y, (_, worst) in batches.items() if y != x]
    return max([c + worst_x] + rest)


def _lookahead_overdue(view: GateView, costs: SwitchCosts, forced: str) -> str:
    """Rule 3 under lookahead: when jobs of several models are overdue (and no P0 waits, rule 2's case),
    each is served within the same switch-or-two, so the one whose visit first keeps the worst wait lowest
    goes, not simply the oldest: a big old batch first makes a smaller, nearly as old one wait it out.
    Only a model whose oldest job is within max_wait_s of the oldest overdue one may go: rule 3's overload
    guard then keeps it until it has served (else the switch would be undone before it served a job)."""
    if any(w.priority == 0 for w in view.waiting):
        return forced
    others = [w for w in view.waiting if w.model != view.resident]
    oldest = min(w.enqueued_at for w in others)
    overdue = sorted({w.model for w in others if view.now - w.enqueued_at >= view.max_wait_s
                      and w.enqueued_at - oldest <= view.max_wait_s})
    if forced not in overdue or len(overdue) < 2:
        return forced
    return min(overdue, key=lambda m: (_plan_score(view, costs, m), m != forced, m))


_RULES: dict[str, Callable[[GateView, SwitchCosts], str]] = {
    "fifo": _fifo, "cost-aware": _cost_aware, "drain-first": _drain_first, "lookahead": _cost_aware}


def decide(policy: str, view: GateView, costs: SwitchCosts) -> str | None:
    """The model whose job the gate grants next: the resident (keep), another (drain, switch), None."""
    rule = _RULES.get(policy)
    if rule is None:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if not view.waiting:
        return None
    if view.resident is None:
        return _first(view.waiting).model
    forced = _forced(view)
    if forced is not None:
        return _lookahead_overdue(view, costs, forced) if policy == "lookahead" else forced
    if _settling(view):
        return view.resident
    return rule(view, costs)


def next_deadline(view: GateView, costs: SwitchCosts | None = None) -> float | None:
    """The earliest time after `now` at which `decide` could answer differently with no new arrival,
    grant or finish: a job of another model turning overdue (rule 3), or the settling period ending
    (rule 4). None when no such time exists. (Aging is the scheduler's: it re-evaluates on its own.)"""
    if not view.waiting or view.resident is None:
        return None
    times = [w.enqueued_at + view.max_wait_s for w in view.waiting if w.model != view.resident]
    times.append(view.resident_since + view.min_active_s)
    future = [t for t in times if t > view.now]
    return min(future) if future else None
