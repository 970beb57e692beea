"""The Anthropic Messages ingress (/v1/messages, /v1/messages/count_tokens) with the official `anthropic` SDK
and raw SSE: against stand-in backends (chat-only, and one that speaks Messages itself), the cloud route's
Anthropic stand-in, and a real mlx_lm.server on the tiny model."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading

import anthropic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import call
from fake_anthropic import KEY, FakeAnthropic
from fakes import Served, ScriptedHandler
from test_api_native import pending, until
from test_openai import leave_mid_stream

PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000" "1f15c4890000000d49444154789c63f8cfc0500f0004850180"
    "84a98c210000000049454e44ae426082")).decode()
WEATHER = {"name": "get_weather", "description": "the weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def sdk(app, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=app.url, api_key="unused", max_retries=0, **kw)


def msg_body(text="hi", model="fast", **kw):
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}], **kw}


class Scripted(Served):
    """A stand-in backend answering scripted bodies: `answer` (a JSON object) or `events` (SSE event bytes,
    sent one by one). Records each request's path, body and raw bytes. `hold` keeps a stream open after its
    first event until the client leaves (`left` set)."""

    def __init__(self):
        self.answer: dict = {}
        self.events: list[bytes] = []
        self.status = 200
        self.hold = False
        self.left = threading.Event()
        self.requests: list[tuple[str, dict, bytes]] = []
        outer = self

        class Handler(ScriptedHandler):
            def do_GET(self):
                self.send_body(200, b'{"object": "list", "data": [{"id": "up-model"}]}')

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append((self.path, json.loads(raw), raw))
                if outer.status != 200 or not json.loads(raw).get("stream"):
                    return self.send_body(outer.status, json.dumps(outer.answer).encode())
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for i, ev in enumerate(outer.events):
                    self.wfile.write(ev)
                    self.wfile.flush()
                    if outer.hold and i == 0:
                        self.connection.settimeout(5)
                        try:
                            self.connection.recv(1)
                        except OSError:
                            pass
                        outer.left.set()
                        return

        super().__init__(Handler)


@pytest.fixture
def scripted():
    s = Scripted()
    yield s
    s.close()


def chat_answer(content=None, tool_calls=None, finish="stop"):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "c1", "object": "chat.completion", "model": "up-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}


def chunk(delta=None, finish=None, usage=None) -> bytes:
    c = {"id": "c1", "object": "chat.completion.chunk", "model": "up-model",
         "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if usage:
        c["usage"] = usage
    return b"data: " + json.dumps(c).encode() + b"\n\n"


def raw_events(app, body, headers=None, read=True):
    """(response, [(event name, data)]) of a raw streamed /v1/messages."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=15)
    conn.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    if not read:
        return conn, resp
    events, name = [], None
    for line in resp.read().decode().splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return resp, events


# ---- translation to a chat-only backend ----------------------------------------------------------------------
def test_sdk_request_reaches_the_backend_as_the_exact_chat_request(app, backend):
    r = sdk(app).messages.create(
        model="fast", max_tokens=20000, stop_sequences=["END"],
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},     # this SDK has no keywords for them
        metadata={"user_id": "u1"}, system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        tools=[WEATHER], tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": "weather in Oslo?"},
                  {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                                                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                     "input": {"city": "Oslo"}}]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                      {"type": "text", "text": "and this?"},
                      {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                      {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}])
    sent = backend.arrivals[-1]
    assert sent == {
        "_path": "/v1/chat/completions", "model": app.api.models["fast"].upstream_model, "max_tokens": 8192,
        "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop": ["END"],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"],
                                                    "description": "the weather in a city"}}],
        "tool_choice": "auto",
        "messages": [
            {"role": "system", "content": "be brief\n\nbe kind"},
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": "checking", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather",
                                                                   "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "user", "content": [
                {"type": "text", "text": "and this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}
    assert r.type == "message" and r.role == "assistant" and r.model == "fast"
    assert r.content[0].type == "text" and r.content[0].text.startswith("echo")
    assert r.stop_reason == "end_turn" and r.usage.input_tokens == 5 and r.usage.output_tokens == 7


def test_a_large_image_reaches_the_backend_whole(app, backend):
    data = base64.b64encode(os.urandom(600_000)).decode()           # > bigjson.THRESHOLD: kept out of the parse
    body = msg_body(stream=True)
    body["messages"][0]["content"] = [{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                                   "data": data}}, {"type": "text", "text": "what?"}]
    resp, events = raw_events(app, body)
    assert events[-1][0] == "message_stop"
    parts = backend.arrivals[-1]["messages"][0]["content"]
    assert parts == [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + data}},
                     {"type": "text", "text": "what?"}]
    status, _, n = call(app, "POST", "/v1/messages/count_tokens", {k: body[k] for k in ("model", "messages")})
    assert status == 200 and n == {"input_tokens": 2 + 1600}


