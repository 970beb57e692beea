"""Adaptive sleep levels on the daemon (`switch = "vllm-sleep-auto"`, sluice/backends.py BackendOps).

vLLM cannot move a sleeping model from level 1 to level 2 without waking it, so the level is chosen when a
model is put to sleep: level 1 when its last sleep was shorter than `demote_after_s` (or it never slept)
and the level-1 weights fit `l1_ram_budget_gb`, else level 2; a wake uses the level it sleeps at. A managed
backend asleep `stop_after_s` is stopped. Stand-in vLLM servers are real HTTP servers (tests/fakes.py,
tests/fake_engine.py); time-dependent choices run on an injected clock.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import base_env, call
from fakes import FakeClock
from sluice import config
from sluice.backend_rules import State
from sluice.backends import BackendOps, default_l1_ram_budget_gb, process_spec
from sluice.monitor import Supervisor
from sluice.upstream import Upstream
from test_gates import exclusive_toml
from test_switch_faults import events, managed_toml

WAKE_L2 = ["POST /wake_up", "POST /collective_rpc reload_weights", "POST /reset_prefix_cache"]


def auto_toml(urls: dict[str, str], weights_gb: float = 1.0, demote_after_s: float = 900.0, server: str = "") -> str:
    """An exclusive gate of vllm-sleep-auto servers; backend X serves model mX."""
    out = f'{server}\n[[gates]]\nname = "gpu0"\nmode = "exclusive"\npolicy = "fifo"\n'
    for name, url in urls.items():
        out += (f'\n[[backends]]\nname = "{name}"\nurl = "{url}"\ngate = "gpu0"\nswitch = "vllm-sleep-auto"\n'
                f'weights_gb = {weights_gb}\ndemote_after_s = {demote_after_s}\n')
    for name in urls:
        out += f'\n[[models]]\nname = "m{name}"\nbackends = ["{name}"]\n'
    return out


def chat(app, model: str):
    return call(app, "POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                timeout=30)


def calls(fake) -> list[str]:
    return [what for _, what in fake.control_calls]


def level_of(app, name: str):
    return next(b for b in call(app, "GET", "/admin/status")[2]["backends"] if b["name"] == name)["sleep_level"]


def settings_for(tmp_path: Path, toml: str) -> config.Settings:
    path = tmp_path / "levels.toml"
    path.write_text(toml)
    return config.load(path, environ=base_env(tmp_path))


@pytest.fixture
def ops_over(tmp_path):
    """BackendOps on an injected clock over real stand-in servers, without the rest of the daemon."""
    made: list[Upstream] = []

    def make(toml: str, clock, **kw) -> BackendOps:
        s = settings_for(tmp_path, toml)
        ups = {b.name: Upstream(b.name, b.url) for b in s.backends}
        made.extend(ups.values())
        return BackendOps({b.name: b for b in s.backends}, ups, clock=clock, **kw)
    yield make
    for u in made:
        u.close()


# ---- through the daemon's gate ------------------------------------------------------------------------------
def test_a_model_that_comes_back_soon_sleeps_at_level_1_and_wakes_with_just_wake_up(make_app, make_backend):
    log: list = []
    a, b = make_backend(model="qa"), make_backend(model="qb")
    a.shared_log = b.shared_log = log
    app = make_app(toml=auto_toml({"A": a.url, "B": b.url}, demote_after_s=3600))
    assert chat(app, "mA")[0] == 200         # B never slept: level 1; A was never put to sleep and is awake
    assert log == [("qb", "POST /sleep?level=1")]
    assert level_of(app, "B") == 1 and level_of(app, "A") is None
    for _ in range(2):
        assert chat(app, "mB")[0] == 200 and chat(app, "mA")[0] == 200
    assert log[1:] == [("qa", "POST /sleep?level=1"), ("qb", "POST /wake_up"),
                       ("qb", "POST /sleep?level=1"), ("qa", "POST /wake_up")] * 2
    assert a.violations == [] and b.violations == []


def test_a_model_asleep_longer_than_demote_after_s_sleeps_at_level_2_next_time(make_app, make_backend):
    """demote_after_s = 0: every finished sleep counts as long, so after its first sleep (level 1: never seen)
    each model sleeps at level 2 and is woken with reload_weights + reset_prefix_cache."""
    a, b = make_backend(model="qa"), make_backend(model="qb")
    app = make_app(toml=auto_toml({"A": a.url, "B": b.url}, demote_after_s=0))
    assert chat(app, "mA")[0] == 200 and chat(app, "mB")[0] == 200       # B: sleep L1, wake L1
    assert chat(app, "mA")[0] == 200                                     # B sleeps again: its last sleep was long
    assert calls(b) == ["POST /sleep?level=1", "POST /wake_up", "POST /sleep?level=2"]
    assert level_of(app, "B") == 2
    assert chat(app, "mB")[0] == 200
    assert calls(b)[3:] == WAKE_L2 and level_of(app, "B") is None
    assert calls(a) == ["POST /sleep?level=1", "POST /wake_up", "POST /sleep?level=2"]


def test_the_default_ram_budget_is_half_the_ram_and_never_exceeded(make_app, make_backend):
    """Three models, each 0.6 of the default budget (half the RAM): one level-1 sleeper fits, two do not."""
    budget = default_l1_ram_budget_gb()
    assert budget > 0
    fakes = {n: make_backend(model=f"q{n}") for n in "ABC"}
    app = make_app(toml=auto_toml({n: f.url for n, f in fakes.items()}, weights_gb=round(budget * 0.6, 3),
                                  demote_after_s=3600))
    for model in ["mA", "mB", "mC"] * 3:
        assert chat(app, model)[0] == 200
        levels = {n: level_of(app, n) for n in fakes}
        asleep_l1 = [n for n, f in fakes.items() if f.sleeping and calls(f)[-1] == "POST /sleep?level=1"]
        assert len(asleep_l1) <= 1 and asleep_l1 == [n for n, lv in levels.items() if lv == 1], (model, levels)
    assert any("POST /sleep?level=1" in calls(f) for f in fakes.values())
    assert any("POST /sleep?level=2" in calls(f) for f in fakes.values())
    for f in fakes.values():                  # every level-2 sleep was woken with a reload
        c = calls(f)
        for i, what in enumerate(c[:-1]):
            if what == "POST /sleep?level=2":
                assert c[i + 1:i + 4] == WAKE_L2


def test_the_server_budget_setting_reaches_the_backends(make_app, make_backend):
    fakes = {n: make_backend(model=f"q{n}") for n in "AB"}
    app = make_app(toml=auto_toml({n: f.url for n, f in fakes.items()}, weights_gb=10,
                                  server="[server]\nl1_ram_budget_gb = 5"))
    assert app.ops.l1_ram_budget_gb == 5
    assert chat(app, "mA")[0] == 200
    assert calls(fakes["B"]) == ["POST /sleep?level=2"]                  # 10 GB do not fit in 5


def test_a_failed_sleep_still_aborts_the_switch_and_leaves_no_level_behind(make_app, make_backend):
    log: list = []
    a, b = make_backend(model="qa"), make_backend(model="qb")
    a.shared_log = b.shared_log = log
    app = make_app(toml=auto_toml({"A": a.url, "B": b.url}))
    assert chat(app, "mA")[0] == 200
    a.fail_control.add("/sleep")              # answers 500 and stays awake: neither asleep nor gone
    status, _, body = chat(app, "mB")
    assert status == 503 and "not switched" in body["error"]["message"]
    assert ("qb", "POST /wake_up") not in log and b.sleeping
    assert level_of(app, "A") is None and level_of(app, "B") == 1
    assert chat(app, "mA")[0] == 200


# ---- BackendOps on an injected clock --------------------------------------------------------------------------
def test_demotion_by_the_length_of_the_last_sleep(ops_over, make_backend):
    clock = FakeClock()
    a = make_backend(model="qa")
    ops = ops_over(auto_toml({"A": a.url}, demote_after_s=900), clock)
    ops.switch("A", "sleep")                  # never slept: level 1
    clock.advance(899)
    ops.switch("A", "wake")                   # back within demote_after_s
    ops.switch("A", "sleep")
    assert ops.asleep_level("A") == 1
    clock.advance(900)
    ops.switch("A", "wake")                   # this one lasted demote_after_s
    assert calls(a) == ["POST /sleep?level=1", "POST /wake_up"] * 2
    ops.switch("A", "sleep")
    assert ops.asleep_level("A") == 2 and calls(a)[-1] == "POST /sleep?level=2"
    clock.advance(1)
    ops.switch("A", "wake")
    assert calls(a)[5:] == WAKE_L2 and ops.asleep_level("A") is None
    ops.switch("A", "sleep")                  # a short one again: level 1
    assert calls(a)[-1] == "POST /sleep?level=1"


def test_a_wake_of_a_server_this_sluice_did_not_put_to_sleep(ops_over, make_backend):
    a = make_backend(model="qa")
    ops = ops_over(auto_toml({"A": a.url}), FakeClock())
    ops.switch("A", "wake")                   # awake: nothing to do
    assert calls(a) == []
    a.sleeping = True                         # asleep at a level nobody knows: level 2's wake fits either
    ops.switch("A", "wake")
    assert calls(a) == WAKE_L2 and not a.sleeping


def test_the_budget_counts_every_level_1_sleeper(ops_over, make_backend):
    fakes = {n: make_backend(model=f"q{n}") for n in "ABC"}
    ops = ops_over(auto_toml({n: f.url for n, f in fakes.items()}, weights_gb=10), FakeClock(), l1_ram_budget_gb=15)
    ops.switch("A", "sleep")
    ops.switch("B", "sleep")                  # A's 10 GB + B's 10 GB > 15
    ops.switch("C", "sleep")
    assert [ops.asleep_level(n) for n in "ABC"] == [1, 2, 2]
    ops.switch("A", "wake")                   # A's RAM is free again
    ops.switch("B", "wake")
    ops.switch("B", "sleep")
    assert ops.asleep_level("B") == 1
    ops.switch("A", "sleep")
    assert ops.asleep_level("A") == 2
    assert [calls(f)[0] for f in fakes.values()] == ["POST /sleep?level=1", "POST /sleep?level=2",
                                                     "POST /sleep?level=2"]
    assert calls(fakes["B"])[1:4] == WAKE_L2


def test_concurrent_sleeps_never_both_take_the_last_room(ops_over, make_backend):
    fakes = {n: make_backend(model=f"q{n}") for n in "ABCD"}
    ops = ops_over(auto_toml({n: f.url for n, f in fakes.items()}, weights_gb=10), FakeClock(), l1_ram_budget_gb=10)
    threads = [threading.Thread(target=ops.switch, args=(n, "sleep")) for n in fakes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(ops.asleep_level(n) for n in fakes) == [1, 2, 2, 2]
    assert sum(calls(f) == ["POST /sleep?level=1"] for f in fakes.values()) == 1


# ---- managed vLLM engines -----------------------------------------------------------------------------------
@pytest.fixture
def managed_ops(tmp_path):
    """BackendOps over a Supervisor of tests/fake_engine.py processes, both on one injected clock; the
    monitor never ticks by itself (the test calls check())."""
    made: list[Supervisor] = []

    def make(clock, **opts) -> BackendOps:
        opts = {"switch": "vllm-sleep-auto", "weights_gb": 1, **opts}
        s = settings_for(tmp_path, managed_toml(tmp_path, engine="vllm", a_opts=opts, **opts))
        specs = [process_spec(b, s) for b in s.backends]
        sup = Supervisor(specs, tmp_path / "run", clock=clock, tick_s=3600).start()
        made.append(sup)
        return BackendOps({b.name: b for b in s.backends}, {}, sup, clock=clock)
    yield make
    for s in made:
        s.stop()


def control(tmp_path: Path, name: str) -> list:
    return [(e["event"], e.get("level") or e.get("method")) for e in events(tmp_path / f"{name}.events")
            if e["event"] in ("sleep", "wake_up", "collective_rpc", "reset_prefix_cache")]


def test_a_managed_engine_asleep_longer_than_stop_after_s_is_stopped(managed_ops, tmp_path):
    clock = FakeClock()
    ops = managed_ops(clock, stop_after_s=60, demote_after_s=50)
    a = ops.supervisor.get("A")
    ops.switch("A", "wake")                   # a cold start
    ops.switch("A", "sleep")
    assert a.state is State.SLEEPING and ops.asleep_level("A") == 1 and a.info()["sleep_level"] == 1
    clock.advance(59)
    a.check()
    assert a.state is State.SLEEPING
    clock.advance(1)
    a.check()
    assert a.wait_for(State.STOPPED, 10) and a.pid is None and ops.asleep_level("A") is None
    ops.switch("A", "wake")                   # a cold start again
    assert a.spawns == 2
    ops.switch("A", "sleep")                  # its last sleep lasted 60 s >= demote_after_s
    assert ops.asleep_level("A") == 2
    ops.switch("A", "wake")
    assert control(tmp_path, "A") == [("sleep", 1), ("sleep", 2), ("wake_up", None),
                                      ("collective_rpc", "reload_weights"), ("reset_prefix_cache", None)]


def test_a_managed_engine_that_comes_back_soon_keeps_level_1_and_idle_unload_asks_too(managed_ops, tmp_path):
    clock = FakeClock()
    ops = managed_ops(clock, demote_after_s=50, idle_unload_s=30)
    a = ops.supervisor.get("A")
    ops.switch("A", "wake")
    ops.switch("A", "sleep")
    clock.advance(10)
    a.ensure_ready(10)                        # woken by a request, not by the book: it notices
    assert ops.asleep_level("A") is None and a.last_sleep_s == 10
    clock.advance(30)
    a.check()                                 # the supervisor's idle unload asks the book too
    assert a.wait_for(State.SLEEPING, 10) and ops.asleep_level("A") == 1
    clock.advance(50)
    ops.switch("A", "wake")                   # that sleep lasted demote_after_s: the next is level 2
    ops.switch("A", "sleep")
    assert ops.asleep_level("A") == 2
    assert control(tmp_path, "A") == [("sleep", 1), ("wake_up", None), ("sleep", 1), ("wake_up", None),
                                      ("sleep", 2)]


def test_a_managed_engine_whose_sleep_fails_is_stopped_and_leaves_the_book(managed_ops, tmp_path):
    clock = FakeClock()
    s = settings_for(tmp_path, managed_toml(tmp_path, engine="vllm", a_flags=("--fail-sleep",),
                                            a_opts={"switch": "vllm-sleep-auto", "weights_gb": 1}))
    sup = Supervisor([process_spec(b, s) for b in s.backends], tmp_path / "run", clock=clock, tick_s=3600).start()
    try:
        ops = BackendOps({b.name: b for b in s.backends}, {}, sup, clock=clock)
        ops.switch("A", "wake")
        ops.switch("A", "sleep")              # the sleep fails, the supervisor stops it: verified gone
        assert sup.get("A").state is State.STOPPED and "sleep failed" in sup.get("A").last_error
        assert ops.asleep_level("A") is None
    finally:
        sup.stop()


# ---- configuration ------------------------------------------------------------------------------------------
def test_config_of_sleep_levels(tmp_path):
    s = settings_for(tmp_path, auto_toml({"A": "http://127.0.0.1:9/v1"}, weights_gb=8, demote_after_s=60,
                                         server="[server]\nl1_ram_budget_gb = 24"))
    assert s.l1_ram_budget_gb == 24 and (s.backends[0].weights_gb, s.backends[0].demote_after_s) == (8, 60)
    assert settings_for(tmp_path, exclusive_toml("http://a/v1", "http://b/v1")).l1_ram_budget_gb is None
    bad = [(auto_toml({"A": "http://a/v1"}).replace("weights_gb = 1.0\n", ""), "backends.A.weights_gb"),
           (auto_toml({"A": "http://a/v1"}).replace("weights_gb", "stop_after_s = 60\nweights_gb"),
            "backends.A.stop_after_s: sluice does not run this server"),
           (auto_toml({"A": "http://a/v1"}, server="[server]\nl1_ram_budget_gb = -1"), "server.l1_ram_budget_gb"),
           (managed_toml(tmp_path, a_opts={"switch": "vllm-sleep-auto", "weights_gb": 1}), "engine = \"vllm\"")]
    for toml, message in bad:
        with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
            settings_for(tmp_path, toml)
