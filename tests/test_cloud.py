"""The cloud route: the real `anthropic` SDK against a Messages API stand-in, the claude CLI fallback, the
concurrency limit, error mapping, and the OpenAI <-> Messages translation (pure functions)."""

from __future__ import annotations

import http.client
import json
import os
import threading
from pathlib import Path

import pytest

from conftest import call
from fake_anthropic import KEY, FakeAnthropic
from sluice import cloud as cloud_mod
from sluice import errors
from sluice.cloud import Cloud, flatten
from sluice.translate_cloud import from_message, to_messages
from sluice.translate_stream import Chunker as _Chunker, translate_events

FAKE_CLAUDE = str(Path(__file__).with_name("fake_claude.py"))
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anthropic_api():
    f = FakeAnthropic()
    yield f
    f.close()


def api_env(fake, **kw):
    return {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.url, "PATH": "/usr/bin:/bin", **kw}


def cli_cloud(tmp_path, model="claude-cli", **env):
    argv_file = tmp_path / "argv.json"
    environ = {"PATH": "/usr/bin:/bin", "FAKE_CLAUDE_ARGV_FILE": str(argv_file), **env}
    return Cloud(model=model, claude_bin=FAKE_CLAUDE, environ=environ), argv_file


# ---- mode ---------------------------------------------------------------------------------------------------
def test_mode_is_truthful(tmp_path, anthropic_api, monkeypatch):
    assert Cloud(environ=api_env(anthropic_api)).mode() == "api"
    # no key: the CLI, by path or found on PATH
    assert Cloud(claude_bin=FAKE_CLAUDE, environ={"PATH": "/usr/bin"}).mode() == "cli"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "claude").symlink_to(FAKE_CLAUDE)
    assert Cloud(environ={"PATH": str(bindir)}).mode() == "cli"
    assert Cloud(environ={"PATH": str(tmp_path)}).mode() == "unavailable"
    none = Cloud(claude_bin=str(tmp_path / "none"), environ={"PATH": str(tmp_path)})
    assert none.mode() == "unavailable"
    assert none.info() == {"mode": "unavailable", "model": "claude-sonnet-4-6", "inflight": 0, "concurrency": 4}
    with pytest.raises(errors.Unavailable) as e:
        none.chat({"messages": USER}, 5)
    assert "pip install 'sluice-llm[cloud]'" in e.value.message and "ANTHROPIC_API_KEY" in e.value.message
    assert "claude" in e.value.message and e.value.status == 503
    # a key but no SDK: the CLI when there is one, else a 503 that says the package is missing
    monkeypatch.setattr(cloud_mod, "_sdk_installed", lambda: False)
    assert Cloud(claude_bin=FAKE_CLAUDE, environ=api_env(anthropic_api)).mode() == "cli"
    keyed = Cloud(claude_bin=str(tmp_path / "none"), environ=api_env(anthropic_api))
    assert keyed.mode() == "unavailable"
    with pytest.raises(errors.Unavailable, match="anthropic package is not installed"):
        keyed.query("x", None, 10, None, 5)


