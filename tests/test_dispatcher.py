"""The dispatcher thread never dies silently: a pass that raises (a policy bug) or a switch callback that
raises is logged, what must be answered is answered, and dispatching goes on; health says `degraded` with
the reason while it is failing."""

from __future__ import annotations

import threading

from conftest import call, until
from sluice import policies
from sluice.config import GateConfig
from sluice.scheduler import BackendSpec, Health, Job, JobState, Outcome, Scheduler
from test_gates import exclusive_toml


def two_model_gate(**kw) -> Scheduler:
    s = Scheduler([GateConfig("gpu", mode="exclusive")],
                  [BackendSpec("A", "gpu", frozenset({"a"})), BackendSpec("B", "gpu", frozenset({"b"}))],
                  max_queue_depth=10, **kw)
    for b in ("A", "B"):
        s.set_health(b, Health.READY)
    return s


def test_a_policy_that_raises_is_reported_and_dispatching_goes_on_once_it_stops():
    healthy = threading.Event()

    def policy(name, view, costs):
        if not healthy.is_set():
            raise ZeroDivisionError("a bug in a policy")
        return policies.decide(name, view, costs)

    s = two_model_gate(decide=policy, switcher=lambda backend, action: None)
    s.start()
    try:
        job = Job("a", 2, "/v1/query")
        s.submit(job)
        until(lambda: s.dispatcher_problem() is not None, what="the failing pass reported")
        assert "ZeroDivisionError" in s.dispatcher_problem() and "ZeroDivisionError" in s.snapshot()["dispatcher"]
        assert job.state is JobState.QUEUED
        healthy.set()
        until(lambda: job.state is JobState.GRANTED, what="the job granted once the policy works again")
        until(lambda: s.dispatcher_problem() is None, what="the problem cleared")
        s.finish(job, Outcome.OK)
    finally:
        s.stop()


def test_a_switch_callback_that_raises_does_not_stop_the_switch_or_the_grants():
    def on_switch(gate, phases):
        raise RuntimeError("a bug in a metrics callback")

    s = two_model_gate(switcher=lambda backend, action: None, on_switch=on_switch)
    s.start()
    try:
        first, second = Job("a", 2, "/v1/query"), Job("b", 2, "/v1/query")
        s.submit(first)
        until(lambda: first.state is JobState.GRANTED, what="a granted after its switch")
        s.finish(first, Outcome.OK)
        s.submit(second)
        until(lambda: second.state is JobState.GRANTED, what="b granted after the next switch")
        s.finish(second, Outcome.OK)
        assert s.snapshot()["gates"]["gpu"]["switches"] == 2 and s.dispatcher_problem() is None
    finally:
        s.stop()


def test_health_is_degraded_with_the_reason_while_dispatch_passes_fail(make_app, make_backend, monkeypatch):
    broken = threading.Event()
    broken.set()
    real = policies.decide

    def policy(name, view, costs):
        if broken.is_set():
            raise KeyError("policy state")
        return real(name, view, costs)

    monkeypatch.setattr(policies, "decide", policy)        # fault injection: the policy the scheduler uses
    a, b = make_backend(model="qwen"), make_backend(model="llama")
    app = make_app(toml=exclusive_toml(a.url, b.url))
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=call(app, "POST", "/v1/chat/completions", {
        "model": "qwen", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)), daemon=True)
    t.start()
    until(lambda: call(app, "GET", "/v1/health")[2]["status"] == "degraded", what="health degraded")
    assert "dispatch pass failed" in call(app, "GET", "/v1/health")[2]["problem"]
    broken.clear()
    t.join(15)
    assert result["r"][0] == 200
    until(lambda: call(app, "GET", "/v1/health")[2]["status"] == "ok", what="health ok again")
