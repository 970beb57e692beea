"""Gates: exclusive switching (drain, sleep, wake), pools, affinity, the JIT drain guard, HOL avoidance.

Scheduler-level scenarios use an injected clock and a recording switcher; switches run on their own
thread, so the tests wait on the switch-finished callback (an Event), never on time.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from sluice import errors
from sluice.config import GateConfig
from sluice.scheduler import BackendSpec, Health, Job, JobState, Outcome, Scheduler


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Switcher:
    """Records every sleep/wake/stop in order; can be told to fail one."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.fail: set[tuple[str, str]] = set()
        self.takes: dict[str, float] = {}      # action -> seconds it takes on the rig's clock
        self.clock = None

    def __call__(self, backend: str, action: str) -> None:
        self.calls.append((backend, action))
        if action in self.takes:
            self.clock.t += self.takes[action]
        if (backend, action) in self.fail:
            raise RuntimeError(f"{action} {backend} failed")


class Rig:
    def __init__(self, policy="fifo", slots=1, backends=None, mode="exclusive", **gate_kw):
        self.clock = Clock()
        self.switcher = Switcher()
        self.switcher.clock = self.clock
        self.switched = threading.Semaphore(0)
        self.switches: list[dict] = []
        backends = backends or [BackendSpec("A", "gpu", frozenset({"a"})), BackendSpec("B", "gpu", frozenset({"b"})),
                                BackendSpec("C", "gpu", frozenset({"c"}))]
        self.s = Scheduler([GateConfig("gpu", slots=slots, mode=mode, policy=policy, **gate_kw)], backends,
                           max_queue_depth=100, clock=self.clock, switcher=self.switcher, on_switch=self._on_switch)
        for b in backends:
            self.s.set_health(b.name, Health.READY)

    def _on_switch(self, gate, phases):
        self.switches.append(phases)
        self.switched.release()

    def dispatch(self, expect_switch: bool = False) -> None:
        self.s.dispatch_once()
        if expect_switch:
            assert self.switched.acquire(timeout=5), "no switch happened"
            self.s.dispatch_once()

    def submit(self, model, **kw) -> Job:
        job = Job(model, **kw)
        self.s.submit(job)
        return job

    def gate(self) -> SimpleNamespace:
        return SimpleNamespace(**self.s.snapshot()["gates"]["gpu"])


def granted(*jobs):
    return [j.state is JobState.GRANTED for j in jobs]


def test_first_job_wakes_its_model_and_puts_the_others_to_sleep():
    r = Rig()
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    assert granted(a1) == [True]
    assert sorted(r.switcher.calls[:2]) == [("B", "sleep"), ("C", "sleep")] and r.switcher.calls[2] == ("A", "wake")
    assert r.gate().resident == "a"


def test_drain_before_switch_and_new_a_jobs_wait_not_503():
    r = Rig(slots=2)
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    b1 = r.submit("b")
    r.dispatch()
    a2 = r.submit("a")          # arrives while the gate drains for b: queued, not rejected, not granted
    r.dispatch()
    assert granted(a1, b1, a2) == [True, False, False] and r.gate().state == "draining"
    calls_before = len(r.switcher.calls)
    r.s.finish(a1, Outcome.OK)
    r.dispatch(expect_switch=True)
    assert r.switcher.calls[calls_before:] == [("A", "sleep"), ("B", "wake")]
    assert granted(b1, a2) == [True, False]
    r.s.finish(b1, Outcome.OK)
    r.dispatch(expect_switch=True)
    assert granted(a2) == [True] and r.gate().switches == 3


def test_finished_jobs_feed_the_measured_service_time_to_cost_aware():
    r = Rig(policy="cost-aware")
    seeded = r.s.switching.service_cost("gpu", "a")
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    r.clock.t += 7.0
    r.s.finish(a1, Outcome.OK)
    assert r.s.switching.service_cost("gpu", "a") == 7.0 != seeded        # the first measurement replaces the guess
    a2 = r.submit("a")
    r.dispatch()
    r.clock.t += 3.0
    r.s.finish(a2, Outcome.ERROR)                      # a failed job says nothing about service time
    assert r.s.switching.service_cost("gpu", "a") == 7.0


def test_a_failed_backend_on_an_exclusive_gate_is_refused_without_a_switch():
    r = Rig()
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    b1 = r.submit("b")                                  # waits for a's drain
    r.s.set_health("B", Health.DOWN)                    # a failed probe: maybe just asleep, so b1 still waits
    assert b1.state is JobState.QUEUED
    r.s.set_health("B", Health.FAILED, "exited with code 1 (see B.log)")
    assert b1.state is JobState.DONE and "exited with code 1" in b1.error.message   # failed at once
    with pytest.raises(errors.Unavailable, match="/admin/models/b/load"):
        r.submit("b")
    calls = len(r.switcher.calls)
    r.s.finish(a1, Outcome.OK)
    r.dispatch()
    assert len(r.switcher.calls) == calls and r.gate().resident == "a"   # a stays up


