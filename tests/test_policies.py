"""Switch policies as pure functions: each rule, each policy, the EMA, and the time-based deadline."""

from __future__ import annotations

import pytest

from sluice.policies import GateView, SwitchCosts, Waiting, decide, next_deadline


def view(waiting, resident="a", now=100.0, served=5, since=0.0, max_wait=60.0, min_active=0.0, inflight=0):
    order = sorted(range(len(waiting)), key=lambda i: waiting[i][2])     # seq follows arrival
    ws = tuple(Waiting(m, p, order.index(i), e) for i, (m, p, e) in enumerate(waiting))
    return GateView(now=now, resident=resident, inflight=inflight, resident_since=since, served_since_switch=served,
                    waiting=ws, max_wait_s=max_wait, min_active_s=min_active)


COSTS = SwitchCosts(seed_s=10.0)


@pytest.mark.parametrize("policy", ["fifo", "cost-aware", "drain-first"])
def test_nothing_waiting_is_none_and_no_resident_takes_the_best(policy):
    assert decide(policy, view([]), COSTS) is None
    assert decide(policy, view([("b", 2, 99), ("c", 1, 99.5)], resident=None), COSTS) == "c"


@pytest.mark.parametrize("policy", ["fifo", "cost-aware", "drain-first"])
def test_overdue_job_wins_by_time_not_by_arrival(policy):
    v = view([("a", 0, 99), ("b", 4, 39.9)], now=100.0, max_wait=60)
    assert decide(policy, v, COSTS) == "b"
    assert decide(policy, view([("a", 0, 99), ("b", 4, 40.5)], max_wait=60), COSTS) in ("a", "b")


@pytest.mark.parametrize("policy", ["fifo", "cost-aware", "drain-first"])
def test_p0_for_another_model_switches_even_while_settling(policy):
    v = view([("a", 3, 99), ("b", 0, 99.5)], served=1, since=99.0, min_active=30)
    assert decide(policy, v, COSTS) == "b"
    # but the model just woken serves one job first: otherwise overdue work on both sides livelocks
    fresh = view([("a", 3, 99), ("b", 0, 99.5), ("b", 2, 10)], served=0, since=99.0, min_active=30)
    assert decide(policy, fresh, COSTS) == "a"
    # ...but not when the resident model has P0 work of its own
    assert decide(policy, view([("a", 0, 99), ("b", 0, 98)]), COSTS) == ("b" if policy == "fifo" else "a")


@pytest.mark.parametrize("policy", ["fifo", "cost-aware", "drain-first"])
def test_min_active_prevents_switching_back_before_the_new_model_served(policy):
    settling = view([("a", 2, 99.9), ("b", 1, 50)], served=0, since=99.0, min_active=5)
    assert decide(policy, settling, COSTS) == "a"
    settled = view([("a", 2, 99.9), ("b", 1, 50)], served=1, since=90.0, min_active=5)
    assert decide(policy, settled, COSTS) == ("a" if policy == "drain-first" else "b")


def test_fifo_follows_the_best_job():
    assert decide("fifo", view([("b", 2, 1), ("a", 2, 2)], max_wait=600), COSTS) == "b"
    assert decide("fifo", view([("a", 2, 1), ("b", 2, 2)], max_wait=600), COSTS) == "a"


def test_drain_first_finishes_the_resident_queue_then_the_most_urgent():
    assert decide("drain-first", view([("b", 1, 10), ("a", 3, 99)], max_wait=600), COSTS) == "a"
    assert decide("drain-first", view([("b", 3, 10), ("c", 1, 50)], max_wait=600), COSTS) == "c"
    assert decide("drain-first", view([("b", 2, 10), ("c", 2, 20)], max_wait=600), COSTS) == "b"  # tie: oldest


def test_cost_aware_coalesces_then_picks_the_work_that_repays_its_switch():
    costs = SwitchCosts(seed_s=10.0, seeds={("a", "c"): 40.0})
    # the resident keeps the gate while it has work, however much waits elsewhere
    assert decide("cost-aware", view([("a", 2, 99)] + [("b", 2, 92)] * 3, max_wait=600), costs) == "a"
    # a job more urgent than anything resident switches at once
    assert decide("cost-aware", view([("a", 3, 99), ("b", 1, 99.9)], max_wait=600), costs) == "b"
    # resident empty: b waited 2 x 30 = 60 job-s, cost 10 -> 50; c waited 80, cost 40 -> 40: b
    assert decide("cost-aware", view([("b", 2, 70), ("b", 2, 70), ("c", 2, 20)], max_wait=600), costs) == "b"
    # drain-first would take the oldest wait instead
    assert decide("drain-first", view([("b", 2, 70), ("b", 2, 70), ("c", 2, 20)], max_wait=600), costs) == "c"


def test_overdue_under_overload_does_not_thrash():
    costs = SwitchCosts(seed_s=10.0)
    # both sides are late; the resident's oldest is within a round trip (20 s) of b's: keep serving
    assert decide("cost-aware", view([("a", 2, 10), ("b", 2, 5)], now=100, max_wait=60), costs) == "a"
    # b has waited 25 s longer than anything resident: switch
    assert decide("cost-aware", view([("a", 2, 30), ("b", 2, 5)], now=100, max_wait=60), costs) == "b"


def test_deadline_is_when_something_turns_overdue_or_settling_ends():
    v = view([("a", 2, 99), ("b", 2, 70)], now=100.0, since=95, min_active=10, max_wait=60)
    assert next_deadline(v) == 105.0       # settling ends before b turns overdue at 130
    assert next_deadline(view([("a", 2, 99)], resident="a", since=0)) is None


def test_switch_cost_ema():
    c = SwitchCosts(seed_s=5.0, alpha=0.5, seeds={("a", "b"): 8.0})
    assert c.get("a", "b") == 8.0 and c.get("b", "a") == 5.0
    c.observe("b", "a", 4.0)
    assert c.get("b", "a") == 4.0          # first measurement replaces the seed
    c.observe("b", "a", 8.0)
    assert c.get("b", "a") == 6.0          # then 4 + 0.5 * (8 - 4)
    c.observe("a", "b", 2.0)
    assert c.get("a", "b") == 5.0          # 8 + 0.5 * (2 - 8)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown policy"):
        decide("random", view([("a", 1, 1)]), COSTS)


def test_interleaved_arrivals_do_not_livelock_under_cost_aware():
    """A and B arrive alternately; serving one job at a time, the decision must not flip every job."""
    costs = SwitchCosts(seed_s=30.0)
    queue = [("a" if i % 2 else "b", 2, float(i)) for i in range(10)]
    resident, since, served, now, switches = "a", 0.0, 1, 10.0, 0
    while queue:
        v = view(queue, resident=resident, now=now, served=served, since=since, max_wait=600)
        target = decide("cost-aware", v, costs)
        if target != resident:
            resident, since, served, switches = target, now, 0, switches + 1
            now += 30
            continue
        i = next(i for i, w in enumerate(queue) if w[0] == resident)
        queue.pop(i)
        served += 1
        now += 1
    assert switches <= 2
