"""Scheduler invariants (DESIGN.md section 3), driven with an injected clock: no sleeping."""

from __future__ import annotations

import threading

import pytest

from sluice import errors
from sluice.config import GateConfig
from sluice.scheduler import BackendSpec, Health, Job, JobState, Outcome, Scheduler


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(slots=1, depth=20, aging=60.0, models=("a",), clock=None, ready=True, **kw):
    clock = clock or Clock()
    s = Scheduler([GateConfig("gpu", slots=slots)], [BackendSpec("b1", "gpu", frozenset(models))],
                  max_queue_depth=depth, aging_s=aging, clock=clock, **kw)
    if ready:
        s.set_health("b1", Health.READY)
    return s, clock


def grant_order(s: Scheduler, jobs: list[Job]) -> list[str]:
    """Finish the running job repeatedly, dispatching each time, and return the order of grants."""
    order = []
    for _ in range(len(jobs)):
        s.dispatch_once()
        running = [j for j in jobs if j.state is JobState.GRANTED]
        assert len(running) == 1
        order.append(running[0].id)
        s.finish(running[0], Outcome.OK)
    return order


def test_idle_gate_grants_inline():
    s, _ = make()
    job = Job("a")
    s.submit(job)
    assert job.state is JobState.GRANTED and job.backend == "b1"


def test_priority_first_fifo_within_level():
    s, _ = make()
    blocker = Job("a", id="blocker")
    s.submit(blocker)
    jobs = [Job("a", priority=p, id=f"p{p}-{i}") for i, p in enumerate([4, 2, 0, 2, 4, 0, 1])]
    for j in jobs:
        s.submit(j)
    assert all(j.state is JobState.QUEUED for j in jobs)
    s.finish(blocker, Outcome.OK)
    assert grant_order(s, jobs) == ["p0-2", "p0-5", "p1-6", "p2-1", "p2-3", "p4-0", "p4-4"]


def test_aging_lifts_a_waiting_job_one_level_per_aging_period():
    s, clock = make(aging=60.0)
    blocker = Job("a")
    s.submit(blocker)
    old = Job("a", priority=4, id="old")
    s.submit(old)
    clock.t += 121          # two aging periods: effective priority 4 -> 2
    new = Job("a", priority=2, id="new")
    s.submit(new)
    s.finish(blocker, Outcome.OK)
    # Same effective level (2): FIFO by arrival, so the aged job goes first.
    assert grant_order(s, [old, new]) == ["old", "new"]


def test_stream_of_high_priority_work_cannot_starve_a_low_one():
    s, clock = make(aging=10.0, depth=100)
    running = Job("a")
    s.submit(running)
    low = Job("a", priority=4, id="low")
    s.submit(low)
    served_before_low = 0
    for i in range(60):
        clock.t += 1
        s.submit(Job("a", priority=0, id=f"hi{i}"))
        s.finish(running, Outcome.OK)
        s.dispatch_once()
        running = next(j for j in s.active())
        if running.id == "low":
            break
        served_before_low += 1
    assert running.id == "low", "the P4 job never ran"
    assert served_before_low <= 45  # it reached level 0 after 40 s, then FIFO put it ahead of newer P0s


def test_queue_full_rejects_with_503_and_retry_after():
    s, _ = make(depth=2)
    s.submit(Job("a"))  # running, not queued
    s.submit(Job("a"))
    s.submit(Job("a"))
    with pytest.raises(errors.QueueFull) as e:
        s.submit(Job("a"))
    assert e.value.status == 503 and errors.response_headers(e.value)["Retry-After"] == "1"
    assert s.totals["rejected"] == 1


def test_timeout_removes_the_job_at_once_and_frees_its_place():
    s, clock = make(depth=1)
    s.submit(Job("a"))
    late = Job("a", timeout_s=5)
    s.submit(late)
    clock.t += 6
    with pytest.raises(errors.QueueTimeout):
        s.wait(late)
    snap = s.snapshot()
    assert snap["pending"] == 0 and late.state is JobState.DONE and late.outcome is Outcome.TIMEOUT
    s.submit(Job("a"))  # its place in the bounded queue is free again


