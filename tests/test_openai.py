"""OpenAI-compatible routes with the official `openai` SDK and raw SSE, against real stand-in backends."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import openai
import pytest

from conftest import call
from test_api_native import pending, totals_add_up, until


def sdk(app, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, **kw)


def chat_body(content="hi", **kw):
    return {"model": "fast", "messages": [{"role": "user", "content": content}], **kw}


class RawStream:
    """A streaming request read line by line, with the time each line arrived."""

    def __init__(self, app, body, headers=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=15)
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body),
                          {"Content-Type": "application/json", **(headers or {})})
        self.resp = self.conn.getresponse()
        self.lines: list[tuple[float, bytes]] = []

    def read_line(self) -> bytes:
        line = self.resp.readline()
        self.lines.append((time.monotonic(), line))
        return line

    def read_all(self) -> list[bytes]:
        while True:
            line = self.read_line()
            if not line:
                return [l for _, l in self.lines]

    def close(self) -> None:
        self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def test_sdk_chat_rewrites_model_and_passes_fields_through(app, backend):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = sdk(app).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                         tools=tools, response_format={"type": "json_object"}, logprobs=True,
                                         extra_body={"priority": 1, "custom_field": {"x": 1}})
    assert r.choices[0].message.content == "echo: hi"
    sent = backend.arrivals[-1]
    assert sent["model"] == "mlx-community/Qwen3-1.7B-4bit"
    assert sent["tools"] == tools and sent["response_format"] == {"type": "json_object"} and sent["logprobs"] is True
    assert sent["custom_field"] == {"x": 1}
    assert "priority" not in sent                 # stripped unless the backend takes it


def test_sdk_stream_relays_every_event_and_done(app, backend):
    chunks = list(sdk(app).chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}],
                                                   stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "t0 t1 t2 "
    assert chunks[-1].usage.completion_tokens == 3
    assert backend.arrivals[-1]["stream_options"] == {"include_usage": True}
    until(lambda: any(r["usage"] for r in app.recent), what="usage recorded")
    assert app.recent[-1]["usage"]["completion_tokens"] == 3


def test_raw_sse_headers_comments_and_done(app):
    s = RawStream(app, chat_body(stream=True))
    assert s.resp.status == 200
    h = s.resp.headers
    assert h["Content-Type"] == "text/event-stream" and h["Cache-Control"] == "no-cache"
    assert h["X-Accel-Buffering"] == "no" and h["X-Request-Id"] and h["X-Sluice-Backend"] == "fast"
    assert float(h["X-Sluice-Queue-Wait-Ms"]) >= 0
    lines = s.read_all()
    assert lines[0] == b": keepalive 1/1\n"          # upstream comment lines are kept
    assert lines.count(b"data: [DONE]\n") == 1 and lines[-3:] == [b"data: [DONE]\n", b"\n", b""]


def test_async_sdk(app):
    async def run():
        client = openai.AsyncOpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0)
        r = await client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "a"}])
        stream = await client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "b"}],
                                                      stream=True)
        parts = [c.choices[0].delta.content async for c in stream if c.choices]
        await client.close()
        return r.choices[0].message.content, "".join(p or "" for p in parts)
    assert asyncio.run(run()) == ("echo: a", "t0 t1 t2 ")


def test_completions_embeddings_and_models(app, backend):
    client = sdk(app)
    client.completions.create(model="reasoning", prompt="p")
    assert backend.arrivals[-1]["_path"] == "/v1/completions"
    assert backend.arrivals[-1]["model"] == "mlx-community/Qwen3-8B-4bit"
    e = client.embeddings.create(model="fast", input="text")
    assert e.data[0].embedding == [0.1, 0.2] and backend.arrivals[-1]["_path"] == "/v1/embeddings"
    ids = [m.id for m in client.models.list().data]
    assert ids == ["reasoning", "fast", "tiny"]        # cloud is not listed while it is unavailable
    assert all(m.owned_by == "sluice" for m in client.models.list().data)


def test_unknown_model_is_404_model_not_found(app):
    with pytest.raises(openai.NotFoundError) as e:
        sdk(app).chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "x"}])
    err = e.value.body
    assert err["code"] == "model_not_found" and "fast" in err["message"]


@pytest.mark.parametrize("body,param", [
    (chat_body(stream="yes"), "stream"),
    ({"model": "fast", "messages": "hi"}, "messages"),
    ({"model": "fast", "messages": []}, "messages"),
    ({"model": "fast", "messages": ["hi"]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    (chat_body(max_tokens="5"), "max_tokens"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(temperature="hot"), "temperature"),
    (chat_body(priority=9), "priority"),
    (chat_body(stream_options=3), "stream_options"),
    ({"model": "fast", "prompt": 5}, "prompt"),
])
def test_bad_openai_input_is_400_in_the_envelope(app, backend, body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    status, _, resp = call(app, "POST", path, body)
    assert status == 400, resp
    assert resp["error"]["type"] == "invalid_request_error" and resp["error"]["param"] == param
    assert backend.arrivals == []


def test_priority_header_and_bad_header(app, backend):
    backend.holding = True
    results = {}

    def send(name, prio):
        results[name] = call(app, "POST", "/v1/chat/completions", chat_body(name),
                             headers={"X-Sluice-Priority": str(prio)})
    threads = [threading.Thread(target=send, args=("blocker", 2))]
    threads[0].start()
    assert backend.wait_arrivals(1)
    for i, (name, prio) in enumerate([("low", 4), ("high", 0)]):
        threads.append(threading.Thread(target=send, args=(name, prio)))
        threads[-1].start()
        until(lambda: pending(app) == i + 1)
    backend.release_all()
    for t in threads:
        t.join(10)
    assert backend.prompts() == ["blocker", "high", "low"]
    status, _, resp = call(app, "POST", "/v1/chat/completions", chat_body(), headers={"X-Sluice-Priority": "urgent"})
    assert status == 400 and resp["error"]["param"] == "priority"


def test_forward_priority_backend_receives_it(make_app, backend):
    app = make_app(toml=f"""
