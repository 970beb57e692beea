"""Against the real thing: mlx_lm.server on the tiny offline model, behind sluice.

Direct servers are started by the session fixture; managed ones by sluice's own supervisor.
"""

from __future__ import annotations

import os
import signal
import threading

import openai
import pytest

from conftest import call
from test_api_native import until

mlx_lm = pytest.importorskip("mlx_lm", reason="needs mlx-lm: pip install -e '.[mlx]'")


def chat_body(model="fast", text="hi", **kw):
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0,
            "seed": 0, **kw}


@pytest.fixture
def mlx_app(make_app, mlx_server, tiny_model_dir):
    return make_app({"SLUICE_FAST_URL": mlx_server.url, "SLUICE_REASONING_URL": mlx_server.url,
                     "SLUICE_FAST_MODEL": str(tiny_model_dir), "SLUICE_REASONING_MODEL": str(tiny_model_dir)})


def test_tiny_model_is_byte_identical_on_every_build(tmp_path, tiny_model_dir):
    from sluice.tinymodel import build
    again = build(tmp_path / "again")
    for f in sorted(p.name for p in tiny_model_dir.iterdir()):
        assert (again / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f


def test_native_query_and_health_against_mlx(mlx_app, mlx_server):
    health = call(mlx_app, "GET", "/v1/health")[2]
    assert health["status"] == "ok" and health["backends"] == {mlx_server.url: "ready"}
    status, _, body = call(mlx_app, "POST", "/v1/query", {"model": "tiny", "prompt": "What is 2+2?",
                                                          "max_tokens": 8, "temperature": 0}, timeout=60)
    assert status == 200 and body["status"] == "ok" and isinstance(body["result"], str) and body["result"]


def test_openai_sdk_stream_equals_non_stream(mlx_app):
    client = openai.OpenAI(base_url=mlx_app.url + "/v1", api_key="x", max_retries=0, timeout=60)
    full = client.chat.completions.create(**chat_body())
    text = full.choices[0].message.content
    chunks = list(client.chat.completions.create(**chat_body(), stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and streamed == text
    assert full.usage.completion_tokens == 8 and chunks[-1].usage.completion_tokens == 8
    comp = client.completions.create(model="reasoning", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert comp.choices[0].text is not None


def test_concurrent_clients_are_serialized_and_all_answered(mlx_app):
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        call(mlx_app, "POST", "/v1/chat/completions", chat_body(text=f"q{i}", priority=i % 5), timeout=120)[0]))
        for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 6
    q = call(mlx_app, "GET", "/v1/queue/status")[2]
    assert q["total_served"] == 6 and q["pending"] == 0


def managed_toml(tiny_model_dir, cache, idle_unload_s=0) -> str:
    import sys
    return f"""
[[backends]]
name = "mlx"
command = ["{sys.executable}", "-m", "mlx_lm", "server", "--model", "{{model}}", "--host", "{{host}}", "--port", "{{port}}"]
model_path = "{tiny_model_dir}"
idle_unload_s = {idle_unload_s}
env = {{ HF_HUB_OFFLINE = "1", HF_HUB_CACHE = "{cache}" }}

[[models]]
name = "fast"
upstream_model = "{tiny_model_dir}"
backends = ["mlx"]
"""


def info(app):
    return call(app, "GET", "/admin/status")[2]["backends"][0]


def test_managed_mlx_lazy_start_idle_unload_and_crash_restart(make_app, tiny_model_dir, tmp_path):
    cache = tmp_path / "hf"
    cache.mkdir()
    app = make_app(toml=managed_toml(tiny_model_dir, cache, idle_unload_s=1))
    assert info(app)["state"] == "stopped"                       # lazy: nothing runs before a request
    assert call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[0] == 200
    first = info(app)
    assert first["state"] == "ready" and first["pid"]
    until(lambda: info(app)["state"] == "stopped", timeout=20, what="idle unload")
    assert call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[0] == 200
    pid = info(app)["pid"]
    assert pid and pid != first["pid"]
    os.kill(pid, signal.SIGKILL)                                  # a crash (as on Metal OOM)
    status, _, _ = call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)
    assert status in (200, 502)
    until(lambda: call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[0] == 200, timeout=60)
    assert info(app)["pid"] != pid


def test_two_real_servers_take_turns_on_one_exclusive_gate(make_app, tiny_model_dir, tmp_path):
    import sys
    cache = tmp_path / "hf"
    cache.mkdir()
    backends = "".join(f"""
[[backends]]
name = "{n}"
gate = "gpu0"
command = ["{sys.executable}", "-m", "mlx_lm", "server", "--model", "{{model}}", "--host", "{{host}}", "--port", "{{port}}"]
model_path = "{tiny_model_dir}"
idle_unload_s = 0
env = {{ HF_HUB_OFFLINE = "1", HF_HUB_CACHE = "{cache}" }}

[[models]]
name = "m{n}"
upstream_model = "{tiny_model_dir}"
backends = ["{n}"]
""" for n in ("a", "b"))
    app = make_app(toml='[[gates]]\nname = "gpu0"\nmode = "exclusive"\npolicy = "fifo"\n' + backends)
    for model in ("ma", "mb", "ma"):
        assert call(app, "POST", "/v1/chat/completions", chat_body(model=model), timeout=180)[0] == 200
        states = {b["name"]: b["state"] for b in call(app, "GET", "/admin/status")[2]["backends"]}
        awake = model[1]
        assert states[awake] == "ready" and states["b" if awake == "a" else "a"] == "stopped"
    gate = call(app, "GET", "/admin/status")[2]["gates"][0]
    assert gate["switches"] == 3 and gate["resident"] == "ma"


def test_two_server_pool(make_app, mlx_server, tiny_model_dir, tmp_path):
    from mlx_backend import start_direct_server
    second = start_direct_server(tiny_model_dir, tmp_path)
    try:
        app = make_app(toml=f"""
[[gates]]
name = "gpu"
slots = 2
[[backends]]
name = "one"
url = "{mlx_server.url}"
slots = 1
[[backends]]
name = "two"
url = "{second.url}"
slots = 1
[[models]]
name = "fast"
upstream_model = "{tiny_model_dir}"
backends = ["one", "two"]
""")
        seen = []
        threads = [threading.Thread(target=lambda: seen.append(
            call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[1]["X-Sluice-Backend"]))
            for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(set(seen)) == ["one", "two"] and len(seen) == 4
    finally:
        second.stop()