@pytest.mark.parametrize("finish,tool_calls,reason", [
    ("stop", None, "end_turn"), ("length", None, "max_tokens"),
    ("tool_calls", [{"id": "call_9", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}}], "tool_use")])
def test_answers_become_messages_with_their_stop_reason(make_app, scripted, finish, tool_calls, reason):
    app = make_app({"SLUICE_FAST_URL": scripted.url, "SLUICE_REASONING_URL": scripted.url})
    scripted.answer = chat_answer("it is", tool_calls, finish)
    r = sdk(app).messages.create(model="fast", max_tokens=20, tools=[WEATHER],
                                 messages=[{"role": "user", "content": "weather?"}])
    assert r.stop_reason == reason and r.content[0].text == "it is" and r.model == "fast"
    if tool_calls:
        assert (r.content[1].type, r.content[1].id, r.content[1].name, r.content[1].input) == \
            ("tool_use", "call_9", "get_weather", {"city": "Bergen"})
    assert (r.usage.input_tokens, r.usage.output_tokens) == (9, 4)


def test_stream_events_follow_anthropics_grammar(make_app, scripted):
    app = make_app({"SLUICE_FAST_URL": scripted.url, "SLUICE_REASONING_URL": scripted.url})
    scripted.events = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Let me "}),
                       chunk({"content": "check."}),
                       chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"ci'}}]}),
                       chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
                       chunk({}, finish="tool_calls"),
                       chunk(usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}),
                       b"data: [DONE]\n\n"]
    resp, events = raw_events(app, msg_body(stream=True, tools=[WEATHER]))
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert [n for n, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert all(n == d["type"] for n, d in events)
    assert events[0][1]["message"]["model"] == "fast"
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    assert events[6][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"ci'}
    assert events[9][1]["delta"]["stop_reason"] == "tool_use"
    assert events[9][1]["usage"] == {"input_tokens": 9, "output_tokens": 4}
    # the SDK's own accumulator agrees
    with sdk(app).messages.stream(**msg_body(tools=[WEATHER])) as s:
        final = s.get_final_message()
    assert final.content[0].text == "Let me check." and final.content[1].input == {"city": "Oslo"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 4


def test_async_sdk_and_streaming_against_the_fake(app, backend):
    async def go():
        client = anthropic.AsyncAnthropic(base_url=app.url, api_key="x", max_retries=0)
        r = await client.messages.create(**msg_body("async hi"))
        async with client.messages.stream(**msg_body("streamed")) as s:
            text = "".join([t async for t in s.text_stream])
        return r, text
    r, text = asyncio.run(go())
    assert r.content[0].text == "echo: async hi" and text == "t0 t1 t2 "
    assert backend.arrivals[-1]["stream"] is True and backend.arrivals[-1]["stream_options"] == {"include_usage": True}


def test_requests_are_logged_under_their_route(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url})
    call(app, "POST", "/v1/messages", msg_body(priority=1))
    path = app.settings.log_dir / "requests.jsonl"
    until(lambda: path.exists() and path.read_text().strip(), what="the log line")
    line = json.loads(path.read_text().splitlines()[-1])
    assert (line["route"], line["priority"], line["status"], line["usage"]["prompt_tokens"]) == \
        ("/v1/messages", 1, 200, 5)


# ---- errors, in Anthropic's envelope ---------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({"model": "fast", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    (msg_body(max_tokens=0), "max_tokens"),
    ({"model": "fast", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "fast", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    (msg_body(temperature=3), "temperature"),
    (msg_body(top_k=-1), "top_k"),
    (msg_body(stream="yes"), "stream"),
    (msg_body(stop_sequences="END"), "stop_sequences"),
    (msg_body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0]"),
    ({"model": "fast", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}, "messages[0].content[0].source"),
    ({"model": "fast", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "messages[0].content[0].type"),
    (msg_body(model=7), "model"),
])
def test_bad_fields_are_400_invalid_request_naming_the_field(app, backend, body, param):
    status, _, err = call(app, "POST", "/v1/messages", body)
    assert status == 400 and err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"].startswith((param + ":", param + " ")), err
    assert backend.arrivals == []


_any = st.recursive(st.none() | st.booleans() | st.integers(-3, 70000) | st.floats(allow_nan=False)
                    | st.text(max_size=5) | st.sampled_from(["user", "assistant", "system", "text", "image", "tool_use", "tool_result",
                                       "base64", "url", "auto", "any", "tool", "fast"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["type", "role", "content", "text", "source", "id", "name", "input",
                                         "tool_use_id", "data", "media_type", "url", "input_schema"]), inner,
                        max_size=4), max_leaves=12)
_fuzz_body = st.fixed_dictionaries({"model": st.just("fast")}, optional={
    k: _any for k in ("messages", "max_tokens", "system", "tools", "tool_choice", "stop_sequences", "temperature",
                      "top_p", "top_k", "metadata", "stream")})


def test_any_body_is_answered_or_refused_with_a_4xx_never_a_5xx(app):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_fuzz_body, st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]))
    def check(body, path):
        status, _, answer = call(app, "POST", path, body)
        assert status in (200, 400), (status, answer)
        if status == 400:
            assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    check()