[[backends]]
name = "vllm"
url = "{backend.url}"
forward_priority = true
[[models]]
name = "m"
backends = ["vllm"]
""")
    call(app, "POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                               "priority": 1})
    assert backend.arrivals[-1]["priority"] == 1 and backend.arrivals[-1]["model"] == "m"


def test_chunks_reach_the_client_before_the_upstream_finishes(make_app, make_backend):
    slow = make_backend(chunks=4, chunk_delay=0.3)
    app = make_app({"SLUICE_FAST_URL": slow.url, "SLUICE_REASONING_URL": slow.url})
    s = RawStream(app, chat_body(stream=True))
    while not s.read_line().startswith(b"data: {"):
        pass
    first_at = s.lines[-1][0]
    s.read_all()
    assert first_at < slow.event_times[-1] - 0.5    # the first token arrived ~0.9 s before the last was sent
    assert len([l for _, l in s.lines if l.startswith(b"data: {")]) == 5   # 4 tokens + usage


def test_client_leaving_mid_stream_closes_upstream_and_frees_the_slot(make_app, make_backend):
    slow = make_backend(chunks=200, chunk_delay=0.05)
    app = make_app({"SLUICE_FAST_URL": slow.url, "SLUICE_REASONING_URL": slow.url})
    s = RawStream(app, chat_body("streaming", stream=True))
    while not s.read_line().startswith(b"data: {"):
        pass
    leave_mid_stream(app, slow, s.close, "/v1/chat/completions", chat_body("next"))


def leave_mid_stream(app, slow, leave, path: str, next_body: dict) -> None:
    """With a stream of "streaming" from `slow` open, queue `next_body` (prompt "next") on `path` behind it,
    then `leave()` (the client hangs up): sluice closes the upstream within a second, the queued request
    is served next, and the left stream counts as cancelled. Shared by each API's streaming tests."""
    results = {}
    queued = threading.Thread(target=lambda: results.update(r=call(app, "POST", path, next_body)))
    queued.start()
    until(lambda: pending(app) == 1, what="the next request to queue")
    left_at = time.monotonic()
    leave()
    assert slow.wait_disconnects(1, timeout=3)
    assert slow.disconnects[0] - left_at < 1.0
    queued.join(10)
    assert results["r"][0] == 200 and slow.prompts() == ["streaming", "next"]
    until(lambda: app.scheduler.totals["cancelled"] == 1)
    totals_add_up(app)