# ---- the SDK path -------------------------------------------------------------------------------------------
def test_query_through_the_sdk(anthropic_api):
    cloud = Cloud(model="claude-test", environ=api_env(anthropic_api))
    assert cloud.query("hi", "be kind", 50, 0.5, 5) == "Hello from Claude"
    sent = anthropic_api.last
    assert sent["path"] == "/v1/messages"
    assert KEY in (sent["headers"].get("x-api-key"), sent["headers"].get("authorization", "")[len("Bearer "):])
    assert sent["headers"].get("anthropic-version")
    assert sent["body"] == {"model": "claude-test", "system": "be kind", "max_tokens": 50, "temperature": 0.5,
                            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert cloud.query("again", None, 10, None, 5) == "Hello from Claude"
    assert anthropic_api.requests[-1]["peer"] == anthropic_api.requests[-2]["peer"]   # one client, kept alive
    assert "temperature" not in anthropic_api.last["body"] and "system" not in anthropic_api.last["body"]
    assert cloud.info() == {"mode": "api", "model": "claude-test", "inflight": 0, "concurrency": 4}


def test_stand_in_takes_the_key_either_way(anthropic_api):
    # this SDK release sends api_key as `Authorization: Bearer`; others send `x-api-key`: both must work
    import anthropic
    msg = anthropic.Anthropic(api_key=KEY, base_url=anthropic_api.url, max_retries=0).messages.create(
        model="claude-x", max_tokens=5, messages=USER)
    assert msg.content[0].text == "Hello from Claude"
    port = int(anthropic_api.url.rsplit(":", 1)[1])

    def post(headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/messages", json.dumps({"model": "m", "max_tokens": 5, "messages": USER}),
                     {"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        conn.close()
        return out
    assert post({"x-api-key": KEY})[0] == 200
    assert post({"Authorization": f"Bearer {KEY}"})[0] == 200
    for headers in ({}, {"x-api-key": "nope"}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        status, body = post(headers)
        assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"


def test_chat_translates_both_ways(anthropic_api):
    cloud = Cloud(environ=api_env(anthropic_api))
    r = cloud.chat({"model": "cloud", "messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        "stop": "END", "max_tokens": 30, "temperature": 1.5, "top_p": 0.9}, 5)
    sent = anthropic_api.last["body"]
    assert sent["system"] == "sys" and [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["stop_sequences"] == ["END"] and sent["max_tokens"] == 30
    assert sent["temperature"] == 1.0 and sent["top_p"] == 0.9 and sent["model"] == "claude-sonnet-4-6"
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion" and isinstance(r["created"], int)
    assert r["model"] == "claude-sonnet-4-6"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "Hello from Claude"}
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    cloud.chat({"model": "claude-opus-4-1", "messages": USER}, 5)       # a claude-* name is honoured
    assert anthropic_api.last["body"]["model"] == "claude-opus-4-1"
    assert anthropic_api.last["body"]["max_tokens"] == 1024


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "w",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def test_chat_with_tools(anthropic_api):
    anthropic_api.tool = {"name": "get_weather", "input": {"city": "Oslo"}}
    r = Cloud(environ=api_env(anthropic_api)).chat(
        {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS, "tool_choice": "required"}, 5)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [tc] = choice["message"]["tool_calls"]
    assert tc["id"] == "toolu_01" and tc["type"] == "function" and tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == {"city": "Oslo"}
    sent = anthropic_api.last["body"]
    assert sent["tools"] == [{"name": "get_weather", "description": "w", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    assert sent["tool_choice"] == {"type": "any"}


def test_stream_text_and_usage(anthropic_api):
    cloud = Cloud(environ=api_env(anthropic_api))
    chunks = list(cloud.chat_stream({"messages": USER, "stream": True, "stream_options": {"include_usage": True}}, 5))
    assert anthropic_api.last["body"]["stream"] is True
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello from Claude"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 7,
                                                                    "total_tokens": 18}
    plain = list(cloud.chat_stream({"messages": USER, "stream": True}, 5))
    assert all(c["choices"] and "usage" not in c for c in plain)
    assert cloud.info()["inflight"] == 0


def test_stream_tool_calls(anthropic_api):
    anthropic_api.tool = {"name": "get_weather", "input": {"city": "Oslo", "days": 3}}
    anthropic_api.preamble = True                    # a text block first, so the tool_use block is index 1
    chunks = list(Cloud(environ=api_env(anthropic_api)).chat_stream(
        {"messages": USER, "tools": TOOLS, "stream": True}, 5))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Hello from Claude"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": "toolu_01", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert all(tc["index"] == 0 for tc in calls) and len(calls) == 3
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"city": "Oslo", "days": 3}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ---- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status,expected,text", [(429, errors.Unavailable, "rate limiting"),
                                                  (529, errors.Unavailable, "overloaded"),
                                                  (500, errors.BadGateway, "500"),
                                                  (400, errors.BadGateway, "400")])
def test_sdk_errors_map_to_clear_statuses(anthropic_api, status, expected, text):
    anthropic_api.status = status
    anthropic_api.retry_after = "7"
    cloud = Cloud(environ=api_env(anthropic_api))
    with pytest.raises(expected, match=text) as e:
        cloud.query("x", None, 10, None, 5)
    assert type(e.value) is expected
    if expected is errors.Unavailable:
        assert e.value.retry_after == 7
    with pytest.raises(expected):                   # a stream fails before its first chunk: a real status
        cloud.chat_stream({"messages": USER, "stream": True}, 5)
    assert cloud.info()["inflight"] == 0


def test_wrong_key_is_502_that_names_the_variable_not_the_key(anthropic_api):
    anthropic_api.key = "the-right-one"
    with pytest.raises(errors.BadGateway, match="ANTHROPIC_API_KEY") as e:
        Cloud(environ=api_env(anthropic_api)).query("x", None, 10, None, 5)
    assert KEY not in e.value.message


def test_timeout_is_504(anthropic_api):
    anthropic_api.hang = True
    cloud = Cloud(environ=api_env(anthropic_api))
    with pytest.raises(errors.QueueTimeout):
        cloud.query("x", None, 10, None, 0.3)
    assert cloud.info()["inflight"] == 0


def test_unreachable_is_502():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}", "PATH": "/usr/bin"}
    with pytest.raises(errors.BadGateway, match="cannot reach Anthropic"):
        Cloud(environ=env).query("x", None, 10, None, 5)


# ---- the concurrency limit -----------------------------------------------------------------------------------
def test_concurrency_limit_waits_then_503_and_the_permit_returns(anthropic_api):
    anthropic_api.hang = True
    cloud = Cloud(concurrency=1, environ=api_env(anthropic_api))
    results = []
    first = threading.Thread(target=lambda: results.append(cloud.query("a", None, 10, None, 10)))
    first.start()
    assert anthropic_api.arrived.acquire(timeout=5)
    assert cloud.info()["inflight"] == 1
    with pytest.raises(errors.Unavailable, match="busy") as e:
        cloud.query("b", None, 10, None, 0.2)
    assert e.value.status == 503 and e.value.retry_after
    assert len(anthropic_api.requests) == 1           # the refused call never went out
    anthropic_api.release.set()
    first.join(10)
    assert results == ["Hello from Claude"] and cloud.info()["inflight"] == 0
    anthropic_api.hang = False
    assert cloud.query("c", None, 10, None, 5) == "Hello from Claude"


def test_a_stream_closed_early_returns_its_permit_and_hangs_up(anthropic_api):
    anthropic_api.hold_stream = True
    cloud = Cloud(concurrency=1, environ=api_env(anthropic_api))
    stream = cloud.chat_stream({"messages": USER, "stream": True}, 10)
    assert next(stream)["choices"][0]["delta"]["role"] == "assistant"
    assert next(stream)["choices"][0]["delta"]["content"] == "Hello "
    with pytest.raises(errors.Unavailable, match="busy"):      # the open stream holds the only permit
        cloud.chat({"messages": USER}, 0.1)
    stream.close()
    stream.close()                                               # idempotent: released once
    assert anthropic_api.disconnected.wait(5)                    # the upstream connection was closed
    assert cloud.info()["inflight"] == 0 and list(stream) == []
    anthropic_api.hold_stream = False
    assert cloud.query("again", None, 10, None, 5) == "Hello from Claude"
    # a stream that is never iterated still returns its permit when closed
    with cloud.chat_stream({"messages": USER, "stream": True}, 5):
        assert cloud.info()["inflight"] == 1
    assert cloud.info()["inflight"] == 0


# ---- the CLI path ------------------------------------------------------------------------------------------
def test_cli_keeps_client_text_after_the_double_dash(tmp_path):
    cloud, argv_file = cli_cloud(tmp_path)
    assert cloud.mode() == "cli"
    assert cloud.query("--help", "--dangerously-skip-permissions", 10, None, 10) == "cli answer"   # stdin closed
    assert json.loads(argv_file.read_text()) == [
        "-p", "--model", "claude-cli", "--system-prompt=--dangerously-skip-permissions", "--", "--help"]
    cloud.query("-p", None, 10, None, 10)
    assert json.loads(argv_file.read_text()) == ["-p", "--model", "claude-cli", "--", "-p"]


def test_cli_failures(tmp_path):
    cloud, _ = cli_cloud(tmp_path, FAKE_CLAUDE_EXIT="1")
    with pytest.raises(errors.BadGateway, match="exited 1: claude: something went wrong"):
        cloud.query("x", None, 10, None, 10)
    with pytest.raises(errors.BadRequest):
        cli_cloud(tmp_path)[0].query("nul\x00byte", None, 10, None, 10)
    pid_file = tmp_path / "pid"
    cloud, _ = cli_cloud(tmp_path, FAKE_CLAUDE_HANG="1", FAKE_CLAUDE_PID_FILE=str(pid_file))
    with pytest.raises(errors.QueueTimeout):
        cloud.query("x", None, 10, None, 1.0)
    with pytest.raises(ProcessLookupError):               # killed and reaped, not left running
        os.kill(int(pid_file.read_text()), 0)
    assert cloud.info()["inflight"] == 0


def test_cli_chat_and_stream(tmp_path):
    cloud, argv_file = cli_cloud(tmp_path)
    body = {"model": "cloud", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}
    r = cloud.chat(body, 10)
    assert r["choices"][0]["message"]["content"] == "cli answer" and r["choices"][0]["finish_reason"] == "stop"
    assert r["object"] == "chat.completion" and r["model"] == "claude-cli"
    assert json.loads(argv_file.read_text())[-3:] == ["--system-prompt=sys", "--",
                                                      "User: a\n\nAssistant: b\n\nUser: c"]
    chunks = list(cloud.chat_stream({**body, "stream": True}, 10))
    assert [c["choices"][0] for c in chunks] == [
        {"index": 0, "delta": {"role": "assistant", "content": "cli answer"}, "logprobs": None, "finish_reason": None},
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    with pytest.raises(errors.BadRequest) as e:
        cloud.chat({"messages": USER, "tools": TOOLS}, 10)
    assert e.value.param == "tools"
    with pytest.raises(errors.BadRequest, match="images"):
        cloud.chat({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, 10)
    assert cloud.info()["inflight"] == 0


def test_messages_as_they_are_through_the_sdk(anthropic_api):
    cloud = Cloud(model="claude-test", environ=api_env(anthropic_api))
    body = {"model": "cloud", "max_tokens": 20, "system": [{"type": "text", "text": "s"}],
            "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "enabled", "budget_tokens": 1024}}
    msg = cloud.messages(body, 5)
    assert msg["content"] == [{"type": "text", "text": "Hello from Claude"}] and msg["model"] == "claude-test"
    assert anthropic_api.last["body"] == {**body, "model": "claude-test"}
    with cloud.messages_stream({**body, "model": "claude-opus-4-1"}, 5) as events:
        kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_delta" in kinds
    assert anthropic_api.last["body"]["model"] == "claude-opus-4-1" and anthropic_api.last["body"]["stream"] is True
    anthropic_api.status = 400                 # the client's own mistake keeps its status on this route
    with pytest.raises(errors.SluiceError) as e:
        cloud.messages(body, 5)
    assert e.value.status == 400 and "simulated failure" in e.value.message
    assert cloud.info()["inflight"] == 0


def test_messages_through_the_cli(tmp_path):
    cloud, argv_file = cli_cloud(tmp_path)
    body = {"model": "cloud", "max_tokens": 20, "system": [{"type": "text", "text": "sys"}], "messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "content": [{"type": "text", "text": "r"}]}]}]}
    msg = cloud.messages(body, 10)
    assert msg["content"] == [{"type": "text", "text": "cli answer"}] and msg["stop_reason"] == "end_turn"
    assert json.loads(argv_file.read_text())[-3:] == [
        "--system-prompt=sys", "--", "User: a\n\nAssistant: [tool call f({})]\n\nUser: [tool result: r]"]
    events = list(cloud.messages_stream(body, 10))
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                           "content_block_stop", "message_delta", "message_stop"]
    assert events[2]["delta"] == {"type": "text_delta", "text": "cli answer"}
    with pytest.raises(errors.BadRequest) as e:
        cloud.messages({**body, "tools": [{"name": "f", "input_schema": {}}]}, 10)
    assert e.value.param == "tools"
    assert cloud.info()["inflight"] == 0


# ---- translation: OpenAI -> Anthropic --------------------------------------------------------------------------
def test_system_messages_become_system():
    req = to_messages({"messages": [{"role": "system", "content": "one"},
                                    {"role": "developer", "content": [{"type": "text", "text": "two"}]},
                                    {"role": "user", "content": "q"}]}, "claude-x")
    assert req["system"] == "one\n\ntwo" and req["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "q"}]}]
    assert "system" not in to_messages({"messages": USER}, "m")


def test_turns_keep_order_and_same_roles_merge():
    req = to_messages({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                    {"role": "assistant", "content": "c"}, {"role": "assistant", "content": ""},
                                    {"role": "user", "content": "d"}]}, "m")
    assert req["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
        {"role": "user", "content": [{"type": "text", "text": "d"}]}]


def test_sampling_fields():
    base = {"messages": USER}
    assert to_messages(base, "m")["max_tokens"] == 1024
    assert to_messages({**base, "max_tokens": 5}, "m")["max_tokens"] == 5
    assert to_messages({**base, "max_tokens": 5, "max_completion_tokens": 9}, "m")["max_tokens"] == 9
    assert to_messages({**base, "temperature": 1.7}, "m")["temperature"] == 1.0
    assert to_messages({**base, "temperature": 0.3}, "m")["temperature"] == 0.3
    assert to_messages({**base, "temperature": 0}, "m")["temperature"] == 0.0
    assert to_messages({**base, "top_p": 0.5}, "m")["top_p"] == 0.5
    assert to_messages({**base, "stop": "X"}, "m")["stop_sequences"] == ["X"]
    assert to_messages({**base, "stop": ["X", "Y"]}, "m")["stop_sequences"] == ["X", "Y"]
    assert "stop_sequences" not in to_messages({**base, "stop": []}, "m")
    assert to_messages({**base, "user": "u1"}, "m")["metadata"] == {"user_id": "u1"}
    assert to_messages({**base, "model": "fast"}, "claude-default")["model"] == "claude-default"
    assert to_messages({**base, "model": "claude-haiku-4-5"}, "claude-default")["model"] == "claude-haiku-4-5"
    assert set(to_messages(base, "m")) == {"model", "messages", "max_tokens"}


def test_tools_and_tool_choice():
    tools = TOOLS + [{"type": "function", "function": {"name": "now"}}]
    req = to_messages({"messages": USER, "tools": tools}, "m")
    assert req["tools"] == [
        {"name": "get_weather", "description": "w", "input_schema": TOOLS[0]["function"]["parameters"]},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}}]
    assert "tool_choice" not in req
    for choice, expected in [("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"}),
                             ({"type": "function", "function": {"name": "now"}}, {"type": "tool", "name": "now"})]:
        assert to_messages({"messages": USER, "tools": tools, "tool_choice": choice}, "m")["tool_choice"] == expected
    assert to_messages({"messages": USER, "tools": tools, "parallel_tool_calls": False}, "m")["tool_choice"] == \
        {"type": "auto", "disable_parallel_tool_use": True}


def test_tool_calls_results_and_images():
    req = to_messages({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "and?"}]}, "claude-x")
    assert req["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}]
    assert req["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 1}},
        {"type": "tool_use", "id": "c2", "name": "g", "input": {}}]}
    # both tool results and the next user turn are one user message (roles must alternate)
    assert req["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "c1", "content": "42"},
        {"type": "tool_result", "tool_use_id": "c2", "content": "ok"},
        {"type": "text", "text": "and?"}]}
    assert len(req["messages"]) == 3


