"""Ollama's native API (/api/*) with the official `ollama` package and raw HTTP: against real stand-in backends
(asserting the exact translated request) and against a real mlx_lm.server."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time

import ollama
import pytest

from conftest import call, until
from fake_anthropic import KEY, FakeAnthropic
from fakes import Served, ScriptedHandler

UPSTREAM = "mlx-community/Qwen3-1.7B-4bit"      # the default "fast" model's upstream id
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(40))).decode()


def client(app, port=None, **kw) -> ollama.Client:
    return ollama.Client(host=f"http://127.0.0.1:{port or app.port}", timeout=30, **kw)


def sent(backend) -> dict:
    body = dict(backend.arrivals[-1])
    return body


def post_lines(port, path, body, headers=None):
    """A streamed request read as NDJSON lines (each parsed), with the raw connection for the caller."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


# ---- the exact translated request (stand-in backend) -------------------------------------------------------
def test_chat_maps_messages_images_options_and_format(app, backend):
    r = client(app).chat(model="fast", stream=False, format="json", keep_alive="5m",
                         messages=[{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "what is this?", "images": [PNG]}],
                         options={"temperature": 0.5, "top_p": 0.9, "top_k": 20, "num_predict": 20, "stop": ["x"],
                                  "seed": 7, "num_ctx": 4096, "repeat_penalty": 1.1})
    assert sent(backend) == {
        "_path": "/v1/chat/completions", "model": UPSTREAM,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                  {"type": "image_url",
                                                   "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}],
        "response_format": {"type": "json_object"},
        "temperature": 0.5, "top_p": 0.9, "top_k": 20, "seed": 7, "max_tokens": 20, "stop": ["x"]}
    assert r.model == "fast" and r.done and r.done_reason == "stop"
    assert r.message.role == "assistant" and r.message.content.startswith("echo:")
    assert r.prompt_eval_count == 5 and r.eval_count == 7
    assert all(isinstance(v, int) and v >= 0 for v in (r.total_duration, r.load_duration, r.eval_duration))
    assert r.total_duration >= r.load_duration and r.eval_duration > 0
    assert r.created_at.endswith("Z")
    client(app).chat(model="fast", messages=[{"role": "user", "content": "x"}], options={"seed": -1})
    assert "seed" not in sent(backend)                    # Ollama's -1 is "random": the backend's default


def test_chat_streams_ndjson_lines_with_a_done_line(app, backend):
    chunks = list(client(app).chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert sent(backend)["stream"] is True and sent(backend)["stream_options"] == {"include_usage": True}
    assert [c.message.content for c in chunks[:-1]] == ["t0 ", "t1 ", "t2 "]
    last = chunks[-1]
    assert last.done and last.done_reason == "stop" and last.message.content == ""
    assert last.eval_count == 3 and last.prompt_eval_count == 5 and last.model == "tiny"
    assert not any(c.done for c in chunks[:-1])
    conn, resp = post_lines(app.port, "/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "a"}]})
    lines = resp.read().split(b"\n")
    conn.close()
    assert resp.status == 200 and lines[-1] == b"" and all(json.loads(x) for x in lines[:-1])
    assert resp.getheader("Content-Type") == "application/x-ndjson"      # as Ollama sends it


def test_generate_is_one_user_turn_and_raw_goes_to_completions(app, backend):
    c = client(app)
    r = c.generate(model="fast", prompt="why?", system="you are terse", options={"num_predict": 5})
    assert sent(backend) == {"_path": "/v1/chat/completions", "model": UPSTREAM, "max_tokens": 5,
                             "messages": [{"role": "system", "content": "you are terse"},
                                          {"role": "user", "content": "why?"}]}
    assert r.response == "echo: why?" and r.done and r.eval_count == 7
    parts = list(c.generate(model="fast", prompt="once", raw=True, stream=True))
    assert sent(backend)["_path"] == "/v1/completions" and sent(backend)["prompt"] == "once"
    assert "".join(p.response for p in parts) == "t0 t1 t2 " and parts[-1].done
    c.generate(model="fast", prompt="def f(", suffix="    return x", options={"temperature": 0})
    assert sent(backend) == {"_path": "/v1/completions", "model": UPSTREAM, "prompt": "def f(",
                             "suffix": "    return x", "temperature": 0}
    c.generate(model="fast", prompt="look", images=[PNG])
    assert sent(backend)["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")


def test_an_empty_prompt_loads_without_queueing(app, backend):
    assert client(app).generate(model="fast").done_reason == "load"
    assert client(app).chat(model="fast", messages=[]).done_reason == "load"
    assert backend.arrivals == []


def test_a_large_image_reaches_the_backend_intact_in_either_key_order(app, backend):
    big = base64.b64encode(bytes(range(256)) * 1024).decode()          # 350 KB: the bigjson path
    for msg in ({"role": "user", "content": "describe", "images": ["/9j/" + big]},
                {"images": ["/9j/" + big], "role": "user", "content": "x" * 70000}):
        assert call(app, "POST", "/api/chat", {"model": "fast", "stream": False, "messages": [msg]})[0] == 200
        parts = sent(backend)["messages"][0]["content"]
        assert {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/" + big}} in parts
        assert {"type": "text", "text": msg["content"]} in parts


def test_long_strings_out_of_order_are_expanded_not_lost(app, backend):
    body = {"model": "fast", "stream": False, "prompt": "p" * 70000, "system": "s" * 70000}
    assert call(app, "POST", "/api/generate", body)[0] == 200
    assert sent(backend)["messages"] == [{"role": "system", "content": "s" * 70000},
                                         {"role": "user", "content": "p" * 70000}]


def test_embed_and_legacy_embeddings(app, backend):
    c = client(app)
    r = c.embed(model="fast", input=["a", "b"], dimensions=2)
    assert sent(backend) == {"_path": "/v1/embeddings", "model": UPSTREAM, "input": ["a", "b"], "dimensions": 2}
    assert r.embeddings == [[0.1, 0.2]] and r.model == "fast"
    assert c.embeddings(model="fast", prompt="a").embedding == [0.1, 0.2]


def test_tags_show_ps_version_pull(app, backend):
    c = client(app)
    names = [m.model for m in c.list().models]
    assert {"fast", "tiny", "reasoning"} <= set(names)
    shown = c.show("fast:latest")
    assert "completion" in shown.capabilities and shown.modelinfo["sluice.upstream_model"] == UPSTREAM
    assert c.ps().models == []                    # nothing served yet: nothing known to be loaded
    c.chat(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert [m.model for m in c.ps().models] == ["fast"]
    assert call(app, "GET", "/api/version")[2]["version"]
    assert c.pull("fast").status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("llama3")
    assert e.value.status_code == 404


# ---- tool calls --------------------------------------------------------------------------------------------
class ToolBackend(Served):
    """A stand-in that answers every chat with one tool call (streamed as OpenAI does: arguments in pieces)."""

    def __init__(self):
        self.arrivals: list[dict] = []
        outer = self

        class H(ScriptedHandler):
            def do_GET(self):
                self.send_body(200, b'{"data": []}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.arrivals.append(body)
                call_ = {"index": 0, "id": "c1", "type": "function", "function": {"name": "weather"}}
                if not body.get("stream"):
                    msg = {"role": "assistant", "content": None, "tool_calls": [
                        {**call_, "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}
                    return self.send_body(200, json.dumps({"choices": [{"message": msg, "finish_reason": "tool_calls"}],
                                                       "usage": {"prompt_tokens": 9, "completion_tokens": 4}}).encode())
                pieces = [{"tool_calls": [{**call_, "function": {"name": "weather", "arguments": '{"ci'}}]},
                          {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}]
                events = [{"choices": [{"delta": d, "finish_reason": None}]} for d in pieces]
                events.append({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
                data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
                self.send_body(200, data, "text/event-stream")

        super().__init__(H)


@pytest.fixture
def tool_app(make_app):
    b = ToolBackend()
    yield make_app({"SLUICE_FAST_URL": b.url, "SLUICE_REASONING_URL": b.url}), b
    b.close()


def test_tool_call_round_trip(tool_app):
    app, b = tool_app
    tools = [{"type": "function", "function": {"name": "weather", "description": "the weather",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    c = client(app)
    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    r = c.chat(model="fast", messages=msgs, tools=tools)
    assert b.arrivals[-1]["tools"] == tools
    (tc,) = r.message.tool_calls
    assert tc.function.name == "weather" and tc.function.arguments == {"city": "Oslo"} and r.done_reason == "stop"
    streamed = list(c.chat(model="fast", messages=msgs, tools=tools, stream=True))
    calls = [t for ch in streamed for t in (ch.message.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in calls] == [("weather", {"city": "Oslo"})]
    assert streamed[-1].done
    c.chat(model="fast", tools=tools, messages=msgs + [r.message, {"role": "tool", "content": "sunny",
                                                                   "tool_name": "weather"}])
    assistant, tool = b.arrivals[-1]["messages"][1:]
    assert assistant["tool_calls"] == [{"id": "call_1_0", "type": "function",
                                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1_0"}


# ---- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,words", [
    ({"model": "llama3", "messages": [{"role": "user", "content": "x"}]}, 404, "unknown model"),
    ({"model": "fast", "messages": "hi"}, 400, "messages must be a list"),
    ({"model": "fast", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "fast", "messages": [{"role": "user", "content": "x", "images": [3]}]}, 400, "images[0]"),
    ({"model": "fast", "messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ({"model": "fast", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": 0}}, 400,
     "options.num_predict"),
    ({"model": "fast", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ({"model": "fast", "messages": [{"role": "user", "content": "x"}], "format": 3}, 400, "format"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
])
def test_bad_requests_answer_in_ollamas_envelope(app, backend, body, status, words):
    code, _, answer = call(app, "POST", "/api/chat", body)
    assert code == status and list(answer) == ["error"] and words in answer["error"]
    assert backend.arrivals == []


def test_transport_and_backend_errors_use_the_envelope(app, backend):
    assert call(app, "POST", "/api/chat", raw=b"{nope")[2].keys() == {"error"}
    status, headers, body = call(app, "GET", "/api/chat")
    assert status == 405 and body.keys() == {"error"} and "POST" in headers["Allow"]
    with pytest.raises(ollama.ResponseError) as e:
        client(app).chat(model="fast", messages=[{"role": "user", "content": "!error500"}])
    assert e.value.status_code == 502 and "boom" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client(app).generate(model="nope", prompt="x")
    assert e.value.status_code == 404 and "known models" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:       # the stream broke after its head: an error line
        list(client(app).chat(model="fast", messages=[{"role": "user", "content": "!stream_die"}], stream=True))
    assert "backend" in e.value.error
    status, _, body = call(app, "POST", "/api/embed", {"model": "fast", "input": 5})
    assert status == 400 and "input" in body["error"]


def test_api_keys_apply_and_the_ollama_package_can_send_one(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_API_KEYS": "k-secret"}, wait_ready=False)
    with pytest.raises(ollama.ResponseError) as e:
        client(app).list()
    assert e.value.status_code == 401 and "API key" in e.value.error
    keyed = client(app, headers={"Authorization": "Bearer k-secret"})
    assert "fast" in [m.model for m in keyed.list().models]


def test_queue_full_is_503_with_retry_after(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_MAX_QUEUE_DEPTH": "1"})
    backend.holding = True
    held = [threading.Thread(target=call, args=(app, "POST", "/api/chat", {
        "model": "fast", "stream": False, "messages": [{"role": "user", "content": f"q{i}"}]}), daemon=True)
        for i in range(2)]
    for t in held:
        t.start()
    until(lambda: app.scheduler.snapshot()["pending"] == 1 and backend.current == 1, what="one running, one queued")
    status, headers, body = call(app, "POST", "/api/chat", {"model": "fast", "stream": False,
                                                            "messages": [{"role": "user", "content": "x"}]})
    assert status == 503 and headers["Retry-After"] and body.keys() == {"error"}
    backend.release_all()
    for t in held:
        t.join(10)


def test_priority_header_puts_an_ollama_request_ahead_of_a_flood(app, backend):
    backend.holding = True
    flood = [threading.Thread(target=call, args=(app, "POST", "/v1/chat/completions", {
        "model": "fast", "priority": 4, "messages": [{"role": "user", "content": f"bg{i}"}]}), daemon=True)
        for i in range(3)]
    for t in flood:
        t.start()
    until(lambda: backend.current == 1 and app.scheduler.snapshot()["pending"] == 2, what="a flood queued")
    urgent = threading.Thread(target=client(app, headers={"X-Sluice-Priority": "0"}).chat, daemon=True,
                              kwargs={"model": "fast", "messages": [{"role": "user", "content": "urgent"}]})
    urgent.start()
    until(lambda: app.scheduler.snapshot()["pending"] == 3, what="the urgent one queued")
    backend.release_all()
    for t in [*flood, urgent]:
        t.join(10)
    assert backend.prompts()[1] == "urgent" and backend.max_seen == 1


def test_model_cloud_goes_to_anthropic_outside_the_queue(make_app, backend):
    fake = FakeAnthropic()
    try:
        app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                        "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.url, "PATH": "/usr/bin:/bin"})
        c = client(app)
        assert "cloud" in [m.model for m in c.list().models]
        msgs = [{"role": "user", "content": "hi"}]
        assert c.chat(model="cloud", messages=msgs).message.content == "Hello from Claude"
        parts = list(c.chat(model="cloud", messages=msgs, stream=True))
        assert "".join(p.message.content for p in parts) == "Hello from Claude" and parts[-1].eval_count == 7
        assert c.generate(model="cloud", prompt="hi").response == "Hello from Claude"
        assert backend.arrivals == []
    finally:
        fake.close()


# ---- while queued, and leaving ------------------------------------------------------------------------------
def test_queued_stream_keeps_alive_with_empty_lines_the_ollama_package_accepts(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_SSE_KEEPALIVE_S": "0.1"})
    backend.holding = True
    first = threading.Thread(target=call, args=(app, "POST", "/api/chat", {
        "model": "fast", "stream": False, "messages": [{"role": "user", "content": "first"}]}), daemon=True)
    first.start()
    until(lambda: backend.current == 1, what="the slot taken")
    got, failed = [], []

    def stream():
        try:
            for chunk in client(app).chat(model="fast", messages=[{"role": "user", "content": "second"}],
                                          stream=True):
                got.append(chunk)
        except Exception as e:          # noqa: BLE001 - the test's assertion names it
            failed.append(e)
    t = threading.Thread(target=stream, daemon=True)
    t.start()
    until(lambda: len(got) >= 3, what="keepalive lines while queued")
    assert len(backend.arrivals) == 1                        # still queued
    assert all(c.message.content == "" and not c.done for c in got)
    backend.release_all()
    t.join(10)
    first.join(10)
    assert not failed
    assert "".join(c.message.content for c in got) == "t0 t1 t2 " and got[-1].done


def test_leaving_mid_stream_closes_the_upstream_and_frees_the_slot(app, backend):
    conn, resp = post_lines(app.port, "/api/chat", {"model": "fast",
                                                    "messages": [{"role": "user", "content": "!endless"}]})
    assert json.loads(resp.readline())["message"]["content"] == "la "
    left = time.monotonic()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert backend.wait_disconnects(1, timeout=2)
    assert backend.disconnects[0] - left < 1.0
    until(lambda: app.scheduler.snapshot()["active"] == 0, timeout=1, what="the slot freed")
    # the ollama package leaving a stream early does the same
    stream = client(app).chat(model="fast", messages=[{"role": "user", "content": "!endless"}], stream=True)
    assert next(stream).message.content == "la "
    stream.close()
    assert backend.wait_disconnects(2, timeout=2)
    until(lambda: app.scheduler.snapshot()["active"] == 0, timeout=1, what="the slot freed")
    assert app.scheduler.snapshot()["totals"]["cancelled"] == 2


# ---- the second listener ----------------------------------------------------------------------------------
def test_ollama_port_serves_the_same_routes_and_closes_on_stop(make_app, backend, tmp_path):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, "SLUICE_OLLAMA_PORT": "0"})
    port = app.ollama_port
    assert port and port != app.port
    r = client(app, port=port).chat(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert r.message.content == "echo: hi"
    assert call(port, "GET", "/v1/health")[2]["status"] == "ok"
    app.stop(timeout=2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_ollama_port_setting():
    from sluice import config
    assert config.load(environ={}).ollama_port is None
    assert config.load(environ={"SLUICE_OLLAMA_PORT": "11434"}).ollama_port == 11434
    with pytest.raises(config.ConfigError, match="SLUICE_OLLAMA_PORT"):
        config.load(environ={"SLUICE_OLLAMA_PORT": "big"})


def test_ollama_port_from_toml(tmp_path):
    from sluice import config
    path = tmp_path / "s.toml"
    path.write_text("[server]\nollama_port = 11435\n")
    assert config.load(path, environ={}).ollama_port == 11435


# ---- a real mlx_lm.server ----------------------------------------------------------------------------------
@pytest.fixture
def mlx_app(make_app, mlx_server, tiny_model_dir):
    return make_app({"SLUICE_FAST_URL": mlx_server.url, "SLUICE_REASONING_URL": mlx_server.url,
                     "SLUICE_FAST_MODEL": str(tiny_model_dir), "SLUICE_REASONING_MODEL": str(tiny_model_dir)})


def test_ollama_package_against_mlx(mlx_app):
    c = ollama.Client(host=mlx_app.url, timeout=120)
    opts = {"temperature": 0, "seed": 0, "num_predict": 8}
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    whole = c.chat(model="fast", messages=msgs, options=opts)
    assert whole.done and whole.eval_count == 8 and whole.done_reason == "length" and whole.message.content
    parts = list(c.chat(model="fast", messages=msgs, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].eval_count == 8 and parts[-1].prompt_eval_count == whole.prompt_eval_count
    gen = c.generate(model="tiny", prompt="Once upon a time", options={"num_predict": 4, "temperature": 0})
    assert gen.done and gen.eval_count == 4 and isinstance(gen.response, str)
    raw = list(c.generate(model="fast", prompt="Once upon a time", raw=True, stream=True,
                          options={"num_predict": 4, "temperature": 0}))
    assert raw[-1].done and raw[-1].eval_count == 4
    assert {"fast", "tiny", "reasoning"} <= {m.model for m in c.list().models}
    assert c.show("fast").modelinfo["sluice.upstream_model"]
    assert "fast" in [m.model for m in c.ps().models]
    with pytest.raises(ollama.ResponseError) as e:       # mlx_lm.server has no /v1/embeddings
        c.embed(model="fast", input="hi")
    assert e.value.status_code == 404