def test_unknown_model_is_404_and_the_sdk_raises_its_error(app):
    with pytest.raises(anthropic.NotFoundError) as e:
        sdk(app).messages.create(**msg_body(model="nope"))
    assert e.value.body["error"]["type"] == "not_found_error" and "known models" in e.value.body["error"]["message"]
    status, _, err = call(app, "POST", "/v1/messages/count_tokens", {"model": "nope", "messages": []})
    assert status == 404 and err["error"]["type"] == "not_found_error"
    status, _, err = call(app, "POST", "/v1/messages", raw=b"{not json")
    assert status == 400 and err["error"]["type"] == "invalid_request_error"


def test_queue_full_is_529_overloaded_with_retry_after(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, "SLUICE_MAX_QUEUE_DEPTH": 1})
    backend.holding = True
    ts = [threading.Thread(target=call, args=(app, "POST", "/v1/messages", msg_body(n))) for n in "ab"]
    ts[0].start()
    assert backend.wait_arrivals(1)
    ts[1].start()
    until(lambda: pending(app) == 1)
    status, headers, err = call(app, "POST", "/v1/messages", msg_body("c"))
    assert status == 529 and int(headers["Retry-After"]) >= 1
    assert err == {"type": "error", "error": {"type": "overloaded_error", "message": err["error"]["message"]}}
    with pytest.raises(anthropic.APIStatusError) as e:
        sdk(app).messages.create(**msg_body("d"))
    assert e.value.status_code == 529
    backend.release_all()
    for t in ts:
        t.join(10)


def test_backend_errors_keep_their_4xx_and_5xx_is_502(make_app, scripted):
    app = make_app({"SLUICE_FAST_URL": scripted.url, "SLUICE_REASONING_URL": scripted.url})
    scripted.status, scripted.answer = 404, {"error": "Only 'text' content type is supported."}
    status, _, err = call(app, "POST", "/v1/messages", msg_body())
    assert status == 404 and err["error"]["type"] == "not_found_error" and "Only 'text'" in err["error"]["message"]
    scripted.status = 500
    status, _, err = call(app, "POST", "/v1/messages", msg_body(stream=True))
    assert status == 502 and err["error"]["type"] == "api_error"


def test_keys_accept_x_api_key_and_anthropic_version(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url},
                   toml='[[keys]]\nname = "a"\nkey = "sk-local-0123456789"\n', wait_ready=False)
    ok = anthropic.Anthropic(base_url=app.url, api_key="sk-local-0123456789", max_retries=0)
    until(lambda: call(app, "GET", "/v1/health")[2]["status"] == "ok")
    assert ok.messages.create(**msg_body("keyed")).content[0].text == "echo: keyed"
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=app.url, api_key="wrong", max_retries=0).messages.create(**msg_body())
    assert e.value.body["error"]["type"] == "authentication_error"


