"""Every backend action goes through one owner (sluice/backends.py BackendOps and the scheduler's switch):
an operator's load/sleep/unload on an exclusive gate drains, switches and records exactly as a request's
switch does, and a sleep that did not happen never lets the next model wake beside the old one."""

from __future__ import annotations

import threading

from conftest import call, until
from test_gates import exclusive_toml


def chat(model: str, text: str = "hi") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=fn()), daemon=True)
    t.start()
    return t, out


def awake_overlaps(log: list, awake: set[str]) -> list[str]:
    """Replay a shared control log from a known set of awake models; each moment two were awake at once."""
    awake, bad = set(awake), []
    for model, what in log:
        if what.startswith("POST /sleep"):
            awake.discard(model)
        elif what == "POST /wake_up":
            awake.add(model)
            if len(awake) > 1:
                bad.append(f"{model} woken while {sorted(awake - {model})} awake")
    return bad


def gate(app) -> dict:
    return call(app, "GET", "/admin/status")[2]["gates"][0]


def setup(make_app, make_backend):
    log: list = []
    a, b = make_backend(model="qwen"), make_backend(model="llama")
    a.shared_log = b.shared_log = log
    app = make_app(toml=exclusive_toml(a.url, b.url))
    assert call(app, "POST", "/v1/chat/completions", chat("qwen"))[0] == 200   # qwen resident, llama asleep
    assert b.sleeping and not a.sleeping
    log.clear()
    return app, a, b, log


def test_admin_load_drains_the_busy_resident_first_and_never_wakes_two(make_app, make_backend):
    app, a, b, log = setup(make_app, make_backend)
    a.holding = True
    streaming, answer = in_thread(lambda: call(app, "POST", "/v1/chat/completions", chat("qwen", "in flight")))
    assert a.wait_arrivals(2)
    loading, loaded = in_thread(lambda: call(app, "POST", "/admin/models/llama/load", timeout=30))
    until(lambda: gate(app)["state"] == "draining", what="the operator's load waiting for the drain")
    assert log == [] and b.sleeping and not a.sleeping          # nothing touched while qwen is busy
    # another operator action while this one is pending is refused, not queued behind it
    status, _, body = call(app, "POST", "/admin/models/qwen/sleep")
    assert status == 409 and "switch" in body["error"]["message"]
    a.release_all()
    streaming.join(10)
    loading.join(30)
    assert answer["r"][0] == 200                                # the in-flight request finished
    status, _, body = loaded["r"]
    assert status == 200 and body["switches"][0]["resident"] == "llama", body
    assert log == [("qwen", "POST /sleep?level=1"), ("llama", "POST /wake_up")]
    assert awake_overlaps(log, {"qwen"}) == [] and a.violations == [] and b.violations == []
    g = gate(app)
    assert g["resident"] == "llama" and g["switches"] == 2 and g["last_switch"]["to"] == "llama"
    status, headers, _ = call(app, "POST", "/v1/chat/completions", chat("llama"))
    assert status == 200 and headers["X-Sluice-Backend"] == "B" and gate(app)["switches"] == 2   # no new switch


def test_admin_sleep_of_the_resident_waits_for_its_stream_then_frees_the_gate(make_app, make_backend):
    app, a, b, log = setup(make_app, make_backend)
    a.holding = True
    streaming, answer = in_thread(lambda: call(app, "POST", "/v1/chat/completions", chat("qwen", "in flight")))
    assert a.wait_arrivals(2)
    sleeping, slept = in_thread(lambda: call(app, "POST", "/admin/models/qwen/sleep", timeout=30))
    until(lambda: gate(app)["state"] == "draining", what="the operator's sleep waiting for the drain")
    assert log == []
    a.release_all()
    streaming.join(10)
    sleeping.join(30)
    assert answer["r"][0] == 200 and slept["r"][0] == 200, slept["r"]
    assert log == [("qwen", "POST /sleep?level=1")] and a.violations == []
    assert gate(app)["resident"] is None
    status, headers, _ = call(app, "POST", "/v1/chat/completions", chat("qwen"))   # wakes again on demand
    assert status == 200 and headers["X-Sluice-Backend"] == "A" and log[-1] == ("qwen", "POST /wake_up")


def test_a_failed_sleep_aborts_the_switch_and_never_wakes_the_next_model(make_app, make_backend):
    """qwen's server answers POST /sleep with 500 and says it is awake: llama must not be woken beside it.
    The switch is aborted, qwen stays resident and serving, llama's waiting request gets a 503 saying why."""
    app, a, b, log = setup(make_app, make_backend)
    a.fail_control.add("/sleep")
    status, headers, body = call(app, "POST", "/v1/chat/completions", chat("llama"), timeout=30)
    assert status == 503 and "not switched" in body["error"]["message"] and "qwen" in body["error"]["message"]
    assert "Retry-After" in headers
    assert ("llama", "POST /wake_up") not in log and b.sleeping
    g = gate(app)
    assert g["resident"] == "qwen" and g["last_switch"]["result"] == "aborted" and g["switch_failures"] == 1
    status, headers, _ = call(app, "POST", "/v1/chat/completions", chat("qwen"))
    assert status == 200 and headers["X-Sluice-Backend"] == "A"
    # the same through the operator's door: 503 with the reason, nothing woken
    status, _, body = call(app, "POST", "/admin/models/llama/load", timeout=30)
    assert status == 503 and "not switched" in body["error"]["message"]
    assert ("llama", "POST /wake_up") not in log and gate(app)["resident"] == "qwen"


