"""POST /v1/responses: the openai SDK's responses.create through sluice, translated to chat completions for
backends that speak only those (a stand-in asserting the exact request; a real mlx_lm.server), and passed
through to backends that declare api = ["openai", "responses"]."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import call, until
from fakes import Served, ScriptedHandler
from test_api_native import pending, totals_add_up
from test_observe import read_log
from sluice import errors
from sluice.translate_responses import ResponsesStream, shell, to_chat, to_response

UPSTREAM = "mlx-community/Qwen3-1.7B-4bit"     # the default fast model's upstream id (the `app` fixture)


def sdk(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0, timeout=60)


def sse(obj: dict, event: str | None = None) -> bytes:
    return (f"event: {event}\n" if event else "").encode() + b"data: " + json.dumps(obj).encode() + b"\n\n"


class Scripted(Served):
    """A stand-in backend that records each POST (path, raw bytes, parsed body) and answers it with
    `reply(path, body)`: a dict (JSON) or a list of SSE event bytes (a stream)."""

    def __init__(self, reply):
        self.reply = reply
        self.arrivals: list[tuple[str, bytes, dict]] = []
        outer = self

        class Handler(ScriptedHandler):
            def do_GET(self):
                self.send_body(200, json.dumps({"object": "list", "data": []}).encode())

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                outer.arrivals.append((self.path, raw, body))
                answer = outer.reply(self.path, body)
                if isinstance(answer, dict):
                    return self.send_body(200, json.dumps(answer).encode())
                self.send_body(200, b"".join(answer), "text/event-stream")

        super().__init__(Handler)


@pytest.fixture
def scripted():
    made = []

    def make(reply) -> Scripted:
        made.append(Scripted(reply))
        return made[-1]
    yield make
    for s in made:
        s.close()


TOML = """
[[backends]]
name = "chat"
url = "{chat}"
models = []

[[backends]]
name = "resp"
url = "{resp}"
api = ["openai", "responses"]
models = []

[[models]]
name = "chatty"
upstream_model = "chat-v1"
backends = ["chat"]

