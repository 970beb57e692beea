"""Switch policies as pure functions: each shared rule, each policy, the EMA, next_deadline, determinism,
and the llmux defects (starvation checked only on arrival, A<->B livelock, cancelled jobs switching)."""

from __future__ import annotations

import math
import random

import pytest

from sluice.policies import POLICIES, GateView, SwitchCosts, Waiting, decide, next_deadline


def view(waiting=(), resident="a", now=100.0, served=5, since=0.0, max_wait=60.0, min_active=0.0, inflight=0):
    """waiting: (model, priority, enqueued_at) tuples; seq follows arrival (then listing) order."""
    order = sorted(range(len(waiting)), key=lambda i: (waiting[i][2], i))
    ws = tuple(Waiting(m, p, order.index(i), e) for i, (m, p, e) in enumerate(waiting))
    return GateView(now=now, resident=resident, inflight=inflight, resident_since=since, served_since_switch=served,
                    waiting=ws, max_wait_s=max_wait, min_active_s=min_active)


def costs(seed=10.0, service=2.0, **pairs):
    """pairs: ab=1.0 sets the a->b switch cost."""
    return SwitchCosts(seed_s=seed, service_s=service, seeds={(k[0], k[1]): v for k, v in pairs.items()})


# ---- basics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_nothing_waiting_is_none_and_nothing_resident_takes_the_best_job(policy):
    assert decide(policy, view([]), costs()) is None
    assert decide(policy, view([("b", 2, 99), ("c", 1, 99.5)], resident=None), costs()) == "c"
    assert decide(policy, view([("b", 2, 99), ("c", 2, 99.5)], resident=None), costs()) == "b"


def test_unknown_policy_is_an_error_even_with_nothing_waiting():
    for v in (view([("a", 1, 1)]), view([])):
        with pytest.raises(ValueError, match="unknown policy 'random'"):
            decide("random", v, costs())


# ---- rule 2: priority first --------------------------------------------------------------------------