def test_drain_timeout_cancels_stragglers_with_a_clear_error():
    r = Rig(drain_timeout_s=30)
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    aborted = threading.Event()
    r.s.attach(a1, aborted.set)
    r.submit("b")
    r.dispatch()
    assert not aborted.is_set()
    r.clock.t += 31
    r.dispatch()
    assert aborted.is_set() and "drain_timeout_s" in a1.abort_error.message


def test_sleep_failure_escalates_to_stop():
    r = Rig()
    r.submit("a")
    r.dispatch(expect_switch=True)
    r.switcher.fail.add(("A", "sleep"))
    a1 = next(iter(r.s.active()))
    b1 = r.submit("b")
    r.s.finish(a1, Outcome.OK)
    r.dispatch(expect_switch=True)
    assert ("A", "sleep") in r.switcher.calls and ("A", "stop") in r.switcher.calls
    assert granted(b1) == [True]


def test_wake_failure_fails_that_models_jobs_fast_and_lets_the_next_model_run():
    r = Rig()
    r.switcher.fail.add(("B", "wake"))
    b1, b2 = r.submit("b"), r.submit("b")
    c1 = r.submit("c")
    r.s.dispatch_once()                      # only the failed switch: a second pass would start c's at once
    assert r.switched.acquire(timeout=5), "no switch happened"
    assert b1.outcome is Outcome.ERROR and isinstance(b1.error, errors.Unavailable) and b2.outcome is Outcome.ERROR
    assert r.gate().resident is None and r.switches[-1]["result"] == "failed"
    r.dispatch(expect_switch=True)
    assert granted(c1) == [True] and r.gate().resident == "c"


def test_cancelled_or_timed_out_job_never_triggers_a_switch():
    r = Rig()
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    b1 = r.submit("b", timeout_s=5)
    r.dispatch()
    assert r.gate().state == "draining"
    r.s.cancel(b1)
    r.dispatch()
    assert r.gate().state == "serving"
    b2 = r.submit("b", timeout_s=5)
    r.clock.t += 6
    with pytest.raises(errors.QueueTimeout):
        r.s.wait(b2)
    r.s.finish(a1, Outcome.OK)
    r.dispatch()
    assert r.gate().switches == 1 and r.gate().resident == "a" and r.gate().state == "idle"


def test_p0_job_for_another_model_switches_after_the_current_drain():
    r = Rig(policy="cost-aware", slots=1, max_wait_s=600, switch_cost_s=60)
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    a_more = [r.submit("a", priority=3) for _ in range(3)]
    urgent = r.submit("b", priority=0)
    r.s.finish(a1, Outcome.OK)
    r.dispatch(expect_switch=True)
    assert granted(urgent) == [True] and not any(granted(*a_more))


def drive(r: Rig) -> list[str]:
    """Serve everything: finish the running job (1 s each), dispatch, wait out switches. Grant order."""
    order = []
    while True:
        running = list(r.s.active())
        for j in running:
            order.append(j.model)
            r.clock.t += 1
            r.s.finish(j, Outcome.OK)
        r.s.dispatch_once()
        if not r.s.active():
            if r.s.snapshot()["pending"] == 0:
                return order
            assert r.switched.acquire(timeout=5), "stuck: nothing running, nothing switching"
            r.s.dispatch_once()


def test_anti_thrash_interleaved_arrivals_cost_at_most_two_switches():
    r = Rig(policy="cost-aware", slots=1, max_wait_s=600, switch_cost_s=30)
    r.submit("a")
    r.dispatch(expect_switch=True)
    for m in "babababa":
        r.submit(m)
    order = drive(r)
    assert sorted(order) == sorted("aabababab")
    assert r.gate().switches <= 3          # the first wake of `a`, then at most two more


def test_fifo_policy_follows_arrival_order_across_three_models():
    r = Rig(policy="fifo")
    for m in "abcab":
        r.submit(m)
    assert drive(r) == list("abcab")


def test_b_is_not_starved_behind_steady_overlapping_a_beyond_max_wait():
    r = Rig(policy="cost-aware", slots=2, max_wait_s=20, switch_cost_s=1000)
    running = [r.submit("a"), r.submit("a")]
    r.dispatch(expect_switch=True)
    r.dispatch()
    b1 = r.submit("b")
    for _ in range(60):                    # A work keeps overlapping: a slot frees, a new A job arrives
        r.clock.t += 1
        r.s.finish(running.pop(0), Outcome.OK)
        running.append(r.submit("a"))
        r.s.dispatch_once()
        if r.gate().state == "draining":
            break
    # overdue after max_wait_s, and within it of the resident's own oldest job: 2 x max_wait_s at most
    assert r.gate().state == "draining" and r.clock.t - b1.enqueued_at <= 2 * 20 + 1
    for j in running:
        r.s.finish(j, Outcome.OK)
    r.dispatch(expect_switch=True)
    assert granted(b1) == [True]