# ---- streams: queued, cancelled, failing -----------------------------------------------------------------------
def test_queued_stream_sends_message_start_and_pings_then_its_answer(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_SSE_KEEPALIVE_S": 0.1})
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/messages", msg_body("blocker")))
    t.start()
    assert backend.wait_arrivals(1)
    conn, resp = raw_events(app, msg_body("queued", stream=True), read=False)
    assert resp.status == 200                     # the head went out while it waited
    assert resp.readline() == b"event: message_start\n"
    resp.readline(), resp.readline()
    assert resp.readline() == b"event: ping\n"
    backend.release_all()
    rest = resp.read().decode()
    names = [l[7:] for l in rest.splitlines() if l.startswith("event: ")]
    assert "message_start" not in names and names[-2:] == ["message_delta", "message_stop"]
    assert "t0 " in rest
    t.join(10)
    conn.close()


def test_queued_stream_that_times_out_ends_with_an_error_event(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_SSE_KEEPALIVE_S": 0.1, "SLUICE_QUEUE_TIMEOUT": 0.5})
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/messages", msg_body("blocker")))
    t.start()
    assert backend.wait_arrivals(1)
    resp, events = raw_events(app, msg_body("late", stream=True))
    assert events[0][0] == "message_start" and events[-1] == ("error", {"type": "error", "error": {
        "type": "timeout_error", "message": events[-1][1]["error"]["message"]}})
    backend.release_all()
    t.join(10)


def test_upstream_dying_mid_stream_is_an_error_event_the_sdk_raises(app):
    resp, events = raw_events(app, msg_body("!stream_die", stream=True))
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert "mid-stream" in events[-1][1]["error"]["message"]
    with pytest.raises(anthropic.APIStatusError):
        with sdk(app).messages.stream(**msg_body("!stream_die")) as s:
            s.get_final_message()
    until(lambda: app.scheduler.totals["failed"] == 2)


def test_client_leaving_a_stream_closes_upstream_within_a_second_and_frees_the_slot(make_app, make_backend):
    slow = make_backend(chunks=200, chunk_delay=0.05)
    app = make_app({"SLUICE_FAST_URL": slow.url, "SLUICE_REASONING_URL": slow.url})
    conn, resp = raw_events(app, msg_body("streaming", stream=True), read=False)
    while b"content_block_delta" not in resp.readline():
        pass

    def leave():
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    leave_mid_stream(app, slow, leave, "/v1/messages", msg_body("next"))


def test_priority_from_body_and_header(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url})
    backend.holding = True
    first = threading.Thread(target=call, args=(app, "POST", "/v1/messages", msg_body("first")))
    first.start()
    assert backend.wait_arrivals(1)
    later = [threading.Thread(target=call, args=(app, "POST", "/v1/messages", msg_body("p4", priority=4))),
             threading.Thread(target=call, args=(app, "POST", "/v1/messages", msg_body("p0"),
                                                 {"X-Sluice-Priority": "0"}))]
    for i, t in enumerate(later):
        t.start()
        until(lambda: pending(app) == i + 1)
    backend.release_all()
    for t in [first, *later]:
        t.join(10)
    assert backend.prompts() == ["first", "p0", "p4"] and "priority" not in backend.arrivals[-1]


# ---- a backend that speaks Messages itself --------------------------------------------------------------------
def native_toml(url):
    return f"""
[[backends]]
name = "llamacpp"
url = "{url}"
api = ["openai", "anthropic"]
[[models]]
name = "local"
upstream_model = "up-model"
backends = ["llamacpp"]
"""


def messages_answer(model="up-model"):
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "native hi"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 2}}