def test_streaming_client_leaving_while_queued_never_reaches_upstream(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url})
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/chat/completions", chat_body("blocker")))
    t.start()
    assert backend.wait_arrivals(1)
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body("ghost", stream=True)),
                 {"Content-Type": "application/json"})
    until(lambda: pending(app) == 1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    until(lambda: app.scheduler.totals["cancelled"] == 1)
    backend.release_all()
    t.join(10)
    assert backend.prompts() == ["blocker"]


def test_upstream_dying_mid_stream_ends_with_an_error_event_and_done(app):
    s = RawStream(app, chat_body("!stream_die", stream=True))
    lines = s.read_all()
    data = [l for l in lines if l.startswith(b"data: ")]
    assert data[-1] == b"data: [DONE]\n"
    err = json.loads(data[-2][6:])
    assert err["error"]["type"] == "api_error" and "mid-stream" in err["error"]["message"]
    assert app.scheduler.totals["failed"] == 1


def test_awkwardly_framed_upstream_events_arrive_whole_and_in_order(app):
    s = RawStream(app, chat_body("!ragged", stream=True))
    body = b"".join(s.read_all())
    events = [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e]
    assert events == [b'data: {"n": 1}', b'data: {"n": 2}', b": a comment", b'data: {"n": 3}', b'data: {"n": 4}',
                      b'data: {"n": 5, "text": "data: [DONE] is not the end"}',
                      b'data: {"n": 6}',            # cut short upstream: terminated, so [DONE] stays its own event
                      b"data: [DONE]"]


def test_queued_stream_gets_keepalive_comments_then_its_events(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_SSE_KEEPALIVE_S": 0.1})
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/chat/completions", chat_body("blocker")))
    t.start()
    assert backend.wait_arrivals(1)
    s = RawStream(app, chat_body("queued", stream=True))
    assert s.resp.status == 200                      # the head went out while it waited
    assert s.read_line() == b": queued position=1\n"
    backend.release_all()
    lines = s.read_all()
    assert b"data: [DONE]\n" in lines and any(l.startswith(b'data: {"id"') for l in lines)
    t.join(10)


def test_queued_stream_that_times_out_gets_an_error_event(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_SSE_KEEPALIVE_S": 0.1, "SLUICE_QUEUE_TIMEOUT": 0.5})
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/chat/completions", chat_body("blocker")))
    t.start()
    assert backend.wait_arrivals(1)
    lines = RawStream(app, chat_body("late", stream=True)).read_all()
    data = [l for l in lines if l.startswith(b"data: ")]
    assert json.loads(data[0][6:])["error"]["type"] == "timeout_error" and data[-1] == b"data: [DONE]\n"
    backend.release_all()
    t.join(10)


def test_twenty_streams_one_slot_never_overlap_and_keep_priority(make_app, make_backend):
    counting = make_backend(limit=1, chunks=3)
    app = make_app({"SLUICE_FAST_URL": counting.url, "SLUICE_REASONING_URL": counting.url,
                    "SLUICE_MAX_QUEUE_DEPTH": 50})
    counting.holding = True
    first = threading.Thread(target=lambda: RawStream(app, chat_body("first", stream=True)).read_all())
    first.start()
    assert counting.wait_arrivals(1)
    results: dict = {}

    def stream(i, prio):
        results[i] = RawStream(app, chat_body(f"s{i}-p{prio}", stream=True, priority=prio)).read_all()
    threads = []
    for i in range(20):
        threads.append(threading.Thread(target=stream, args=(i, i % 5)))
        threads[-1].start()
        until(lambda: pending(app) == i + 1)
    counting.release_all()
    for t in threads + [first]:
        t.join(30)
    assert counting.violations == [] and counting.max_seen == 1
    assert all(b"data: [DONE]\n" in results[i] for i in range(20))
    prios = [int(p.rsplit("-p", 1)[1]) for p in counting.prompts()[1:]]
    assert prios == sorted(prios)


def test_non_stream_queue_position_on_503(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_MAX_QUEUE_DEPTH": 1})
    backend.holding = True
    ts = [threading.Thread(target=call, args=(app, "POST", "/v1/chat/completions", chat_body(n))) for n in "ab"]
    ts[0].start()
    assert backend.wait_arrivals(1)
    ts[1].start()
    until(lambda: pending(app) == 1)
    status, headers, body = call(app, "POST", "/v1/chat/completions", chat_body("c"))
    assert status == 503 and headers["X-Queue-Position"] == "2" and headers["Retry-After"]
    assert body["error"]["type"] == "overloaded_error"
    backend.release_all()
    for t in ts:
        t.join(10)


def test_backend_error_status_passes_through_and_5xx_is_502(app):
    status, headers, body = call(app, "POST", "/v1/chat/completions", chat_body("!error500"))
    assert status == 502 and body["error"]["type"] == "api_error" and headers["X-Request-Id"]
    status, _, body = call(app, "POST", "/v1/chat/completions", chat_body("!garbage"))
    assert status == 502 and "invalid JSON" in body["error"]["message"]


def test_null_priority_means_the_default(app, backend):
    # found by the fuzzer: {"priority": null} once reached the queue as None
    for path, body in (("/v1/embeddings", {"model": "fast", "input": "x", "priority": None}),
                       ("/v1/chat/completions", chat_body(priority=None)),
                       ("/v1/query", {"model": "fast", "prompt": "x", "priority": None})):
        assert call(app, "POST", path, body)[0] == 200
    assert [a.get("priority") for a in backend.arrivals] == [None, None, None]
    totals_add_up(app)


def test_endless_upstream_stream_is_cut_at_the_deadline(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_QUEUE_TIMEOUT": 1})
    lines = RawStream(app, chat_body("!endless", stream=True)).read_all()
    data = [l for l in lines if l.startswith(b"data: ")]
    assert data[-1] == b"data: [DONE]\n" and json.loads(data[-2][6:])["error"]["type"] == "timeout_error"
    assert backend.wait_disconnects(1)                  # sluice hung up on the endless stream
    assert call(app, "POST", "/v1/chat/completions", chat_body("next"))[0] == 200


def test_wrong_content_type_from_upstream_is_502(app):
    status, _, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "!html"})
    assert status == 502 and "invalid JSON" in body["error"]
    status, _, body = call(app, "POST", "/v1/chat/completions", chat_body("!html"))
    assert status == 502


@pytest.mark.parametrize("raw, expect", [
    (b'{"model":"tiny","messages":[]}', b'{"model":"up/id","messages":[]}'),
    (b'{"messages": [], "model" :\n "tiny", "n": 1.0e0}', b'{"messages": [], "model" :\n "up/id", "n": 1.0e0}'),
    (b'{"messages":[{"content":"say \\"model\\": tiny"}],"model":"tiny"}',      # escaped quotes are not a key
     b'{"messages":[{"content":"say \\"model\\": tiny"}],"model":"up/id"}'),
    (b'{"model":"tiny","metadata":{"model":"tiny"}}', None),        # two: which one is top-level is not certain
    (b'{"model":"tiny","messages":[{"role":"model"}]}', None),      # "model" as a value counts too
    (b'{"mod\\u0065l":"tiny","x":{"model":"tiny"}}', None),          # the top-level key spelled with an escape
    (b'{"model":"t\\u0069ny"}', None),                                # the name spelled with an escape
    (b'{"x":{"model":"tiny"},"mod\\u0065l":"tiny"}', None),
    (b'{"mod\\u0065l":"tiny","a\\"model":"tiny"}', None),        # an escaped quote does not open a literal
])
def test_with_model_swaps_only_the_top_level_model_bytes(raw, expect):
    from sluice.jobs import with_model
    assert json.loads(raw)["model"] == "tiny"
    assert with_model(raw, "tiny", "up/id") == expect


def test_the_client_bytes_reach_the_backend_with_only_the_model_changed(app, backend):
    raw = b'{ "messages" : [ {"role": "user", "content": "caf\\u00e9 \\"model\\""} ],\n  "model": "tiny",' \
          b' "temperature": 1.0e-1, "top_p": 0.90000000000000002, "seed": 12345678901234567890 }'
    status, _, _ = call(app, "POST", "/v1/chat/completions", raw=raw)
    assert status == 200
    assert backend.raw_arrivals[-1] == raw.replace(b'"tiny"', b'"mlx-community/Qwen3-1.7B-4bit"')
    # a body sluice must change besides the model (priority is not for this backend) is re-encoded
    status, _, _ = call(app, "POST", "/v1/chat/completions", chat_body(priority=1))
    assert status == 200 and b'"priority"' not in backend.raw_arrivals[-1]
    assert backend.arrivals[-1]["model"] == "mlx-community/Qwen3-1.7B-4bit"