P0_CASES = [
    # (name, view kwargs, {policy: expected})
    ("P0 elsewhere beats lower resident work",
     dict(waiting=[("a", 3, 90), ("b", 0, 99)]), {None: "b"}),
    ("P0 elsewhere even while the woken model settles",
     dict(waiting=[("a", 3, 99), ("b", 0, 99.5)], served=0, since=99.0, min_active=30), {None: "b"}),
    ("resident's own P0 goes first",
     dict(waiting=[("a", 0, 99), ("b", 0, 98)]), {None: "a", "fifo": "b"}),   # fifo: the older P0
    ("the oldest P0 elsewhere picks the model",
     dict(waiting=[("a", 2, 1), ("c", 0, 99), ("b", 0, 98)]), {None: "b"}),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name,kw,expect", P0_CASES, ids=[c[0] for c in P0_CASES])
def test_priority_first(policy, name, kw, expect):
    assert decide(policy, view(**kw), costs()) == expect.get(policy, expect[None])


# ---- rule 3: max_wait_s, by time ---------------------------------------------------------------------

OVERDUE_CASES = [
    # now = 130 unless said: b's job at 69 has waited 61 s, the one at 70.5 only 59.5 s
    ("not yet overdue: the policy decides", dict(waiting=[("a", 2, 129.5), ("b", 2, 70.5)], now=130),
     {None: "a", "fifo": "b"}),
    ("overdue", dict(waiting=[("a", 2, 129.5), ("b", 2, 69)], now=130), {None: "b"}),
    ("overdue beats a more urgent resident job", dict(waiting=[("a", 1, 129.5), ("b", 4, 69)], now=130),
     {None: "b"}),
    ("overdue beats settling", dict(waiting=[("a", 2, 129.5), ("b", 2, 69)], now=130, since=125, min_active=30),
     {None: "b"}),
    ("overdue while the resident idles, by time alone", dict(waiting=[("b", 2, 69)], now=130, min_active=1e9),
     {None: "b"}),
    ("resident jobs that came before it was overdue go first", dict(waiting=[("a", 2, 20), ("b", 2, 5)]),
     {None: "a", "fifo": "b"}),
    ("resident jobs that came after it wait", dict(waiting=[("a", 2, 70), ("b", 2, 5)], now=130), {None: "b"}),
    ("a resident P0 waits first", dict(waiting=[("a", 0, 129.5), ("b", 2, 10)], now=130), {None: "a"}),
    ("an overdue P0 elsewhere still wins", dict(waiting=[("a", 0, 129.5), ("b", 0, 60)], now=130), {None: "b"}),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name,kw,expect", OVERDUE_CASES, ids=[c[0] for c in OVERDUE_CASES])
def test_max_wait(policy, name, kw, expect):
    assert decide(policy, view(**kw), costs()) == expect.get(policy, expect[None])


# ---- rule 4: settling (min_active_s) -----------------------------------------------------------------

SETTLE_CASES = [
    ("woken model serves one job first", dict(waiting=[("a", 3, 99.9), ("b", 1, 50)], served=0, since=99),
     {None: "a"}),
    ("then min_active_s holds it", dict(waiting=[("a", 3, 99.9), ("b", 1, 50)], served=1, since=99, min_active=5),
     {None: "a"}),
    ("even while idle", dict(waiting=[("b", 1, 50)], served=1, since=99, min_active=5), {None: "a"}),
    ("then the policy decides", dict(waiting=[("a", 3, 99.9), ("b", 1, 50)], served=1, since=90, min_active=5),
     {"fifo": "b", "drain-first": "a", "cost-aware": "a", "lookahead": "a"}),
    ("its jobs were cancelled: held for min_active_s only", dict(waiting=[("b", 2, 99)], served=0, since=90,
                                                               min_active=5), {None: "b"}),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name,kw,expect", SETTLE_CASES, ids=[c[0] for c in SETTLE_CASES])
def test_settling(policy, name, kw, expect):
    assert decide(policy, view(**kw), costs()) == expect.get(policy, expect.get(None))


# ---- the policies ------------------------------------------------------------------------------------

POLICY_CASES = [
    # (policy, waiting, costs kwargs, expected, why)
    ("fifo", [("b", 2, 1), ("a", 2, 2)], {}, "b", "the oldest job"),
    ("fifo", [("a", 2, 1), ("b", 2, 2)], {}, "a", "the oldest job is resident"),
    ("fifo", [("a", 2, 1), ("b", 1, 2)], {}, "b", "priority before age"),
    ("drain-first", [("b", 1, 10), ("a", 3, 99)], {}, "a", "resident queue first, whatever waits"),
    ("drain-first", [("b", 3, 10), ("c", 1, 50)], {}, "c", "then the most urgent"),
    ("drain-first", [("c", 2, 10), ("b", 2, 20)], {}, "c", "tie: the oldest wait"),
    ("drain-first", [("b", 2, 10), ("b", 2, 10), ("c", 2, 10)], {}, "b", "tie on age: admission order"),
    # cost-aware, resident has work: index(a) = weights / (n x 2 s); index(b) adds the round trip
    ("cost-aware", [("a", 2, 99)] + [("b", 2, 80)] * 10, {}, "a", "equal priority: coalesce"),
    ("cost-aware", [("a", 3, 99)] * 2 + [("b", 1, 99)], dict(ab=1, ba=1), "b", "urgent, cheap: 8/4 > 4/4"),
    ("cost-aware", [("a", 3, 99)] * 2 + [("b", 1, 99)], {}, "a", "urgent, dear: 8/22 < 4/4"),
    ("cost-aware", [("a", 2, 99)] * 5 + [("b", 1, 99)], dict(ab=2, ba=2), "a", "one urgent job vs five: 8/6 < 20/10"),
    # cost-aware, resident idle: index(m) = weights / (n x 2 s + one-way switch)
    ("cost-aware", [("b", 2, 50)] * 2 + [("c", 2, 60)] * 2, dict(ab=10, ac=2), "c", "the cheap neighbour"),
    ("cost-aware", [("b", 2, 50)] * 12 + [("c", 2, 60)] * 2, dict(ab=10, ac=2), "b", "unless much more waits"),
    ("cost-aware", [("b", 3, 50)] * 2 + [("c", 1, 60)] * 2, dict(ab=2, ac=10), "c", "or it is more urgent"),
    ("cost-aware", [("c", 2, 50), ("b", 2, 60)], {}, "c", "tie: the oldest wait"),
    ("cost-aware", [("c", 2, 50), ("b", 2, 50)], {}, "b", "tie on age: the model name"),
]


@pytest.mark.parametrize("policy,waiting,ckw,expected,why", POLICY_CASES, ids=[f"{c[0]}: {c[4]}" for c in POLICY_CASES])
def test_policy(policy, waiting, ckw, expected, why):
    assert decide(policy, view(waiting, max_wait=600), costs(**ckw)) == expected


def test_cost_aware_uses_measured_service_times():
    # idle resident; b and c alike, but b's jobs measure 20 s each: c's queue is worth more per GPU second
    c = costs(ab=2, ac=2)
    v = view([("b", 2, 50), ("c", 2, 60)], max_wait=600)
    assert decide("cost-aware", v, c) == "b"          # tie on the guess: the oldest wait
    c.observe_service("b", 20.0)
    assert decide("cost-aware", v, c) == "c"


# ---- SwitchCosts -------------------------------------------------------------------------------------

def test_switch_cost_ema():
    c = SwitchCosts(seed_s=5.0, alpha=0.5, seeds={("a", "b"): 8.0})
    steps = [  # (call, expected a->b, expected b->a)
        (None, 8.0, 5.0),                              # the configured guesses
        (("b", "a", 4.0), 8.0, 4.0),                   # the first measurement replaces the guess
        (("b", "a", 8.0), 8.0, 6.0),                   # then 4 + 0.5 x (8 - 4)
        (("a", "b", 2.0), 2.0, 6.0),
        (("a", "b", 4.0), 3.0, 6.0),                   # 2 + 0.5 x (4 - 2)
        (("a", "b", -1.0), 3.0, 6.0),                  # nonsense is ignored
        (("a", "b", math.nan), 3.0, 6.0),
        (("a", "b", math.inf), 3.0, 6.0),
    ]
    for call, ab, ba in steps:
        if call:
            c.observe(*call)
        assert (c.get("a", "b"), c.get("b", "a")) == (ab, ba)
    assert c.round_trip("a", "b") == 9.0 and c.round_trip(None, "b") == c.get(None, "b") == 5.0


def test_service_ema_and_alpha_bounds():
    c = SwitchCosts(service_s=3.0, alpha=0.25)
    assert c.service("x") == 3.0
    c.observe_service("x", 1.0)
    c.observe_service("x", 5.0)
    assert c.service("x") == 2.0                       # 1 + 0.25 x (5 - 1)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            SwitchCosts(alpha=bad)


# ---- next_deadline -----------------------------------------------------------------------------------

DEADLINE_CASES = [
    ("another model's job turns overdue", dict(waiting=[("a", 2, 99), ("b", 2, 70)]), 130.0),
    ("settling ends first", dict(waiting=[("a", 2, 99), ("b", 2, 70)], since=95, min_active=10), 105.0),
    ("the resident's own jobs never force anything", dict(waiting=[("a", 2, 10)]), None),
    ("already overdue: nothing later", dict(waiting=[("b", 2, 10)], since=0, min_active=0), None),
    ("nothing waits", dict(waiting=[]), None),
    ("nothing resident", dict(waiting=[("b", 2, 10)], resident=None), None),
]


@pytest.mark.parametrize("name,kw,expected", DEADLINE_CASES, ids=[c[0] for c in DEADLINE_CASES])
def test_next_deadline(name, kw, expected):
    assert next_deadline(view(**kw), costs()) == expected


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("waiting,kw,final", [
    ([("b", 2, 90)], dict(since=95, min_active=10), "b"),                   # settling ends at 105
    ([("b", 2, 70)], dict(since=95, min_active=1000), "b"),                 # kept warm, b overdue at 130
    ([("a", 2, 96), ("b", 2, 70)], dict(since=95, min_active=10, served=0), None),
])
def test_decision_changes_only_at_the_deadline(policy, waiting, kw, final):
    """Between now and next_deadline the answer holds, so the scheduler may sleep until then."""
    c = costs()
    now, answers = 96.0, []
    kw = {"served": 1, **kw}
    while True:
        v = view(waiting, now=now, **kw)
        answers.append(decide(policy, v, c))
        due = next_deadline(v, c)
        if due is None:
            break
        assert due > now
        for t in (now + (due - now) * f for f in (0.25, 0.5, 0.99)):
            assert decide(policy, view(waiting, now=t, **kw), c) == answers[-1]
        now = due
    if final is not None:
        assert answers[0] == "a" and answers[-1] == final


# ---- the llmux defects -------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_starvation_is_checked_by_time_not_on_arrival(policy):
    """llmux looked at waiting times only when a request arrived, so on a quiet gate an old job waited on.
    Here the same queue, later, gives a different answer, and next_deadline says exactly when."""
    quiet = dict(waiting=[("b", 3, 50.0)], served=3, since=0, min_active=1000)     # a is kept warm, idle
    early = view(now=100.0, **quiet)
    assert decide(policy, early, costs()) == "a"
    due = next_deadline(early, costs())
    assert due == 110.0
    assert decide(policy, view(now=due, **quiet), costs()) == "b"


@pytest.mark.parametrize("policy", POLICIES)
def test_a_cancelled_job_never_triggers_a_switch(policy):
    """The scheduler leaves cancelled jobs out of the view; nothing else may remember them."""
    with_b = view([("a", 2, 99), ("b", 0, 50)])
    assert decide(policy, with_b, costs()) == "b"
    cancelled = view([("a", 2, 99)])
    assert decide(policy, cancelled, costs()) == "a"
    assert next_deadline(cancelled, costs()) is None
    assert decide(policy, view([]), costs()) is None


def simulate(policy, arrivals, *, service=1.0, switch=5.0, max_wait=600.0, min_active=0.0, seed_cost=5.0):
    """A tiny gate with one slot: arrivals (time, model, priority) -> (switches, grant order, grants), where
    grants are (model, enqueued_at, granted_at). Fails if the gate switches twice without serving (livelock)."""
    c = SwitchCosts(seed_s=seed_cost)
    pending = sorted(arrivals)
    queue, order, grants = [], [], []
    now, resident, since, served, switches, seq, idle_switch = 0.0, None, 0.0, 0, 0, 0, False
    while pending or queue:
        while pending and pending[0][0] <= now:
            t, m, p = pending.pop(0)
            queue.append(Waiting(m, p, seq, t))
            seq += 1
        v = GateView(now, resident, 0, since, served, tuple(queue), max_wait, min_active)
        target = decide(policy, v, c)
        if target is None or (target == resident and not any(w.model == resident for w in queue)):
            due = next_deadline(v, c)
            now = min([x for x in (due, pending[0][0] if pending else None) if x is not None])
            continue
        if target != resident:
            assert not idle_switch, f"livelock: switched twice without serving ({order})"
            c.observe(resident, target, switch)
            resident, since, served, switches, idle_switch = target, now + switch, 0, switches + 1, True
            now += switch
            continue
        job = min((w for w in queue if w.model == resident), key=lambda w: (w.priority, w.seq))
        queue.remove(job)
        order.append(job.model)
        grants.append((job.model, job.enqueued_at, now))
        served, idle_switch = served + 1, False
        now += service
    return switches, "".join(order), grants


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name,arrivals", [
    ("both sides overdue", [(0, "a", 2), (0, "b", 2)] + [(t, m, 2) for t in range(1, 200, 2) for m in "ab"]),
    ("resident P0 while the other is overdue", [(0, "a", 2)] * 3 + [(1, "b", 2)] + [(70, "a", 0), (70.5, "a", 0)]),
    ("P0 on both sides", [(0, "a", 0), (0, "b", 0), (0.1, "a", 0), (0.1, "b", 0)] * 3),
])
def test_no_livelock_between_two_models(policy, name, arrivals):
    """llmux could swap A<->B forever without serving; every switch here is followed by a served job."""
    switches, order, _ = simulate(policy, arrivals, service=3.0, switch=10.0, max_wait=20.0)
    assert len(order) == len(arrivals)


def test_interleaved_arrivals_cost_at_most_two_switches_under_cost_aware():
    """A, B, A, B ... arriving faster than they are served: coalesce instead of swapping per request."""
    arrivals = [(0.5 * i, "ab"[i % 2], 2) for i in range(20)]
    switches, order, _ = simulate("cost-aware", arrivals, service=1.0, switch=8.0)
    assert switches <= 2 and order == "a" * 10 + "b" * 10
    fifo_switches, _, _ = simulate("fifo", arrivals, service=1.0, switch=8.0)
    assert fifo_switches == 20                     # the baseline thrashes on every request


@pytest.mark.parametrize("policy", POLICIES)
def test_overdue_work_goes_before_anything_that_came_after_it_was_due(policy):
    """A steady stream for `a` would keep the gate forever under cost-aware or drain-first. A `b` job that
    has waited max_wait_s is served before any `a` job that arrived after that moment, so it waits at most
    max_wait_s + the resident's backlog at that moment + the drain + the switch."""
    arrivals = [(t, "a", 2) for t in range(0, 300)] + [(5.5, "b", 2), (150.5, "b", 2)]
    _, order, grants = simulate(policy, arrivals, service=0.9, switch=5.0, max_wait=30.0)
    assert order.count("b") == 2
    if policy != "fifo":                       # coalescing kept `a` until the first `b` was overdue
        assert grants[[g[0] for g in grants].index("b")][2] - 5.5 > 30.0
    for model, enqueued, granted in grants:
        if model == "b":
            due = enqueued + 30.0
            assert not [g for g in grants if g[0] == "a" and g[1] > due and g[2] < granted]
            assert granted - enqueued <= 30.0 + 5 * 0.9 + 0.9 + 5.0


# ---- determinism -------------------------------------------------------------------------------------

def random_view(rng):
    models = "abc"
    waiting = tuple(Waiting(rng.choice(models), rng.randint(0, 4), i, round(rng.uniform(0, 100), 1))
                    for i in range(rng.randint(0, 8)))
    return GateView(now=100.0 + rng.uniform(0, 30), resident=rng.choice([None, *models]), inflight=rng.randint(0, 2),
                    resident_since=rng.uniform(50, 120), served_since_switch=rng.randint(0, 2), waiting=waiting,
                    max_wait_s=rng.choice([10.0, 60.0]), min_active_s=rng.choice([0.0, 20.0]))


@pytest.mark.parametrize("policy", POLICIES)
def test_decisions_are_deterministic_and_well_formed(policy):
    """The answer depends on the snapshot only, not on the order of `waiting`; it is None exactly when nothing
    waits, and otherwise the resident or a model with waiting work; next_deadline lies in the future."""
    rng = random.Random(2024)
    c = costs(ab=3, ba=4, ac=12, ca=12, bc=9, cb=9)
    for _ in range(3000):
        v = random_view(rng)
        answer = decide(policy, v, c)
        shuffled = list(v.waiting)
        rng.shuffle(shuffled)
        assert decide(policy, GateView(**{**v.__dict__, "waiting": tuple(shuffled)}), c) == answer
        if not v.waiting:
            assert answer is None
        else:
            assert answer == v.resident or answer in {w.model for w in v.waiting}
        due = next_deadline(v, c)
        assert due is None or due > v.now


# ---- lookahead: which overdue model rule 3 serves -----------------------------------------------------

def three_overdue(c_jobs=20, a_jobs=10):
    """llmux's three_model at 20 s switches, at t=35: b just drained; c (oldest, 6 s) has twice a's work."""
    return view([("c", 2, 6.0 + 0.1 * i) for i in range(10)] + [("c", 2, 15.0 + 0.1 * i) for i in range(c_jobs - 10)]
                + [("a", 2, 9.0 + 0.1 * i) for i in range(a_jobs)], resident="b", now=35.0, max_wait=15.0)


def test_lookahead_serves_the_overdue_batch_that_keeps_the_worst_wait_lowest():
    c = costs(seed=20.0, service=0.5)
    # a first: worst = 20 + 5 + 20 + c's 32.6 = 77.6; c first: 20 + 10 + 20 + a's 29.6 = 79.6
    assert decide("cost-aware", three_overdue(), c) == "c"         # rule 3: simply the oldest
    assert decide("lookahead", three_overdue(), c) == "a"
    assert decide("lookahead", three_overdue(c_jobs=10), c) == "c"  # equal work: the oldest goes first


def test_lookahead_weighs_the_switch_costs_of_the_plan():
    # the same queues; a switch into c is cheap and out of it dear: c first is now the better plan
    c = costs(seed=20.0, service=0.5, bc=2.0, ca=2.0, ba=30.0, ac=30.0)
    assert decide("lookahead", three_overdue(), c) == "c"


def test_lookahead_leaves_p0_and_a_single_overdue_model_to_the_shared_rules():
    c = costs(seed=20.0, service=0.5)
    with_p0 = view(list(three_overdue().waiting and [("c", 2, 6.0)] * 20 + [("a", 0, 9.0)] * 2),
                   resident="b", now=35.0, max_wait=15.0)
    assert decide("lookahead", with_p0, c) == "a"                   # rule 2, not the plan
    one = view([("c", 2, 6.0)] * 20 + [("a", 2, 30.0)], resident="b", now=35.0, max_wait=15.0)
    assert decide("lookahead", one, c) == "c"                      # only c is overdue


def test_lookahead_never_picks_a_model_the_overload_guard_would_leave_at_once():
    # a is overdue too, but its oldest job is 25 s newer than c's: after a switch to a, rule 3 would leave
    # it before it served (c more than max_wait_s older), so a is not a candidate
    c = costs(seed=20.0, service=0.5)
    v = view([("c", 2, 0.0)] * 30 + [("a", 2, 25.0)], resident="b", now=45.0, max_wait=15.0)
    assert decide("lookahead", v, c) == "c"


def test_lookahead_beats_rule_3_by_age_on_three_models():
    """llmux's three_model trace at 20 s switches on the real Scheduler (bench/trace_sim.py): lookahead's
    worst wait is lower than cost-aware's at the same number of switches."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from trace_sim import Sim
    arrivals = [((r * 3 + mi) * 3.0 + i * 0.1, m, 2) for r in range(2) for mi, m in enumerate("abc")
                for i in range(10)]
    out = {}
    for policy in ("cost-aware", "lookahead"):
        sim = Sim(policy, list("abc"), dict.fromkeys("abc", 0.5), {"default": 20.0}, 15.0, seed_cost=20.0,
                  free_cold_start=True)
        out[policy] = sim.run(arrivals)
        sim.s.stop()
    assert out["lookahead"]["switches"] == out["cost-aware"]["switches"] == 3
    assert out["lookahead"]["max_wait"] < out["cost-aware"]["max_wait"] - 1.0


# ---- the simulator's sleep levels (bench/trace_sim.py; sim only) ----------------------------------------

def sleep_levels(**kw):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from trace_sim import SleepLevels
    sizes = {"a": 10.0, "b": 20.0, "c": 8.0}
    wake = {m: {1: 3.0, 2: 20.0, "cold": 100.0} for m in sizes}
    return SleepLevels(sizes, wake, **kw)


def test_sleep_levels_demote_then_stop_by_time():
    lv = sleep_levels(demote_after_s=60.0, stop_after_s=300.0)
    assert lv.wake("a", 0.0) == 100.0                   # never started: a cold start
    lv.sleep("a", 10.0)
    assert lv.level("a", 69.9) == 1
    assert lv.level("a", 70.0) == 2                     # asleep demote_after_s: level 2
    assert lv.level("a", 310.0) == "cold"               # asleep stop_after_s: stopped
    lv.wake("a", 400.0)
    lv.sleep("a", 500.0)
    assert lv.wake("a", 580.0) == 20.0                   # woken from level 2 after 80 s asleep
    lv.sleep("a", 600.0)
    assert lv.wake("a", 601.0) == 3.0                    # recently active: level 1


def test_sleep_levels_never_exceed_the_ram_budget():
    lv = sleep_levels(l1_ram_budget_gb=25.0)
    rng = random.Random(5)
    awake = None
    for step in range(300):
        nxt = rng.choice([m for m in "abc" if m != awake])
        if awake:
            lv.sleep(awake, float(step), waking=nxt)
        lv.wake(nxt, float(step))
        awake = nxt
        assert lv.l1_gb() <= 25.0
    assert lv.peak_l1_gb <= 25.0


def test_sleep_levels_keep_the_model_coming_back_at_level_1():
    lv = sleep_levels(l1_ram_budget_gb=30.0)
    for m in "abc":
        lv.wake(m, 0.0)
    lv.sleep("a", 1.0)                                   # a 10 GB at L1
    lv.sleep("b", 2.0)                                   # b 20 GB: 30 GB, fits
    lv.sleep("c", 3.0, waking="a")                       # c 8 GB: a leaves RAM, so b stays at level 1
    assert (lv.level("a", 3.0), lv.level("b", 3.0), lv.level("c", 3.0)) == (1, 1, 1) and lv.wake("a", 3.0) == 3.0
    lv.sleep("a", 4.0, waking="b")                       # 10 + 8 + 20 leaving: fits
    assert lv.level("c", 4.0) == 1 and lv.wake("b", 4.0) == 3.0
    lv.sleep("b", 5.0, waking="c")                       # a 10 + b 20 = 30 with c leaving: fits exactly
    assert (lv.level("a", 5.0), lv.level("b", 5.0)) == (1, 1)
    lv.wake("c", 5.0)
    lv.sleep("c", 6.0)                                   # c 8 GB more: the longest asleep (a) drops to level 2
    assert (lv.level("a", 6.0), lv.level("b", 6.0), lv.level("c", 6.0)) == (2, 1, 1) and lv.l1_gb() == 28.0


def test_a_failed_sleep_still_escalates_to_stop_through_the_scheduler():
    """The real Scheduler on the simulated clock: b's sleep fails, the scheduler stops it instead, so b's
    next wake is a cold start."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from trace_sim import Sim
    lv = sleep_levels(failing=frozenset({"b"}))
    sim = Sim("lookahead", ["a", "b"], {"a": 1.0, "b": 1.0}, {"default": 5.0}, 60.0, seed_cost=5.0, levels=lv)
    sim.run([(0.0, "b", 2), (10.0, "a", 2), (200.0, "b", 2)])
    sim.s.stop()
    assert lv.wakes == {"cold": 3}                       # b, a, then b again from cold: stopped, not asleep