def test_a_messages_backend_gets_the_clients_bytes_with_only_the_model_swapped(make_app, scripted):
    app = make_app(toml=native_toml(scripted.url))
    scripted.answer = messages_answer()
    raw = (b'{"model": "local", "max_tokens": 50, "messages": [{"role": "user", "content": [{"type": "document", '
           b'"source": {"type": "text", "media_type": "text/plain", "data": "doc"}}]}], "thinking": {"type": '
           b'"enabled", "budget_tokens": 1024}}')
    status, headers, body = call(app, "POST", "/v1/messages", raw=raw, headers={"anthropic-version": "2023-06-01"})
    assert status == 200 and body == messages_answer("local") and headers["X-Sluice-Backend"] == "llamacpp"
    path, _, sent = scripted.requests[-1]
    assert path == "/v1/messages" and sent == raw.replace(b'"local"', b'"up-model"')
    # asking for more than SLUICE_MAX_TOKENS: re-encoded with the limit
    call(app, "POST", "/v1/messages", {"model": "local", "max_tokens": 99999, "priority": 1,
                                       "messages": [{"role": "user", "content": "x"}]})
    assert scripted.requests[-1][1] == {"model": "up-model", "max_tokens": 8192,
                                        "messages": [{"role": "user", "content": "x"}]}


def test_a_messages_backend_stream_is_relayed_renamed(make_app, scripted):
    app = make_app(toml=native_toml(scripted.url))
    from sluice.translate_stream import message_events, sse
    scripted.events = [sse(e["type"], e) for e in message_events(messages_answer())]
    with sdk(app).messages.stream(model="local", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s:
        final = s.get_final_message()
    assert final.model == "local" and final.content[0].text == "native hi" and final.usage.output_tokens == 2
    scripted.events = scripted.events[:3]          # cut before message_stop
    resp, events = raw_events(app, {"model": "local", "max_tokens": 10, "stream": True,
                                    "messages": [{"role": "user", "content": "x"}]})
    assert events[-1][0] == "error" and "message_stop" in events[-1][1]["error"]["message"]


# ---- the cloud route ---------------------------------------------------------------------------------------
@pytest.fixture
def anthropic_api():
    f = FakeAnthropic()
    yield f
    f.close()


def test_cloud_and_claude_names_pass_through_to_anthropic_bypassing_the_queue(make_app, backend, anthropic_api):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, "PATH": "/usr/bin:/bin",
                    "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": anthropic_api.url,
                    "SLUICE_CLOUD_MODEL": "claude-test"})
    backend.holding = True                         # the local slot is taken: the cloud never waits for it
    t = threading.Thread(target=call, args=(app, "POST", "/v1/messages", msg_body("local")))
    t.start()
    assert backend.wait_arrivals(1)
    r = sdk(app).messages.create(model="cloud", max_tokens=50, system=[{"type": "text", "text": "sys"}],
                                 messages=[{"role": "user", "content": "hi"}], metadata={"user_id": "u"},
                                 extra_headers={"anthropic-beta": "context-management-2025-06-27"})
    assert anthropic_api.last["headers"]["anthropic-beta"] == "context-management-2025-06-27"
    assert r.model == "cloud" and r.content[0].text == "Hello from Claude" and r.usage.input_tokens == 11
    assert anthropic_api.last["body"] == {"model": "claude-test", "max_tokens": 50, "metadata": {"user_id": "u"},
                                          "system": [{"type": "text", "text": "sys"}],
                                          "messages": [{"role": "user", "content": "hi"}]}
    anthropic_api.tool = {"name": "get_weather", "input": {"city": "Oslo"}}
    with sdk(app).messages.stream(model="claude-opus-4-1", max_tokens=50, tools=[WEATHER],
                                  messages=[{"role": "user", "content": "w?"}]) as s:
        final = s.get_final_message()
    assert anthropic_api.last["body"]["model"] == "claude-opus-4-1" and anthropic_api.last["body"]["stream"] is True
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Oslo"}
    assert final.model == "claude-opus-4-1" and final.usage.output_tokens == 7
    backend.release_all()
    t.join(10)
    assert backend.prompts() == ["local"]
    anthropic_api.status = 400                      # Anthropic's own 400 is the client's: it keeps its status
    status, _, err = call(app, "POST", "/v1/messages", msg_body(model="cloud"))
    assert status == 400 and err["error"]["type"] == "invalid_request_error"


def test_cloud_unavailable_is_a_clear_error(app):
    status, _, err = call(app, "POST", "/v1/messages", msg_body(model="cloud"))
    assert status == 529 and "ANTHROPIC_API_KEY" in err["error"]["message"]