def test_cancelled_queued_job_is_never_granted():
    s, _ = make()
    blocker = Job("a")
    s.submit(blocker)
    gone = Job("a", id="gone")
    stays = Job("a", id="stays")
    s.submit(gone)
    s.submit(stays)
    s.cancel(gone)
    s.finish(blocker, Outcome.OK)
    assert grant_order(s, [stays]) == ["stays"]
    assert gone.outcome is Outcome.CANCELLED and gone.granted_at is None


def test_cancel_of_a_granted_job_calls_its_hook_and_records_cancelled():
    s, _ = make()
    job = Job("a")
    s.submit(job)
    aborted = threading.Event()
    s.attach(job, aborted.set)
    s.cancel(job)
    assert aborted.is_set()
    s.finish(job, Outcome.ERROR, errors.Cancelled("client disconnected"))
    assert job.outcome is Outcome.CANCELLED


def test_cancel_before_attach_refuses_the_upstream_call():
    s, _ = make()
    job = Job("a")
    s.submit(job)
    s.cancel(job)
    with pytest.raises(errors.Cancelled):
        s.attach(job, lambda: None)


def test_slots_bound_inflight_and_double_finish_frees_nothing_twice():
    s, _ = make(slots=2)
    jobs = [Job("a") for _ in range(5)]
    for j in jobs:
        s.submit(j)
    assert sum(j.state is JobState.GRANTED for j in jobs) == 2
    first = next(j for j in jobs if j.state is JobState.GRANTED)
    s.finish(first, Outcome.OK)
    s.finish(first, Outcome.OK)  # second release must not free another job's slot
    s.dispatch_once()
    assert sum(j.state is JobState.GRANTED for j in jobs) == 2
    assert s.snapshot()["gates"]["gpu"]["inflight"] == 2


def test_counters_add_up_at_every_step():
    s, clock = make(depth=3)

    def check():
        snap = s.snapshot()
        t = snap["totals"]
        assert t["received"] == (t["served"] + t["rejected"] + t["timed_out"] + t["cancelled"] + t["failed"]
                                 + snap["pending"] + snap["active"])

    jobs = []
    for i in range(6):
        j = Job("a", timeout_s=10)
        jobs.append(j)
        try:
            s.submit(j)
        except errors.QueueFull:
            pass
        check()
    s.cancel(jobs[1])
    check()
    clock.t += 11
    with pytest.raises(errors.QueueTimeout):
        s.wait(jobs[2])
    check()
    s.finish(jobs[0], Outcome.OK)
    check()
    s.dispatch_once()
    running = next(iter(s.active()))
    s.finish(running, Outcome.ERROR, errors.BadGateway("x"))
    check()
    assert s.totals == {"received": 6, "served": 1, "rejected": 2, "timed_out": 1, "cancelled": 1, "failed": 1}


def test_backend_down_fails_queued_jobs_fast_and_refuses_new_ones():
    s, _ = make()
    blocker = Job("a")
    s.submit(blocker)
    queued = Job("a")
    s.submit(queued)
    s.set_health("b1", Health.DOWN)
    assert queued.outcome is Outcome.ERROR and isinstance(queued.error, errors.Unavailable)
    with pytest.raises(errors.Unavailable):
        s.submit(Job("a"))


def test_pending_backend_holds_jobs_until_ready():
    s, _ = make(ready=False)
    job = Job("a")
    s.submit(job)
    assert job.state is JobState.QUEUED
    s.set_health("b1", Health.READY)
    s.dispatch_once()
    assert job.state is JobState.GRANTED


def test_close_answers_every_queued_job():
    s, _ = make()
    s.submit(Job("a"))
    queued = [Job("a"), Job("a")]
    for j in queued:
        s.submit(j)
    assert s.close(errors.Unavailable("shutting down")) == 2
    assert all(j.outcome is Outcome.REJECTED for j in queued)
    with pytest.raises(errors.Unavailable):
        s.submit(Job("a"))


def test_wait_ticks_while_queued():
    s, clock = make()
    s.submit(Job("a"))
    job = Job("a", timeout_s=30)
    s.submit(job)
    ticks = []

    def tick(position):
        ticks.append(position)
        clock.t += 5           # time passes while we write the keepalive
        if len(ticks) == 3:
            s.cancel(job)

    clock.t += 10
    with pytest.raises(errors.Cancelled):
        s.wait(job, tick, first_tick_s=10, tick_every_s=5)
    assert ticks == [1, 1, 1]