[[models]]
name = "native"
upstream_model = "resp-v1"
backends = ["resp"]
"""

TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def tool_call_answer(path, body):
    """A chat backend that calls get_weather (streamed mlx_lm-style: the call whole in one chunk, then the
    OpenAI style: arguments in pieces)."""
    call_ = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    if not body.get("stream"):
        return {"id": "c", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": None, "tool_calls": [call_]}}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": body["model"]}
    return [sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Checking."}}]}),
            sse({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":'}}]}}]}),
            sse({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": '"Oslo"}'}}]}}]}),
            sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            sse({**chunk, "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}),
            b"data: [DONE]\n\n"]


# ---- translation: the exact chat request, and the answer back -----------------------------------------------
def test_translated_request_is_exactly_the_chat_equivalent(app, backend):
    r = sdk(app).responses.create(
        model="fast", instructions="Be brief.", max_output_tokens=50, temperature=0.5, top_p=0.9,
        tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        text={"format": {"type": "json_object"}}, reasoning={"effort": "low"}, store=False,
        extra_body={"priority": 1},
        input=[{"role": "developer", "content": [{"type": "input_text", "text": "Use tools."},
                                               {"type": "input_text", "text": "Really."}]},
               {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"},
                                            {"type": "input_image", "image_url": "data:image/png;base64,AAAA",
                                             "detail": "low"}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
               {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
               {"type": "reasoning", "id": "rs_1", "summary": []},
               {"type": "function_call_output", "call_id": "call_9", "output": "sunny"}])
    path = backend.arrivals[-1].pop("_path")
    assert path == "/v1/chat/completions"
    assert backend.arrivals[-1] == {
        "model": UPSTREAM, "max_tokens": 50, "temperature": 0.5, "top_p": 0.9,
        "messages": [
            {"role": "system", "content": "Be brief.\n\nUse tools.\n\nReally."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                             "detail": "low"}}]},
            {"role": "assistant", "content": "Let me see.", "tool_calls": [
                {"id": "call_9", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}],
        "tools": [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "response_format": {"type": "json_object"}}
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.model == "fast" and r.output_text == "echo: sunny"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (5, 7, 12)
    assert r.instructions == "Be brief." and r.max_output_tokens == 50


def test_a_plain_string_input_and_the_job_log(app, backend):
    status, headers, body = call(app, "POST", "/v1/responses", {"model": "fast", "input": "hi"})
    assert status == 200 and headers["X-Sluice-Backend"] and body["output"][0]["content"][0]["text"] == "echo: hi"
    assert backend.arrivals[-1]["messages"] == [{"role": "user", "content": "hi"}]
    assert "max_tokens" not in backend.arrivals[-1] and "stream" not in backend.arrivals[-1]
    assert call(app, "GET", "/v1/queue/status")[2]["total_served"] == 1


def test_a_large_image_and_long_instructions_reach_the_backend_whole(app, backend):
    url = "data:image/png;base64," + "A" * 300_000
    instructions = "Be brief. " * 10_000
    status, _, body = call(app, "POST", "/v1/responses", {"model": "fast", "instructions": instructions, "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": "?"}]}]})
    assert status == 200 and body["instructions"] == instructions
    sent = backend.arrivals[-1]["messages"]
    assert sent[0] == {"role": "system", "content": instructions}
    assert sent[1]["content"][0] == {"type": "image_url", "image_url": {"url": url}}
    # the same with `input` first: translation puts the long strings in the other order
    image = {"role": "user", "content": [{"type": "input_image", "image_url": url}]}
    raw = json.dumps({"model": "fast", "input": [image], "instructions": instructions}).encode()
    assert call(app, "POST", "/v1/responses", raw=raw)[0] == 200
    sent = backend.arrivals[-1]["messages"]
    assert sent[0]["content"] == instructions and sent[1]["content"][0]["image_url"]["url"] == url


def test_priority_from_the_body_or_the_header_orders_the_queue(app, backend):
    backend.holding = True
    blocker = {"model": "fast", "input": "blocker"}
    threads = [threading.Thread(target=call, args=(app, "POST", "/v1/responses", blocker))]
    threads[0].start()
    assert backend.wait_arrivals(1)
    for text, kw in (("low", {"headers": {"X-Sluice-Priority": "4"}}), ("body", {}), ("header", {"headers": {
            "X-Sluice-Priority": "0"}})):
        body = {"model": "fast", "input": text, **({"priority": 1} if text == "body" else {})}
        threads.append(threading.Thread(target=call, args=(app, "POST", "/v1/responses", body), kwargs=kw))
        threads[-1].start()
        until(lambda: pending(app) == len(threads) - 1, what=f"{text} to queue")
    backend.release_all()
    for t in threads:
        t.join(10)
    assert backend.prompts() == ["blocker", "header", "body", "low"]


def test_translated_stream_has_the_responses_event_grammar(app, backend):
    events = list(sdk(app).responses.create(model="fast", input="hi", stream=True))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "t0 t1 t2 "
    done = events[-1].response
    assert done.status == "completed" and done.output_text == "t0 t1 t2 " and done.model == "fast"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (5, 3)
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    sent = backend.arrivals[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_a_function_tool_call_comes_back_as_a_function_call_item(make_app, make_backend, scripted):
    chat = scripted(tool_call_answer)
    app = make_app(toml=TOML.format(chat=chat.url, resp=make_backend().url))
    r = sdk(app).responses.create(model="chatty", input="Weather in Oslo?", tools=TOOLS)
    assert chat.arrivals[-1][2]["tools"][0]["function"]["name"] == "get_weather"
    [fc] = r.output
    assert (fc.type, fc.call_id, fc.name, json.loads(fc.arguments)) == ("function_call", "call_1", "get_weather",
                                                                         {"city": "Oslo"})
    assert fc.id.startswith("fc_") and r.status == "completed" and r.usage.total_tokens == 29

    events = list(sdk(app).responses.create(model="chatty", input="Weather in Oslo?", tools=TOOLS, stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert events[8].item.type == "function_call" and events[8].item.name == "get_weather"
    assert events[8].output_index == 1 and events[11].arguments == '{"city":"Oslo"}'
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[1].call_id == "call_1" and final.output[1].arguments == '{"city":"Oslo"}'


def test_hosted_tools_are_left_out_and_namespaced_tools_flattened(make_app, make_backend, scripted):
    chat = scripted(tool_call_answer)
    app = make_app(toml=TOML.format(chat=chat.url, resp=make_backend().url))
    space = {"type": "namespace", "name": "weather", "description": "Weather tools", "tools": TOOLS}
    tools = [{"type": "web_search", "external_web_access": False}, space, {"type": "file_search"}]
    raw = sdk(app).responses.with_raw_response.create(model="chatty", input="Weather in Oslo?", tools=tools)
    assert raw.headers["X-Sluice-Tools-Left-Out"] == "web_search, file_search"
    assert chat.arrivals[-1][2]["tools"] == [{"type": "function", "function": {
        k: v for k, v in TOOLS[0].items() if k != "type"}}]
    [fc] = raw.parse().output
    assert (fc.name, fc.namespace) == ("get_weather", "weather")
    events = list(sdk(app).responses.create(model="chatty", input="x", tools=tools, stream=True))
    assert events[-1].response.output[1].namespace == "weather"
    sdk(app).responses.create(model="chatty", input="x", tools=[{"type": "web_search"}], tool_choice="auto")
    assert "tools" not in chat.arrivals[-1][2] and "tool_choice" not in chat.arrivals[-1][2]


def test_cut_short_by_max_output_tokens_is_incomplete(make_app, scripted, make_backend):
    def reply(path, body):
        return {"choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "ab"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    chat = scripted(reply)
    app = make_app(toml=TOML.format(chat=chat.url, resp=make_backend().url))
    r = sdk(app).responses.create(model="chatty", input="x", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens" and r.output_text == "ab"


# ---- pass-through ---------------------------------------------------------------------------------------
def responses_answer(path, body):
    resp = {"id": "resp_up", "object": "response", "created_at": 1, "status": "completed", "model": body["model"],
            "output": [{"type": "message", "id": "msg_up", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "native hi", "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}
    if not body.get("stream"):
        return resp
    return [sse({"type": "response.created", "sequence_number": 0, "response": {**resp, "status": "in_progress",
                                                                                 "output": []}}, "response.created"),
            sse({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_up", "output_index": 0,
                 "content_index": 0, "delta": "native hi", "logprobs": []}, "response.output_text.delta"),
            sse({"type": "response.completed", "sequence_number": 2, "response": resp}, "response.completed")]


def test_a_backend_that_speaks_responses_gets_the_body_as_sent(make_app, make_backend, scripted):
    resp = scripted(responses_answer)
    app = make_app(toml=TOML.format(chat=make_backend().url, resp=resp.url))
    raw = (b'{"model": "native", "input": "hi", "store": true, "previous_response_id": "resp_x", '
           b'"tools": [{"type": "web_search"}], "custom": {"k": 1}}')
    status, _, body = call(app, "POST", "/v1/responses", raw=raw)
    assert status == 200 and body["model"] == "native" and body["output"][0]["content"][0]["text"] == "native hi"
    path, sent, _ = resp.arrivals[-1]
    assert path == "/v1/responses" and sent == raw.replace(b'"native"', b'"resp-v1"')   # only the model swapped

    events = list(sdk(app).responses.create(model="native", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "response.output_text.delta", "response.completed"]
    assert events[-1].response.model == "native" and events[-1].response.output_text == "native hi"
    assert resp.arrivals[-1][2] == {"model": "resp-v1", "input": "hi", "stream": True}
    until(lambda: (app.settings.log_dir / "requests.jsonl").exists() and len(read_log(app)) == 2, what="2 log lines")
    log = read_log(app)
    assert [e["route"] for e in log] == ["/v1/responses"] * 2
    assert log[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_pass_through_strips_priority_and_swaps_the_model(make_app, make_backend, scripted):
    resp = scripted(responses_answer)
    app = make_app(toml=TOML.format(chat=make_backend().url, resp=resp.url))
    r = sdk(app).responses.create(model="native", input="hi", extra_body={"priority": 0})
    assert r.output_text == "native hi" and r.model == "native"
    assert resp.arrivals[-1][2] == {"model": "resp-v1", "input": "hi"}


# ---- bad input: a 400 in the OpenAI envelope naming the field ------------------------------------------------
@pytest.mark.parametrize("body, param, words", [
    ({"model": "fast"}, "input", "input is required"),
    ({"model": "fast", "input": []}, "input", "input is required"),
    ({"model": "fast", "input": 3}, "input", "input is required"),
    ({"model": "fast", "input": "hi", "store": True}, "store", "stores no responses"),
    ({"model": "fast", "input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "whole conversation"),
    ({"model": "fast", "input": "hi", "conversation": "conv_1"}, "conversation", "stores no responses"),
    ({"model": "fast", "input": "hi", "background": True}, "background", "background"),
    ({"model": "fast", "input": "hi", "stream": "yes"}, "stream", "true or false"),
    ({"model": "fast", "input": "hi", "max_output_tokens": 0}, "max_output_tokens", "from 1"),
    ({"model": "fast", "input": "hi", "temperature": 3}, "temperature", "from 0 to 2"),
    ({"model": "fast", "input": "hi", "top_p": "high"}, "top_p", "number"),
    ({"model": "fast", "input": "hi", "instructions": ["x"]}, "instructions", "string"),
    ({"model": "fast", "input": ["hi"]}, "input[0]", "object"),
    ({"model": "fast", "input": [{"role": "robot", "content": "x"}]}, "input[0].role", "role"),
    ({"model": "fast", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]", "input_file"),
    ({"model": "fast", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0]", "file_id"),
    ({"model": "fast", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id", "call_id"),
    ({"model": "fast", "input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
     "input[0].output", "output"),
    ({"model": "fast", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "item_reference"),
    ({"model": "fast", "input": [{"type": "web_search_call", "id": "w"}]}, "input[0].type", "web_search_call"),
    ({"model": "fast", "input": "hi", "tools": [{"type": "custom", "name": "patch"}]}, "tools[0]", "'custom'"),
    ({"model": "fast", "input": "hi", "tools": [{"type": "namespace", "name": "n"}]}, "tools[0]", "list of `tools`"),
    ({"model": "fast", "input": "hi", "tools": [{"type": "namespace", "name": "n", "tools": [{"type": "web_search"}]}]},
     "tools[0].tools[0]", "function tools"),
    ({"model": "fast", "input": "hi", "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}},
     "tool_choice", "auto"),
    ({"model": "fast", "input": "hi", "tools": [{"type": "function"}]}, "tools[0].name", "name"),
    ({"model": "fast", "input": "hi", "tool_choice": "sometimes"}, "tool_choice", "auto"),
    ({"model": "fast", "input": "hi", "text": {"format": {"type": "xml"}}}, "text.format", "json_schema"),
    ({"model": "fast", "input": "hi", "priority": 9}, "priority", "from 0 to 4"),
])
def test_bad_input_is_a_400_naming_the_field(app, backend, body, param, words):
    status, _, answer = call(app, "POST", "/v1/responses", body)
    assert status == 400, answer
    err = answer["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err
    assert backend.arrivals == []


_WORDS = ["function", "namespace", "message", "function_call", "function_call_output", "input_text", "input_image",
          "user", "assistant", "developer", "json_schema", "reasoning", "web_search", "call_1"]
_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4) | st.sampled_from(_WORDS),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                        ["type", "role", "content", "name", "tools", "call_id", "arguments", "output", "text",
                         "image_url", "format", "schema", "function", "parameters", "index", "id", "delta",
                         "tool_calls", "finish_reason", "usage", "choices", "message"]), c, max_size=4),
                    max_leaves=15)
_FIELDS = st.sampled_from(["input", "instructions", "tools", "tool_choice", "text", "parallel_tool_calls",
                           "max_output_tokens", "stream", "store", "previous_response_id"])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(_FIELDS, _ANY, max_size=5), st.lists(_ANY, max_size=4))
def test_any_request_is_translated_or_a_400_and_any_answer_is_a_response(body, answers):
    try:
        json.dumps(to_chat(body, "m"))
    except errors.BadRequest as e:
        assert e.param
    stream = ResponsesStream(shell({}, "m"))
    for a in answers:
        if isinstance(a, dict):
            stream.feed(a)
            assert to_response(a, shell({}, "m"))["output"]
    assert b"response.completed" in stream.end() or stream.resp["status"] == "incomplete"


def test_unknown_model_and_bad_json_use_the_openai_envelope(app, backend):
    status, _, answer = call(app, "POST", "/v1/responses", {"model": "nope", "input": "hi"})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert "known models" in answer["error"]["message"]
    status, _, answer = call(app, "POST", "/v1/responses", raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="store"):
        sdk(app).responses.create(model="fast", input="hi", store=True)


@pytest.mark.parametrize("mode", ["!error500", "!garbage"])
def test_a_failing_backend_is_a_502_in_the_openai_envelope(app, mode):
    status, _, answer = call(app, "POST", "/v1/responses", {"model": "fast", "input": mode})
    assert status == 502 and answer["error"]["type"] == "api_error" and "backend" in answer["error"]["message"]


# ---- the queue: keepalives, failures, cancellation -----------------------------------------------------------
def test_a_queued_sdk_stream_reads_past_keepalive_comments(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_SSE_KEEPALIVE_S": 0.05})
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/chat/completions",
                                            {"model": "fast", "messages": [{"role": "user", "content": "blocker"}]}))
    t.start()
    assert backend.wait_arrivals(1)
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=15)
    conn.request("POST", "/v1/responses", json.dumps({"model": "fast", "input": "raw", "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline() == b": queued position=1\n"
    # create() returns with the response head, which goes out with the first keepalive: this SDK stream has
    # read past at least one comment before its first event
    stream = sdk(app).responses.create(model="fast", input="queued", stream=True, extra_body={"priority": 4})
    assert len(backend.arrivals) == 1
    backend.release_all()
    events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert events[-1].response.output_text == "t0 t1 t2 "
    assert b"event: response.completed" in resp.read()
    conn.close()
    t.join(10)


def test_a_stream_failing_midway_ends_with_response_failed(app, backend):
    events = list(sdk(app).responses.create(model="fast", input="!stream_die", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    until(lambda: app.scheduler.totals["failed"] == 1)


def test_a_client_leaving_a_stream_closes_upstream_and_frees_the_slot(make_app, make_backend):
    slow = make_backend(chunks=200, chunk_delay=0.05)
    app = make_app({"SLUICE_FAST_URL": slow.url, "SLUICE_REASONING_URL": slow.url})
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=15)
    conn.request("POST", "/v1/responses", json.dumps({"model": "fast", "input": "streaming", "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    while b"response.output_text.delta" not in resp.readline():
        pass
    results = {}
    queued = threading.Thread(target=lambda: results.update(r=call(app, "POST", "/v1/responses",
                                                                   {"model": "fast", "input": "next"})))
    queued.start()
    until(lambda: pending(app) == 1, what="the next request to queue")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert slow.wait_disconnects(1, timeout=3)
    queued.join(10)
    assert results["r"][0] == 200 and results["r"][2]["output"][0]["content"][0]["text"] == "echo: next"
    assert slow.prompts() == ["streaming", "next"]
    until(lambda: app.scheduler.totals["cancelled"] == 1)
    totals_add_up(app)


def test_the_cloud_model_is_translated_too(make_app, backend):
    from fake_anthropic import KEY, FakeAnthropic
    fake = FakeAnthropic()
    try:
        app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                        "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.url, "PATH": "/usr/bin:/bin"})
        r = sdk(app).responses.create(model="cloud", input="hi", instructions="be kind", max_output_tokens=20)
        assert r.output_text == "Hello from Claude" and r.model == "cloud" and r.status == "completed"
        sent = fake.last["body"]
        assert sent["system"] == "be kind" and sent["max_tokens"] == 20
        assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        events = list(sdk(app).responses.create(model="cloud", input="hi", stream=True))
        assert events[-1].type == "response.completed" and events[-1].response.output_text == "Hello from Claude"
        assert backend.arrivals == []
    finally:
        fake.close()


# ---- a real mlx_lm.server -------------------------------------------------------------------------------
@pytest.fixture
def mlx_app(make_app, mlx_server, tiny_model_dir):
    return make_app({"SLUICE_FAST_URL": mlx_server.url, "SLUICE_REASONING_URL": mlx_server.url,
                     "SLUICE_FAST_MODEL": str(tiny_model_dir), "SLUICE_REASONING_MODEL": str(tiny_model_dir)})


def test_sdk_responses_against_mlx_plain_and_streaming(mlx_app):
    client = sdk(mlx_app)
    args = dict(model="fast", input="What is two plus two?", instructions="Answer briefly.",
                max_output_tokens=8, temperature=0)
    r = client.responses.create(**args)
    assert r.model == "fast" and r.output_text and r.usage.output_tokens == 8
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(**args, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == r.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 8


def test_sdk_responses_function_tool_round_trip_against_mlx(mlx_app):
    client = sdk(mlx_app)
    r = client.responses.create(model="fast", input="Weather in Oslo?", tools=TOOLS, max_output_tokens=8,
                                temperature=0)
    assert r.status in ("completed", "incomplete") and r.output and r.usage.input_tokens > 0
    # the tiny model never calls a tool itself: the history of a call and its result must still reach it
    r2 = client.responses.create(model="fast", tools=TOOLS, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}])
    assert r2.output_text and r2.usage.input_tokens > r.usage.input_tokens


# ---- Codex CLI, where it installs -------------------------------------------------------------------------
CODEX = "/tmp/codex/node_modules/.bin/codex"


def test_codex_exec_against_sluice(app, backend, tmp_path):
    if not os.path.exists(CODEX) or shutil.which("node") is None:
        pytest.skip(f"Codex CLI not installed at {CODEX} (npm install --prefix /tmp/codex @openai/codex)")
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(f"""
model = "fast"
model_provider = "sluice"
[model_providers.sluice]
name = "sluice"
base_url = "{app.url}/v1"
wire_api = "responses"
env_key = "SLUICE_TEST_KEY"
""")
    env = {**os.environ, "CODEX_HOME": str(home), "SLUICE_TEST_KEY": "x"}
    run = subprocess.run([CODEX, "exec", "--skip-git-repo-check", "say hi"], cwd=tmp_path, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    [sent] = [a for a in backend.arrivals if a.get("_path") == "/v1/chat/completions"]
    assert sent["stream"] is True and sent["messages"][0]["role"] == "system"       # its developer messages
    assert "exec_command" in {t["function"]["name"] for t in sent["tools"]}       # its function tools, flattened
    assert "t0 t1 t2" in run.stdout + run.stderr


def test_a_hosted_tool_name_cannot_split_the_answer_or_break_it(make_app, make_backend, scripted):
    """The left-out tool types are client text: one with CR/LF must not inject a header, one outside
    latin-1 must not cost the answer."""
    chat = scripted(tool_call_answer)
    app = make_app(toml=TOML.format(chat=chat.url, resp=make_backend().url))
    tools = [{"type": "web\r\nSet-Cookie: pwned=1"}, {"type": "检索\ud800"}, {"type": "file_search"}]
    status, headers, _ = call(app, "POST", "/v1/responses", {"model": "chatty", "input": "hi", "tools": tools})
    assert status == 200
    assert "Set-Cookie" not in headers and headers["X-Sluice-Tools-Left-Out"] == "file_search"