# ---- count_tokens ------------------------------------------------------------------------------------------
def test_count_tokens_estimates_without_queueing(app, backend):
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/messages", msg_body("blocker")))
    t.start()
    assert backend.wait_arrivals(1)
    r = sdk(app).messages.count_tokens(model="fast", system="s" * 40, messages=[
        {"role": "user", "content": [{"type": "text", "text": "x" * 400},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": PNG}}]}])
    assert r.input_tokens == 110 + 1600             # 440 characters at ~4 a token, and one image
    status, _, err = call(app, "POST", "/v1/messages/count_tokens", {"model": "fast", "messages": "x"})
    assert status == 400 and err["error"]["message"].startswith("messages must")
    backend.release_all()
    t.join(10)
    assert len(backend.arrivals) == 1


# ---- against the real mlx_lm.server ---------------------------------------------------------------------------
@pytest.fixture
def mlx_app(make_app, mlx_server, tiny_model_dir):
    return make_app({"SLUICE_FAST_URL": mlx_server.url, "SLUICE_REASONING_URL": mlx_server.url,
                     "SLUICE_FAST_MODEL": str(tiny_model_dir), "SLUICE_REASONING_MODEL": str(tiny_model_dir)})


def test_mlx_sync_stream_and_async(mlx_app):
    client = sdk(mlx_app, timeout=60)
    kw = {"model": "fast", "max_tokens": 8, "extra_body": {"temperature": 0},
          "messages": [{"role": "user", "content": "hi"}]}
    r = client.messages.create(**kw)
    assert r.model == "fast" and r.content[0].text and r.stop_reason == "max_tokens" and r.usage.output_tokens == 8
    with client.messages.stream(**kw) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == r.content[0].text and final.usage.output_tokens == 8 and final.stop_reason == "max_tokens"

    async def go():
        return await anthropic.AsyncAnthropic(base_url=mlx_app.url, api_key="x", max_retries=0,
                                              timeout=60).messages.create(**kw)
    assert asyncio.run(go()).content[0].text == r.content[0].text


def test_mlx_tool_round_trip(mlx_app):
    client = sdk(mlx_app, timeout=60)
    first = client.messages.create(model="fast", max_tokens=8, tools=[WEATHER],
                                   messages=[{"role": "user", "content": "weather in Oslo?"}])
    assert first.stop_reason in ("end_turn", "max_tokens", "tool_use")
    turns = [{"role": "user", "content": "weather in Oslo?"},
             {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                "input": {"city": "Oslo"}}]}]
    short = client.messages.count_tokens(model="fast", messages=turns + [{"role": "user", "content": "ok"}])
    second = client.messages.create(model="fast", max_tokens=8, tools=[WEATHER], messages=turns + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"}]}])
    assert second.content[0].text and second.usage.input_tokens > first.usage.input_tokens
    assert short.input_tokens > 0


def test_mlx_image_reaches_the_backend_which_says_it_is_text_only(mlx_app):
    with pytest.raises(anthropic.APIStatusError) as e:
        sdk(mlx_app, timeout=60).messages.create(model="fast", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}])
    assert e.value.status_code == 404 and "Only 'text' content type is supported" in e.value.body["error"]["message"]


# ---- Claude Code, where it installs ------------------------------------------------------------------------------
def test_claude_code_prints_an_answer_through_sluice(app, backend, tmp_path):
    claude = shutil.which("claude", path="/tmp/cc/node_modules/.bin")
    if claude is None:
        pytest.skip("Claude Code is not installed: npm install --prefix /tmp/cc @anthropic-ai/claude-code")
    env = {**os.environ, "ANTHROPIC_BASE_URL": app.url, "ANTHROPIC_API_KEY": "sk-local", "HOME": str(tmp_path),
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "ANTHROPIC_MODEL": "fast",
           "ANTHROPIC_SMALL_FAST_MODEL": "fast"}
    out = subprocess.run([claude, "-p", "say hi", "--model", "fast"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "t0 t1 t2"                 # the stand-in's streamed answer
    sent = backend.arrivals[-1]
    assert sent["_path"] == "/v1/chat/completions" and sent["stream"] is True and sent["max_tokens"] == 8192
    assert sent["messages"][0]["role"] == "system" and [m["role"] for m in sent["messages"][1:]].count("system") == 0
    assert any(t["function"]["name"] == "Bash" for t in sent["tools"])