def test_dispatcher_thread_grants_when_a_slot_frees():
    s, _ = make()
    s.start()
    try:
        first, second = Job("a"), Job("a")
        s.submit(first)
        s.submit(second)
        granted = threading.Event()

        def waiter():
            s.wait(second)
            granted.set()
        t = threading.Thread(target=waiter)
        t.start()
        s.finish(first, Outcome.OK)
        assert granted.wait(2)
        t.join(2)
    finally:
        s.stop()


def test_fair_share_interleaves_clients_within_a_level():
    s, _ = make(depth=100)
    blocker = Job("a")
    s.submit(blocker)
    heavy = [Job("a", client="batch", id=f"batch{i}") for i in range(6)]
    for j in heavy:
        s.submit(j)
    light = [Job("a", client="alice", id="alice0"), Job("a", client="bob", id="bob0")]
    for j in light:
        s.submit(j)
    s.finish(blocker, Outcome.OK)
    order = grant_order(s, heavy + light)
    # one client's backlog does not hold back the others' single jobs
    assert order[:4] == ["batch0", "alice0", "bob0", "batch1"]
    assert [o for o in order if o.startswith("batch")] == [f"batch{i}" for i in range(6)]


def test_a_job_granted_straight_through_moves_fair_queuing_as_a_queued_one_would():
    s, _ = make(depth=100)
    first = Job("a", client="a", id="a1")
    s.submit(first)
    left = [Job("a", client="a", id=f"a{i}") for i in (2, 3)]
    for j in left:
        s.submit(j)
    for j in left:
        s.cancel(j)                      # queued and gone: client a's tags ran ahead of the virtual time
    s.finish(first, Outcome.OK)
    through = Job("a", client="a", id="a4")
    s.submit(through)                    # nothing waits: granted without entering the queue
    assert through.state is JobState.GRANTED
    mine, theirs = Job("a", client="a", id="a5"), Job("a", client="b", id="b1")
    s.submit(mine)
    s.submit(theirs)
    s.finish(through, Outcome.OK)
    # the grant caught the virtual time up as a queued one would: a's cancelled jobs cost it nothing now
    assert grant_order(s, [mine, theirs]) == ["a5", "b1"]


def test_max_queued_per_key_is_429_for_that_key_only():
    s, _ = make(depth=100)
    s.submit(Job("a"))
    for _ in range(2):
        s.submit(Job("a", client="k", max_queued=2))
    with pytest.raises(errors.TooManyRequests) as e:
        s.submit(Job("a", client="k", max_queued=2))
    assert e.value.status == 429 and errors.response_headers(e.value)["Retry-After"] == "1"
    s.submit(Job("a", client="other", max_queued=2))


# ---- a live model table (manifest discovery, reload) -----------------------------------------------------
def pool(clock=None):
    """Two one-slot backends on a four-slot gate: b1 serves a and b, b2 serves c."""
    clock = clock or Clock()
    s = Scheduler([GateConfig("gpu", slots=4)], [BackendSpec("b1", "gpu", frozenset({"a", "b"}), slots=1),
                                                 BackendSpec("b2", "gpu", frozenset({"c"}), slots=1)], clock=clock)
    for b in ("b1", "b2"):
        s.set_health(b, Health.READY)
    return s


def dispatch(s: Scheduler) -> None:
    s.dispatch_once()


def test_set_models_moves_queued_jobs_to_a_backend_that_still_serves_them():
    s = pool()
    busy, blocker = Job("a", id="busy"), Job("c", id="blocker")
    s.submit(busy)
    s.submit(blocker)
    assert busy.backend == "b1" and blocker.backend == "b2"
    queued = Job("b", id="queued")
    s.submit(queued)
    assert queued.state is JobState.QUEUED
    s.set_models({"b1": {"a"}, "b2": {"b", "c"}})      # b leaves b1 for b2 in one step: never unserved
    assert queued.state is JobState.QUEUED              # b2 is busy: it keeps its place
    s.finish(blocker, Outcome.OK)
    dispatch(s)
    assert queued.state is JobState.GRANTED and queued.backend == "b2"
    assert busy.state is JobState.GRANTED and busy.backend == "b1"   # in flight: untouched


