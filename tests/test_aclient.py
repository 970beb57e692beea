"""The asyncio client: every row of the degradation table, run through the sync client's own stand-ins
(tests/test_client.py), must give exactly what the sync client gives; then streaming (both clients), the
request that goes out, cancellation, concurrency, and real sluice apps."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice import P_CRITICAL, SluiceClient
from sluice.aclient import AsyncSluiceClient
from test_client import (ANSWERS, HAS_STATUS, LOGGED, SECRET, TIMEOUT, UNREACHABLE, Misbehaving, RawWire,
                         refused_url, srv, use)  # noqa: F401  (fixtures)

MSGS = [{"role": "user", "content": SECRET}]


def run(coro):
    return asyncio.run(coro)


async def drain(stream) -> list[str]:
    return [piece async for piece in stream]


# ---- the degradation table, row by row ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ANSWERS))
def test_query_returns_empty_string_on_every_failure(srv, name, caplog):
    use(srv, name)
    caplog.set_level(logging.DEBUG, logger="sluice.client")
    t0 = time.monotonic()
    assert run(AsyncSluiceClient(srv.url, timeout=TIMEOUT).query("fast", SECRET)) == ""
    assert time.monotonic() - t0 < 2.0                 # "trickle": the whole call has one deadline
    assert len(srv.requests) == 1 and srv.requests[0][3]["prompt"] == SECRET
    assert LOGGED.get(name, "") in caplog.text and "sluice query" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("name", list(ANSWERS))
def test_chat_returns_empty_string_on_every_failure(srv, name, caplog):
    use(srv, name)
    caplog.set_level(logging.DEBUG, logger="sluice.client")
    assert run(AsyncSluiceClient(srv.url, timeout=TIMEOUT).chat("fast", MSGS)) == ""
    assert len(srv.requests) == 1 and SECRET not in caplog.text


@pytest.mark.parametrize("name", list(ANSWERS))
def test_health_and_queue_status_degrade_exactly_as_the_sync_client(srv, name):
    use(srv, name)
    c = AsyncSluiceClient(srv.url, timeout=TIMEOUT)
    h, qs = run(c.health()), run(c.queue_status())
    if name in UNREACHABLE:
        assert h == {"status": "down"}
    elif name in HAS_STATUS:
        assert h == HAS_STATUS[name] and qs == HAS_STATUS[name]
    else:
        assert h["status"] == "down" and isinstance(h["error"], str) and set(h) == {"status", "error"}
    if name not in HAS_STATUS:
        assert set(qs) == {"error"} and isinstance(qs["error"], str)
    assert [r[:2] for r in srv.requests] == [("GET", "/v1/health"), ("GET", "/v1/queue/status")]
    sync = SluiceClient(srv.url, timeout=TIMEOUT)
    same = lambda a, b: a.keys() == b.keys() and a.get("status") == b.get("status")   # reasons may word a timeout apart
    assert same(sync.health(), h) and same(sync.queue_status(), qs)


@pytest.mark.parametrize("name", list(ANSWERS))
def test_chat_stream_ends_with_an_error_on_every_failure(srv, name, caplog):
    use(srv, name)
    caplog.set_level(logging.DEBUG, logger="sluice.client")

    async def go():
        stream = AsyncSluiceClient(srv.url, timeout=TIMEOUT).chat_stream("fast", MSGS)
        return await drain(stream), stream.error
    pieces, error = run(go())
    assert pieces == [] and error and "sluice chat_stream" in caplog.text and SECRET not in caplog.text
    sync = SluiceClient(srv.url, timeout=TIMEOUT).chat_stream("fast", MSGS)
    assert list(sync) == [] and sync.error
    assert srv.requests[0][3]["stream"] is True and srv.requests[0][2]["Accept"] == "text/event-stream"


def test_server_down_everything_degrades(refused_url):
    c = AsyncSluiceClient(refused_url)

    async def go():
        assert await c.query("fast", "x") == "" and await c.chat("fast", []) == ""
        assert await c.health() == {"status": "down"}
        assert "ConnectionRefusedError" in (await c.queue_status())["error"]
        stream = c.chat_stream("fast", [])
        assert await drain(stream) == [] and "ConnectionRefusedError" in stream.error
    run(go())


# ---- streams ---------------------------------------------------------------------------------------------------
def sse(*events, done=True, chunked=False):
    """A stand-in answer: the events as SSE `data:` lines (dicts as JSON), then [DONE], then close."""
    def answer(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        lines = [b": queued position=1\n\n"]
        lines += [b"data: " + (json.dumps(e) if isinstance(e, dict) else e).encode() + b"\n\n" for e in events]
        lines += [b"data: [DONE]\n\n"] if done else []
        for line in lines:
            for piece in (line[:7], line[7:]):          # an event split across reads
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                h.wfile.flush()
        if chunked:
            h.wfile.write(b"0\r\n\r\n")
        h.close_connection = True
    return answer


def delta(text):
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


@pytest.mark.parametrize("chunked", [False, True])
def test_stream_pieces_in_order_and_complete(srv, chunked):
    srv.answer = sse(delta("Hel"), delta("lo"), {"choices": []}, delta(""), chunked=chunked)

    async def go():
        stream = AsyncSluiceClient(srv.url).chat_stream("fast", MSGS, priority=1, max_tokens=5)
        return await drain(stream), stream.error
    assert run(go()) == (["Hel", "lo"], None)
    sync = SluiceClient(srv.url).chat_stream("fast", MSGS, priority=1, max_tokens=5)
    assert (list(sync), sync.error) == (["Hel", "lo"], None)
    for method, path, headers, body, _ in srv.requests:
        assert (method, path, headers["X-Sluice-Priority"]) == ("POST", "/v1/chat/completions", "1")
        assert body == {"model": "fast", "messages": MSGS, "max_tokens": 5, "stream": True}


@pytest.mark.parametrize("answer,why", [
    (sse(delta("a"), done=False), "ended before data: [DONE]"),
    (sse(delta("a"), {"error": {"message": "backend fell over", "type": "server_error"}}), "backend fell over"),
    (sse(delta("a"), "{not json"), "JSONDecodeError"),
    (sse(delta("a"), {"object": "chunk"}), "without choices"),
])
def test_a_broken_stream_keeps_what_came_and_says_why(srv, answer, why):
    srv.answer = answer

    async def go():
        stream = AsyncSluiceClient(srv.url).chat_stream("fast", MSGS)
        return await drain(stream), stream.error
    pieces, error = run(go())
    assert pieces == ["a"] and why in error
    sync = SluiceClient(srv.url).chat_stream("fast", MSGS)
    assert list(sync) == ["a"] and why in sync.error


def test_leaving_a_stream_early_closes_its_connection(srv):
    srv.answer = sse(*[delta(f"p{i}") for i in range(50)])

    async def go():
        async with AsyncSluiceClient(srv.url).chat_stream("fast", MSGS) as stream:
            async for piece in stream:
                assert piece == "p0"
                break
        return stream.error
    assert run(go()) is None
    with SluiceClient(srv.url).chat_stream("fast", MSGS) as s:
        assert next(s) == "p0"


# ---- the request that goes out ----------------------------------------------------------------------------------
def test_query_and_chat_send_what_the_sync_client_sends(srv):
    async def go(c):
        assert await c.query("reasoning", "Explain", system="sys", priority=P_CRITICAL, max_tokens=50,
                             timeout=30) == "fine"
        srv.answer = lambda h: h.reply(200, {"choices": [{"message": {"role": "assistant", "content": "hey"}}]})
        assert await c.chat("fast", MSGS, priority=1, max_tokens=5, stream=True) == "hey"
    run(go(AsyncSluiceClient(srv.url, api_key="own-key")))
    srv.answer = lambda h: h.reply(200, {"status": "ok", "result": "fine"})
    c = SluiceClient(srv.url, api_key="own-key")
    c.query("reasoning", "Explain", system="sys", priority=P_CRITICAL, max_tokens=50, timeout=30)
    srv.answer = lambda h: h.reply(200, {"choices": [{"message": {"role": "assistant", "content": "hey"}}]})
    c.chat("fast", MSGS, priority=1, max_tokens=5, stream=True)
    a, s = srv.requests[:2], srv.requests[2:]
    for (am, ap, ah, ab, _), (sm, sp, sh, sb, _) in zip(a, s):
        assert (am, ap, ab) == (sm, sp, sb)
        for k in ("Content-Type", "Authorization", "Accept", "X-Sluice-Priority", "User-Agent"):
            assert ah.get(k) == sh.get(k), k
    assert a[0][3]["timeout"] == 30 and a[1][2]["X-Sluice-Priority"] == "1" and "stream" not in a[1][3]


def test_base_url_environment_key_and_path_prefix(srv, monkeypatch):
    port = srv.url.rsplit(":", 1)[1]
    monkeypatch.delenv("SLUICE_URL", raising=False)
    monkeypatch.setenv("SLUICE_PORT", port)
    monkeypatch.setenv("SLUICE_API_KEY", "env-key")
    c = AsyncSluiceClient()
    assert c.url == f"http://127.0.0.1:{port}" and run(c.query("fast", "x")) == "fine"
    monkeypatch.setenv("SLUICE_URL", f"127.0.0.1:{port}/llm/")
    assert c.url == f"http://127.0.0.1:{port}/llm" and run(c.health())["status"] == "ok"
    assert [r[1] for r in srv.requests] == ["/v1/query", "/llm/v1/health"]
    assert all(r[2]["Authorization"] == "Bearer env-key" for r in srv.requests)
    assert run(AsyncSluiceClient(srv.url, api_key="sk-LEAK\r\nX-Evil: 1").query("fast", "x")) == ""
    assert len(srv.requests) == 2


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "http://", "http://127.0.0.1:notaport", "http://[::1",
                                 "http://127.0.0.1:99999", "http://127.0.0.1:1/a b"])
def test_bad_base_url(url):
    c = AsyncSluiceClient(url)

    async def go():
        assert await c.query("fast", "x") == "" and await c.chat("fast", []) == ""
        assert (await c.health())["status"] == "down" and "error" in await c.queue_status()
        assert await drain(c.chat_stream("fast", [])) == []
    run(go())


@pytest.mark.parametrize("kwargs", [{"prompt": {1, 2}}, {"temperature": float("nan")}, {"system": b"bytes"}])
def test_unserializable_arguments_fail_before_sending(srv, kwargs):
    assert run(AsyncSluiceClient(srv.url).query(**{"model": "fast", "prompt": "x", **kwargs})) == ""
    assert srv.requests == []


@pytest.mark.parametrize("status,doc", [(200, {"status": "warming", "models_ready": 0}),
                                        (503, {"status": "degraded", "models_ready": 1}),
                                        (503, {"status": "warming"})])
def test_health_passes_sluices_own_status_through(srv, status, doc):
    srv.answer = lambda h: h.reply(status, doc)
    assert run(AsyncSluiceClient(srv.url).health()) == doc


# ---- asyncio itself ------------------------------------------------------------------------------------------------
def test_cancelling_a_call_propagates_and_frees_its_connection(srv):
    use(srv, "hang")

    async def go():
        task = asyncio.create_task(AsyncSluiceClient(srv.url).query("fast", "x"))
        while not srv.requests:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(go())


def test_concurrent_calls_share_nothing(srv):
    srv.answer = lambda h: h.reply(200, {"status": "ok", "result": "re: " + h.body["prompt"]})
    c = AsyncSluiceClient(srv.url, timeout=5)

    async def go():
        return await asyncio.gather(*(c.query("fast", f"p{i}") for i in range(16)))
    assert run(go()) == [f"re: p{i}" for i in range(16)]


def test_methods_keep_the_sync_clients_signatures_and_docs():
    import inspect
    for name in ("query", "chat", "health", "queue_status", "chat_stream"):
        a, s = getattr(AsyncSluiceClient, name), getattr(SluiceClient, name)
        assert inspect.signature(a) == inspect.signature(s) and a.__doc__ == s.__doc__ and a.__doc__
    assert inspect.iscoroutinefunction(AsyncSluiceClient.query)


# ---- against real sluice -------------------------------------------------------------------------------------------
def test_against_real_sluice(app, backend):
    c = AsyncSluiceClient(app.url)

    async def go():
        assert await c.query("tiny", "hello") == "echo: hello"
        assert await c.query("tiny", "hello", timeout=30) == "echo: hello"
        assert (await c.health())["status"] == "ok" and (await c.queue_status())["total_served"] == 2
        assert await c.chat("fast", [{"role": "user", "content": "hi"}], priority=P_CRITICAL)
        stream = c.chat_stream("fast", [{"role": "user", "content": "hi"}])
        assert "".join(await drain(stream)) == "t0 t1 t2 " and stream.error is None
        assert await c.query("unknown-model", "x") == "" and await c.query("fast", "x", priority=9) == ""
        broken = c.chat_stream("fast", [{"role": "user", "content": "!stream_die"}])
        assert await drain(broken) == ["t0 ", "t1 "] and broken.error
        backend.mode = "error500"
        assert await c.query("fast", "x") == ""
        failed = c.chat_stream("fast", [{"role": "user", "content": "hi"}])
        assert await drain(failed) == [] and failed.error
    run(go())
    backend.mode = "ok"
    sync = SluiceClient(app.url).chat_stream("fast", [{"role": "user", "content": "hi"}])
    assert "".join(sync) == "t0 t1 t2 " and sync.error is None


def test_real_sluice_with_keys_and_a_queue_full_answer(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_API_KEYS": "sk-admin-1"})

    async def go():
        assert await AsyncSluiceClient(app.url).query("fast", "x") == ""          # 401 -> ""
        assert await AsyncSluiceClient(app.url, api_key="sk-admin-1").query("fast", "x") == "echo: x"
        assert (await AsyncSluiceClient(app.url).health()) == {"status": "ok"}    # keyless probes see the status
    run(go())


# ---- property: whatever comes back, nothing raises ------------------------------------------------------------
@pytest.fixture(scope="module")
def stand_ins():
    http_srv, wire = Misbehaving(), RawWire()
    yield http_srv, wire
    http_srv.close()
    wire.close()


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=96), status=st.sampled_from([200, 400, 503]), on_the_wire=st.booleans(),
       prompt=st.one_of(st.text(), st.none(), st.integers()))
def test_never_raises_whatever_comes_back(stand_ins, raw, status, on_the_wire, prompt):
    http_srv, wire = stand_ins
    if on_the_wire:
        wire.payload = raw
        url = wire.url
    else:
        http_srv.answer = lambda h: h.reply(status, raw=raw)
        url = http_srv.url
    c = AsyncSluiceClient(url, timeout=2)

    async def go():
        assert isinstance(await c.query("fast", prompt), str)
        assert isinstance(await c.chat("fast", [{"role": "user", "content": prompt}]), str)
        h = await c.health()
        assert isinstance(h, dict) and isinstance(h["status"], str)
        assert isinstance(await c.queue_status(), dict)
        stream = c.chat_stream("fast", [])
        assert all(isinstance(p, str) for p in await drain(stream))
    run(go())