@pytest.mark.parametrize("body,param", [
    ({"messages": "nope"}, "messages"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": ["x"]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "system", "content": "only"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}]},
     "messages[0].tool_calls[0]"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": "9"}, "max_completion_tokens"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "temperature": 3}, "temperature"),
    ({"messages": USER, "top_p": 2}, "top_p"),
    ({"messages": USER, "stop": 5}, "stop"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0]"),
    ({"messages": USER, "tools": "x"}, "tools"),
    ({"messages": USER, "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": USER, "model": "claude-x y"}, "model"),
])
def test_bad_bodies_are_400_with_param(body, param):
    with pytest.raises(errors.BadRequest) as e:
        to_messages(body, "m")
    assert e.value.param == param and e.value.status == 400


# ---- translation: Anthropic -> OpenAI --------------------------------------------------------------------------
@pytest.mark.parametrize("stop,finish", [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
                                         ("tool_use", "tool_calls"), ("refusal", "content_filter"), (None, "stop")])
def test_from_message(stop, finish):
    r = from_message({"model": "claude-y", "stop_reason": stop, "usage": {"input_tokens": 3, "output_tokens": 4},
                      "content": [{"type": "text", "text": "a"}, {"type": "thinking", "thinking": "t"},
                                  {"type": "text", "text": "b"},
                                  {"type": "tool_use", "id": "t1", "name": "f", "input": {"k": [1]}}]}, "claude-x")
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion" and r["model"] == "claude-y"
    assert r["choices"][0]["finish_reason"] == finish
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "ab", "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"k\": [1]}"}}]}
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_from_message_counts_cached_prompt_tokens():
    r = from_message({"content": [], "usage": {"input_tokens": 1, "cache_read_input_tokens": 5,
                                               "cache_creation_input_tokens": 2, "output_tokens": 1}}, "m")
    assert r["usage"] == {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}
    assert r["choices"][0]["message"]["content"] == "" and r["model"] == "m"