def test_set_models_fails_jobs_left_with_no_backend_at_once_and_keeps_in_flight_ones():
    s = pool()
    busy = Job("a")
    s.submit(busy)
    queued_a, queued_b = Job("a"), Job("b")
    s.submit(queued_a)
    s.submit(queued_b)
    s.set_models({"b1": {"b"}}, reason="left the manifest")
    assert queued_a.outcome is Outcome.ERROR and isinstance(queued_a.error, errors.Unavailable)
    assert queued_a.error.message == "model 'a' left the manifest; retry later"
    assert queued_b.state is JobState.QUEUED and busy.state is JobState.GRANTED
    with pytest.raises(errors.Unavailable) as e:       # a request that resolved 'a' a moment ago: a clear 503
        s.submit(Job("a"))
    assert "no backend serves model 'a'" in e.value.message
    s.finish(busy, Outcome.OK)                          # its slot is freed as usual
    dispatch(s)
    assert queued_b.state is JobState.GRANTED
    snap = s.snapshot()
    assert snap["backends"]["b1"]["models"] == ["b"]
    t = snap["totals"]
    assert t["received"] == t["served"] + t["rejected"] + t["timed_out"] + t["cancelled"] + t["failed"] + \
        snap["pending"] + snap["active"]


def test_set_models_adds_queues_for_new_models_and_known_ones_without_a_backend():
    s = pool()
    s.set_models({"b2": {"c", "d"}}, known=["e"])
    job = Job("d")
    s.submit(job)
    assert job.state is JobState.GRANTED and job.backend == "b2"
    with pytest.raises(errors.Unavailable):
        s.submit(Job("e"))                               # known, but nothing serves it yet
    with pytest.raises(ValueError):
        s.set_models({"ghost": {"a"}})


def test_set_models_reroutes_a_fallback_job_instead_of_failing_it():
    s = pool()
    s.submit(Job("a"))
    job = Job("a")
    job.fallback_at = 10 ** 9
    s.submit(job)
    s.set_models({"b1": {"b"}})
    assert job.state is JobState.GRANTED and job.rerouted and job.backend is None


def test_retired_model_takes_no_new_jobs_but_serves_its_queued_ones():
    s = pool()
    busy = Job("a")
    s.submit(busy)
    queued = Job("b")
    s.submit(queued)
    s.set_models({}, retired={"b"})
    with pytest.raises(errors.NotFound) as e:
        s.submit(Job("b"))
    assert "removed from the configuration" in e.value.message
    assert s.has_jobs("b")
    s.finish(busy, Outcome.OK)
    dispatch(s)
    assert queued.state is JobState.GRANTED
    s.finish(queued, Outcome.OK)
    assert not s.has_jobs("b")
    s.set_models({}, retired=())
    s.submit(Job("b"))                                   # back in service


# ---- per-model max_concurrency ---------------------------------------------------------------------------
def limited(limits, slots=3, clock=None):
    """One backend serving a and b on a gate of `slots`, with per-model `limits`."""
    s, clock = make(slots=slots, models=("a", "b"), clock=clock)
    s.set_models({}, limits=limits)
    return s, clock


def granted(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs if j.state is JobState.GRANTED]


def test_a_model_at_its_limit_waits_while_other_models_behind_it_are_granted():
    s, _ = limited({"a": 1})
    jobs = [Job("a", id="a1"), Job("a", id="a2"), Job("b", id="b1"), Job("b", id="b2")]
    for j in jobs:
        s.submit(j)
    s.dispatch_once()
    assert granted(jobs) == ["a1", "b1", "b2"]      # a2 is first in line but a is at its limit: no HOL block
    s.finish(jobs[2], Outcome.OK)                   # a freed slot of another model does not lift a's limit
    s.dispatch_once()
    assert jobs[1].state is JobState.QUEUED
    s.finish(jobs[0], Outcome.OK)                   # a finish of a makes it grantable again
    s.dispatch_once()
    assert jobs[1].state is JobState.GRANTED and jobs[1].backend == "b1"