def test_jit_guard_never_mixes_models_on_a_swapping_server():
    lm = BackendSpec("lmstudio", "gpu", frozenset({"a", "b"}), jit_swap=True)
    r = Rig(mode="shared", slots=2, backends=[lm])
    a1 = r.submit("a")
    b1 = r.submit("b")
    a2 = r.submit("a")
    r.dispatch()
    # b1 waits though a slot is free; a2 is not let past it either, or steady `a` work would starve b1
    assert granted(a1, b1, a2) == [True, False, False]
    r.s.finish(a1, Outcome.OK)
    r.dispatch()
    assert granted(b1, a2) == [True, False]             # FIFO: b1 was first once a drained
    r.s.finish(b1, Outcome.OK)
    r.dispatch()
    assert granted(a2) == [True]


def test_pool_prefers_the_backend_that_has_the_model_then_the_least_loaded():
    x = BackendSpec("x", "gpu", frozenset({"a", "b"}), slots=2)
    y = BackendSpec("y", "gpu", frozenset({"a", "b"}), slots=2)
    r = Rig(mode="shared", slots=4, backends=[x, y])
    a1 = r.submit("a")
    b1 = r.submit("b")
    assert (a1.backend, b1.backend) == ("x", "y")       # least loaded first
    r.s.finish(a1, Outcome.OK)
    r.s.finish(b1, Outcome.OK)
    b2 = r.submit("b")
    a2 = r.submit("a")
    assert (a2.backend, b2.backend) == ("x", "y")       # affinity: each goes where its model is loaded


def test_pool_member_down_reroutes_and_all_down_fails_fast():
    x = BackendSpec("x", "gpu", frozenset({"a"}), slots=1)
    y = BackendSpec("y", "gpu", frozenset({"a"}), slots=1)
    r = Rig(mode="shared", slots=2, backends=[x, y])
    r.s.set_health("x", Health.DOWN)
    a1 = r.submit("a")
    assert a1.backend == "y"
    a2 = r.submit("a")
    assert a2.state is JobState.QUEUED
    r.s.set_health("y", Health.DOWN)
    assert a2.outcome is Outcome.ERROR                    # nowhere left: failed now, not at its timeout


def test_head_of_line_blocked_gate_does_not_block_another_gate():
    gates = [GateConfig("g1", slots=1), GateConfig("g2", slots=1)]
    s = Scheduler(gates, [BackendSpec("A", "g1", frozenset({"a"})), BackendSpec("C", "g2", frozenset({"c"}))],
                  clock=Clock())
    s.set_health("A", Health.READY)
    s.set_health("C", Health.READY)
    a1, a2, c1 = Job("a"), Job("a", priority=0), Job("c", priority=4)
    for j in (a1, a2, c1):
        s.submit(j)
    assert granted(a1, a2, c1) == [True, False, True]


# ---- end to end: sluice in front of two vLLM-style stand-ins sharing one exclusive GPU gate ----------------
from conftest import call  # noqa: E402
from test_api_native import until  # noqa: E402


def exclusive_toml(a_url: str, b_url: str, switch="vllm-sleep-1", policy="fifo") -> str:
    return f"""
[[gates]]
name = "gpu0"
mode = "exclusive"
policy = "{policy}"
slots = 2

[[backends]]
name = "A"
url = "{a_url}"
gate = "gpu0"
switch = "{switch}"

[[backends]]
name = "B"
url = "{b_url}"
gate = "gpu0"
switch = "{switch}"

[[models]]
name = "qwen"
backends = ["A"]

[[models]]
name = "llama"
backends = ["B"]
"""


@pytest.mark.parametrize("level", [1, 2])
def test_vllm_sleep_switch_end_to_end(make_app, make_backend, level):
    log: list = []
    a, b = make_backend(model="qwen"), make_backend(model="llama")
    a.shared_log = b.shared_log = log
    app = make_app(toml=exclusive_toml(a.url, b.url, switch=f"vllm-sleep-{level}"))
    for i, model in enumerate(["qwen", "llama", "qwen"]):
        status, headers, body = call(app, "POST", "/v1/chat/completions",
                                     {"model": model, "messages": [{"role": "user", "content": f"m{i}"}]})
        assert status == 200, body
        assert headers["X-Sluice-Backend"] == ("A" if model == "qwen" else "B")
    assert a.violations == [] and b.violations == []
    wake = [("llama", "POST /wake_up")]
    if level == 2:
        wake += [("llama", "POST /collective_rpc reload_weights"), ("llama", "POST /reset_prefix_cache")]
    i = log.index(("qwen", f"POST /sleep?level={level}"))
    assert log[i + 1:i + 1 + len(wake)] == wake        # old model asleep before the new one wakes, in order
    gate = call(app, "GET", "/admin/status")[2]["gates"][0]
    assert gate["switches"] == 3 and gate["resident"] == "qwen" and gate["last_switch"]["result"] == "ok"
    assert set(gate["last_switch"]) >= {"drain_s", "sleep_s", "wake_s"}