def events(*evs):
    return [{"type": "message_start", "message": {"usage": {"input_tokens": 2, "output_tokens": 1}}}, *evs]


def test_translate_events():
    chunks = list(translate_events(events(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ": 1}"}},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "u", "name": "g"}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"}), _Chunker("claude-x"), include_usage=True))
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[1] == {"content": "hi"}
    assert deltas[2] == {"tool_calls": [{"index": 0, "id": "t", "type": "function",
                                         "function": {"name": "f", "arguments": ""}}]}
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas[3:5]] == ["{\"a\"", ": 1}"]
    assert deltas[5]["tool_calls"][0]["index"] == 1 and deltas[5]["tool_calls"][0]["id"] == "u"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 9, "total_tokens": 11}
    assert all(c["model"] == "claude-x" for c in chunks)


def test_translate_events_failures():
    with pytest.raises(errors.BadGateway, match="ended"):        # cut off before message_delta
        list(translate_events(events(), _Chunker("m"), False))
    with pytest.raises(errors.BadGateway, match="overloaded_error"):
        list(translate_events(events({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}),
                              _Chunker("m"), False))


def test_flatten():
    assert flatten(to_messages({"messages": USER}, "m")) == "hi"
    req = to_messages({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}]}, "m")
    assert flatten(req) == "User: q\n\nAssistant: [tool call f({})]\n\nUser: [tool result: r]"