def test_max_concurrency_keeps_priorities_fifo_and_aging_within_the_model():
    s, clock = limited({"a": 1})
    running = Job("a", id="running")
    s.submit(running)
    old = Job("a", priority=4, id="old")
    s.submit(old)
    clock.t += 121                                  # two aging periods: old is at effective priority 2
    jobs = [old] + [Job("a", priority=p, id=f"p{p}-{i}") for i, p in enumerate([2, 0, 2])]
    for j in jobs[1:]:
        s.submit(j)
    s.dispatch_once()
    assert s.active() == [running]                  # the gate has free slots; a has none
    s.finish(running, Outcome.OK)
    assert grant_order(s, jobs) == ["p0-1", "old", "p2-0", "p2-2"]


def test_max_concurrency_counts_a_models_jobs_across_its_backends():
    clock = Clock()
    s = Scheduler([GateConfig("g1", slots=2), GateConfig("g2", slots=2)],
                  [BackendSpec("b1", "g1", frozenset({"a"})), BackendSpec("b2", "g2", frozenset({"a", "b"}))],
                  clock=clock)
    for b in ("b1", "b2"):
        s.set_health(b, Health.READY)
    s.set_models({}, limits={"a": 2})
    jobs = [Job("a", id=f"a{i}") for i in range(4)] + [Job("b", id="b0")]
    for j in jobs:
        s.submit(j)
    s.dispatch_once()
    assert granted(jobs) == ["a0", "a1", "b0"]      # two a in flight, over both backends; b still goes
    s.finish(jobs[0], Outcome.OK)
    s.dispatch_once()
    assert granted(jobs) == ["a1", "a2", "b0"]


def test_limits_are_replaced_by_set_models_and_kept_when_not_given():
    s, _ = limited({"a": 1})
    jobs = [Job("a", id=f"a{i}") for i in range(3)]
    for j in jobs:
        s.submit(j)
    s.set_models({}, known=["c"])                   # no limits given: a's stays
    s.dispatch_once()
    assert granted(jobs) == ["a0"]
    s.set_models({}, limits={"a": 2})               # raised (a reload): one more goes at once
    s.dispatch_once()
    assert granted(jobs) == ["a0", "a1"]
    s.set_models({}, limits={})                     # removed: a is bounded by the gate's slots only
    s.dispatch_once()
    assert granted(jobs) == ["a0", "a1", "a2"]
    s.set_models({}, limits={"a": 1})               # lowered below what runs: nothing in flight is touched
    assert len(s.active()) == 3
    late = Job("a", id="late")
    for j in jobs:
        s.finish(j, Outcome.OK)
    s.submit(late)
    assert late.state is JobState.GRANTED


def test_max_concurrency_on_an_exclusive_gate_holds_the_resident_without_switching_away():
    clock, switched = Clock(), threading.Semaphore(0)
    calls = []
    s = Scheduler([GateConfig("gpu", slots=2, mode="exclusive", policy="cost-aware")],
                  [BackendSpec("A", "gpu", frozenset({"a"})), BackendSpec("B", "gpu", frozenset({"b"}))],
                  clock=clock, switcher=lambda b, action: calls.append((b, action)),
                  on_switch=lambda gate, phases: switched.release())
    s.set_models({}, limits={"a": 1})
    first = Job("a", id="a1")
    s.submit(first)
    s.dispatch_once()                               # nothing resident: wake a
    assert switched.acquire(timeout=5)
    s.dispatch_once()
    assert first.state is JobState.GRANTED
    second, other = Job("a", id="a2"), Job("b", id="b1")
    s.submit(second)
    s.submit(other)
    s.dispatch_once()
    assert second.state is JobState.QUEUED and other.state is JobState.QUEUED   # a free slot, but a is at its limit
    assert s.snapshot()["gates"]["gpu"]["state"] == "serving"                   # and the gate is not drained for b
    s.finish(first, Outcome.OK)
    s.dispatch_once()
    assert second.state is JobState.GRANTED and calls == [("B", "sleep"), ("A", "wake")]   # one switch only