def test_end_to_end_drain_holds_b_until_a_finishes(make_app, make_backend):
    a, b = make_backend(model="qwen"), make_backend(model="llama")
    app = make_app(toml=exclusive_toml(a.url, b.url))
    assert call(app, "POST", "/v1/chat/completions", {"model": "qwen", "messages": [{"role": "user", "content": "w"}]})[0] == 200
    a.holding = True
    results = {}
    ta = threading.Thread(target=lambda: results.update(a=call(app, "POST", "/v1/chat/completions", {
        "model": "qwen", "messages": [{"role": "user", "content": "long"}]})))
    ta.start()
    assert a.wait_arrivals(2)
    tb = threading.Thread(target=lambda: results.update(b=call(app, "POST", "/v1/chat/completions", {
        "model": "llama", "messages": [{"role": "user", "content": "next"}]})))
    tb.start()
    until(lambda: app.scheduler.snapshot()["gates"]["gpu0"]["state"] == "draining", what="draining")
    assert b.arrivals == [] and not a.sleeping
    a.release_all()
    ta.join(10)
    tb.join(10)
    assert results["a"][0] == 200 and results["b"][0] == 200
    assert a.violations == [] and b.violations == [] and a.sleeping


def test_end_to_end_wake_failure_answers_503_fast(make_app, make_backend):
    a, b = make_backend(model="qwen"), make_backend(model="llama")
    b.fail_control.add("/wake_up")
    app = make_app(toml=exclusive_toml(a.url, b.url))
    status, _, body = call(app, "POST", "/v1/chat/completions",
                           {"model": "llama", "messages": [{"role": "user", "content": "x"}]})
    assert status == 503 and "could not be loaded" in body["error"]["message"]
    status, _, _ = call(app, "POST", "/v1/chat/completions",
                        {"model": "qwen", "messages": [{"role": "user", "content": "x"}]})
    assert status == 200


def test_model_moved_off_the_awake_backend_switches_afresh_after_the_drain():
    """Reload/discovery moves the resident model from A (awake) to B (asleep): nothing is sent to B until a
    full switch has drained A's in-flight job, put A to sleep and woken B."""
    r = Rig(slots=2)
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    assert granted(a1) == [True] and a1.backend == "A"
    r.switcher.calls.clear()
    r.s.set_models({"A": set(), "B": {"a", "b"}})
    a2 = r.submit("a")
    r.dispatch()
    assert a2.state is JobState.QUEUED and r.gate().resident is None   # B is asleep: not granted there
    assert r.switcher.calls == [] and r.gate().state == "draining"     # a1 (in flight) finishes first
    r.s.finish(a1, Outcome.OK)
    r.dispatch(expect_switch=True)
    assert ("A", "sleep") in r.switcher.calls and r.switcher.calls[-1] == ("B", "wake")
    assert a2.state is JobState.GRANTED and a2.backend == "B" and r.gate().resident == "a"


def test_the_measured_switch_time_replaces_the_configured_guess_then_averages():
    """The learned switch cost: what a switch took (on the injected clock) is what the policy sees next."""
    r = Rig(policy="cost-aware", switch_cost_s=5.0)
    assert r.s.switching.switch_cost("gpu", None, "a") == 5.0
    r.switcher.takes = {"wake": 12.0}
    a1 = r.submit("a")
    r.dispatch(expect_switch=True)
    assert r.s.switching.switch_cost("gpu", None, "a") == 12.0            # the first measurement replaces the guess
    r.s.finish(a1, Outcome.OK)
    r.switcher.takes = {"sleep": 1.0, "wake": 3.0}
    b1 = r.submit("b")
    r.dispatch(expect_switch=True)
    assert r.s.switching.switch_cost("gpu", "a", "b") == 4.0 and r.s.switching.switch_cost("gpu", "b", "a") == 5.0
    r.s.finish(b1, Outcome.OK)
    r.switcher.takes = {"sleep": 1.0, "wake": 9.0}
    for _ in range(2):                                           # b -> a, then a -> b measured at 10 s
        j = r.submit("a" if r.gate().resident == "b" else "b")
        r.dispatch(expect_switch=True)
        r.s.finish(j, Outcome.OK)
    assert 4.0 < r.s.switching.switch_cost("gpu", "a", "b") < 10.0        # an average, not the last value
