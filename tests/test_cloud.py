"""The cloud route: the real `anthropic` SDK against a Messages API stand-in, the CLI fallback, and the
OpenAI <-> Messages translation."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import openai
import pytest

from conftest import call
from fake_anthropic import KEY, FakeAnthropic
from sluice import errors
from sluice.cloud import Cloud, to_messages

FAKE_CLAUDE = str(Path(__file__).with_name("fake_claude.py"))


@pytest.fixture
def anthropic_api():
    f = FakeAnthropic()
    yield f
    f.close()


def api_env(fake, **kw):
    return {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": fake.url, "PATH": "/usr/bin:/bin", **kw}


def test_mode_is_truthful(tmp_path, anthropic_api):
    assert Cloud(environ=api_env(anthropic_api)).mode() == "api"
    assert Cloud(claude_bin=FAKE_CLAUDE, environ={"PATH": "/usr/bin"}).mode() == "cli"
    assert Cloud(claude_bin=str(tmp_path / "none"), environ={"PATH": str(tmp_path)}).mode() == "unavailable"


def test_native_query_through_the_sdk(make_app, backend, anthropic_api):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    **api_env(anthropic_api), "SLUICE_CLOUD_MODEL": "claude-test"})
    assert call(app, "GET", "/v1/health")[2]["model_status"]["cloud"] == "api"
    status, _, body = call(app, "POST", "/v1/query", {"model": "cloud", "prompt": "hi", "system": "be kind",
                                                      "max_tokens": 50, "temperature": 0.5})
    assert status == 200 and body == {"status": "ok", "source": "cloud", "result": "Hello from Claude",
                                      "id": body["id"]}
    sent = anthropic_api.requests[-1]
    assert KEY in (sent["headers"].get("x-api-key"), (sent["headers"].get("Authorization") or "")[7:])
    assert sent["body"]["model"] == "claude-test" and sent["body"]["system"] == "be kind"
    assert sent["body"]["max_tokens"] == 50 and sent["body"]["temperature"] == 0.5
    assert sent["body"]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert backend.arrivals == []                       # the cloud never touches the local gate


def test_stand_in_accepts_bearer_too(anthropic_api):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", int(anthropic_api.url.rsplit(":", 1)[1]))
    conn.request("POST", "/v1/messages", json.dumps({"model": "m", "max_tokens": 5, "messages": []}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert conn.getresponse().status == 200


def test_openai_sdk_chat_and_stream_over_cloud(make_app, backend, anthropic_api):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, **api_env(anthropic_api)})
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="cloud", messages=[
        {"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], stop=["END"], max_tokens=30)
    assert r.choices[0].message.content == "Hello from Claude" and r.usage.total_tokens == 18
    sent = anthropic_api.requests[-1]["body"]
    assert sent["system"] == "sys" and [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["stop_sequences"] == ["END"] and sent["max_tokens"] == 30
    chunks = list(client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "x"}],
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "Hello from Claude"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 7
    assert "cloud" in [m.id for m in client.models.list().data]


def test_tools_round_trip(make_app, backend, anthropic_api):
    anthropic_api.tool = {"name": "get_weather", "input": {"city": "Oslo"}}
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, **api_env(anthropic_api)})
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "w",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "weather?"}],
                                       tools=tools, tool_choice="auto")
    call_ = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call_.function.name == "get_weather"
    assert json.loads(call_.function.arguments) == {"city": "Oslo"}
    sent = anthropic_api.requests[-1]["body"]
    assert sent["tools"][0]["input_schema"]["properties"]["city"] == {"type": "string"}
    assert sent["tool_choice"] == {"type": "auto"}
    chunks = list(client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "w"}],
                                                 tools=tools, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Oslo"}


def test_translation_of_tool_results_images_and_temperature():
    req = to_messages({"model": "cloud", "temperature": 1.7, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "user", "content": "and?"}]}, "claude-x")
    assert req["temperature"] == 1.0 and req["model"] == "claude-x"
    assert req["messages"][0]["content"][1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}
    assert req["messages"][1]["content"] == [{"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 1}}]
    # the tool result and the next user turn merge into one user message (roles must alternate)
    assert req["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": "c1", "content": "42"}
    assert req["messages"][2]["content"][1] == {"type": "text", "text": "and?"}
    with pytest.raises(errors.BadRequest):
        to_messages({"messages": "nope"}, "m")


@pytest.mark.parametrize("status,expected", [(429, errors.Unavailable), (529, errors.Unavailable),
                                             (500, errors.BadGateway)])
def test_sdk_errors_map_to_clear_statuses(anthropic_api, status, expected):
    anthropic_api.status = status
    with pytest.raises(expected):
        Cloud(environ=api_env(anthropic_api)).query("x", None, 10, None, 5)


def test_wrong_key_is_502_that_names_the_variable(anthropic_api):
    with pytest.raises(errors.BadGateway, match="ANTHROPIC_API_KEY"):
        Cloud(environ={**api_env(anthropic_api), "ANTHROPIC_API_KEY": "wrong"}).query("x", None, 10, None, 5)


def test_concurrency_limit_is_its_own(anthropic_api):
    anthropic_api.hanging = True
    cloud = Cloud(concurrency=1, environ=api_env(anthropic_api))
    first = threading.Thread(target=cloud.query, args=("a", None, 10, None, 10))
    first.start()
    assert anthropic_api.arrived.acquire(timeout=5)
    with pytest.raises(errors.Unavailable, match="busy"):
        cloud.query("b", None, 10, None, 0.2)
    anthropic_api.release.set()
    first.join(10)
    anthropic_api.hanging = False
    assert cloud.query("c", None, 10, None, 5) == "Hello from Claude" and cloud.info()["inflight"] == 0


def test_cli_fallback_keeps_client_text_after_the_double_dash(tmp_path):
    argv_file = tmp_path / "argv.json"
    cloud = Cloud(model="claude-cli", claude_bin=FAKE_CLAUDE,
                  environ={"PATH": "/usr/bin:/bin", "FAKE_CLAUDE_ARGV_FILE": str(argv_file)})
    import os
    os.environ["FAKE_CLAUDE_ARGV_FILE"] = str(argv_file)
    try:
        assert cloud.query("--help", "sys prompt", 10, None, 10) == "cli answer"
        argv = json.loads(argv_file.read_text())
        assert argv[:3] == ["-p", "--model", "claude-cli"]
        assert argv.index("--") < argv.index("--help") and argv[-1] == "--help"
        assert argv[argv.index("--system-prompt") + 1] == "sys prompt" and argv.index("--system-prompt") < argv.index("--")
        os.environ["FAKE_CLAUDE_EXIT"] = "3"
        with pytest.raises(errors.BadGateway, match="exited 3"):
            cloud.query("-p", None, 10, None, 10)
    finally:
        os.environ.pop("FAKE_CLAUDE_ARGV_FILE", None)
        os.environ.pop("FAKE_CLAUDE_EXIT", None)


def test_cli_route_end_to_end(make_app, backend, tmp_path, monkeypatch):
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