# ---- through the server (wiring) -------------------------------------------------------------------------------
def test_native_query_through_the_server(make_app, backend, anthropic_api):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    **api_env(anthropic_api), "SLUICE_CLOUD_MODEL": "claude-test"})
    assert call(app, "GET", "/v1/health")[2]["model_status"]["cloud"] == "api"
    status, _, body = call(app, "POST", "/v1/query", {"model": "cloud", "prompt": "hi", "system": "be kind",
                                                      "max_tokens": 50, "temperature": 0.5})
    assert status == 200 and body == {"status": "ok", "source": "cloud", "result": "Hello from Claude",
                                      "id": body["id"]}
    assert anthropic_api.last["body"]["model"] == "claude-test" and anthropic_api.last["body"]["system"] == "be kind"
    assert backend.arrivals == []                       # the cloud never touches the local gate


def test_openai_chat_and_stream_through_the_server(make_app, backend, anthropic_api):
    openai = pytest.importorskip("openai")
    anthropic_api.tool = {"name": "get_weather", "input": {"city": "Oslo"}}
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, **api_env(anthropic_api)})
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "weather?"}],
                                       tools=TOOLS, tool_choice="auto")
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    anthropic_api.tool = None
    chunks = list(client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "x"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from Claude"
    assert chunks[-1].usage.completion_tokens == 7
    assert "cloud" in [m.id for m in client.models.list().data]


def test_cli_route_through_the_server(make_app, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CLAUDE_ARGV_FILE", str(tmp_path / "argv.json"))
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_CLAUDE_BIN": FAKE_CLAUDE, "PATH": "/usr/bin:/bin"})
    assert call(app, "GET", "/v1/health")[2]["model_status"]["cloud"] == "cli"
    status, _, body = call(app, "POST", "/v1/query", {"model": "cloud", "prompt": "--version"})
    assert status == 200 and body["result"] == "cli answer" and body["source"] == "cloud"
    assert json.loads((tmp_path / "argv.json").read_text())[-2:] == ["--", "--version"]


def fallback_toml(url: str, after: float) -> str:
    return f"""
[[backends]]
name = "local"
url = "{url}"
[[models]]
name = "fast"
backends = ["local"]
fallback = "cloud"
fallback_after_s = {after}
"""


def test_fallback_to_cloud_when_no_local_slot_in_time(make_app, backend, anthropic_api):
    app = make_app(api_env(anthropic_api), toml=fallback_toml(backend.url, 0.3))
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/query", {"model": "fast", "prompt": "local"}))
    t.start()
    assert backend.wait_arrivals(1)
    status, headers, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "overflow"})
    assert status == 200 and body["source"] == "cloud" and body["result"] == "Hello from Claude"
    status, headers, body = call(app, "POST", "/v1/chat/completions",
                                 {"model": "fast", "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and headers["X-Sluice-Backend"] == "cloud"
    assert body["choices"][0]["message"]["content"] == "Hello from Claude"
    backend.release_all()
    t.join(10)
    assert backend.prompts() == ["local"]
    q = call(app, "GET", "/v1/queue/status")[2]
    assert q["total_served"] == 3 and q["total_timeouts"] == 0 and q["pending"] == 0


def test_fallback_when_the_local_backend_refuses(make_app, anthropic_api):
    import socket
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    app = make_app({**api_env(anthropic_api), "SLUICE_HEALTH_INTERVAL_S": 60},
                   toml=fallback_toml(f"http://127.0.0.1:{port}/v1", 30), wait_ready=False)
    # whether the probe has marked it down yet or the forward is refused first, the answer comes from the cloud
    for _ in range(2):
        status, _, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x"})
        assert status == 200 and body["source"] == "cloud"
    assert call(app, "GET", "/v1/queue/status")[2]["total_served"] == 2