def test_a_sleep_that_hangs_is_bounded_by_sleep_timeout_s(make_app, make_backend):
    """sleep_timeout_s bounds each sleep call: a /sleep that never answers is a failed sleep after it,
    not a gate held for minutes."""
    log: list = []
    a, b = make_backend(model="qwen"), make_backend(model="llama")
    a.shared_log = b.shared_log = log
    toml = exclusive_toml(a.url, b.url).replace('switch = "vllm-sleep-1"',
                                                'switch = "vllm-sleep-1"\nsleep_timeout_s = 0.5')
    app = make_app(toml=toml)
    assert call(app, "POST", "/v1/chat/completions", chat("qwen"))[0] == 200
    a.hang_control.add("/sleep")              # a /sleep that does not answer
    status, _, body = call(app, "POST", "/v1/chat/completions", chat("llama"), timeout=20)
    a.release_control()
    assert status == 503 and "not switched" in body["error"]["message"], body
    assert ("llama", "POST /wake_up") not in log and gate(app)["resident"] == "qwen"


def test_a_sleep_command_that_cannot_run_is_a_clear_502_not_a_500(make_app, make_backend, tmp_path):
    b = make_backend(model="m")
    missing = tmp_path / "no-such-sleep-command"
    app = make_app(toml=f'''
[[backends]]
name = "B"
url = "{b.url}"
switch = "command"
sleep_cmd = ["{missing}"]
wake_cmd = ["{missing}"]

[[models]]
name = "m"
backends = ["B"]
''')
    for action in ("sleep", "wake"):
        status, _, body = call(app, "POST", f"/admin/models/m/{action}")
        assert status == 502 and "cannot run" in body["error"]["message"] and "sleep_cmd" in body["error"]["message"]
    assert call(app, "POST", "/v1/chat/completions", chat("m"))[0] == 200      # the backend still serves


def test_a_shared_gate_backend_takes_no_new_request_while_an_operator_puts_it_to_sleep(make_app, make_backend):
    """Checked idle and held under one lock hold: a request arriving during the sleep call waits for it,
    instead of being granted to a server going to sleep under it."""
    b = make_backend(model="m")
    app = make_app(toml=f'[[backends]]\nname = "B"\nurl = "{b.url}"\nswitch = "vllm-sleep-1"\n'
                        '[[models]]\nname = "m"\nbackends = ["B"]\n')
    assert call(app, "POST", "/v1/chat/completions", chat("m"))[0] == 200
    b.hang_control.add("/sleep")
    sleeping, slept = in_thread(lambda: call(app, "POST", "/admin/models/m/sleep", timeout=20))
    until(lambda: any("/sleep" in c for _, c in b.control_calls), what="the sleep call under way")
    asking, answer = in_thread(lambda: call(app, "POST", "/v1/chat/completions", chat("m", "late"), timeout=20))
    until(lambda: app.scheduler.snapshot()["pending"] == 1, what="the late request queued, not granted")
    assert len(b.arrivals) == 1
    b.release_control()
    sleeping.join(10)
    asking.join(10)
    assert slept["r"][0] == 200 and "r" in answer          # then granted (to the server the operator put down)


def test_an_aborted_switch_wakes_again_what_it_had_already_put_down(make_app, make_backend):
    """qwen runs on two servers of the gate; the second will not sleep (and says it is awake). The switch
    to llama is aborted; the first, already asleep, is woken again, so qwen keeps both its servers."""
    a1, a2, b = make_backend(model="qwen"), make_backend(model="qwen"), make_backend(model="llama")
    toml = '[[gates]]\nname = "gpu0"\nmode = "exclusive"\nslots = 2\n'
    for name, fake in (("A1", a1), ("A2", a2), ("B", b)):
        toml += f'[[backends]]\nname = "{name}"\nurl = "{fake.url}"\ngate = "gpu0"\nswitch = "vllm-sleep-1"\n'
    toml += '[[models]]\nname = "qwen"\nbackends = ["A1", "A2"]\n[[models]]\nname = "llama"\nbackends = ["B"]\n'
    app = make_app(toml=toml)
    assert call(app, "POST", "/v1/chat/completions", chat("qwen"))[0] == 200
    a2.fail_control.add("/sleep")
    status, _, body = call(app, "POST", "/v1/chat/completions", chat("llama"), timeout=30)
    assert status == 503 and "not switched" in body["error"]["message"]
    assert [c for _, c in a1.control_calls][-2:] == ["POST /sleep?level=1", "POST /wake_up"] and not a1.sleeping
    assert ("llama", "POST /wake_up") not in [(f.model, c) for f in (b,) for _, c in f.control_calls]
    assert gate(app)["resident"] == "qwen"
    for _ in range(4):                                       # both of qwen's servers serve again
        assert call(app, "POST", "/v1/chat/completions", chat("qwen"))[0] == 200
    assert a1.violations == [] and a2.violations == []
