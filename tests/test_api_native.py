"""The sluice-native API end to end: real sluice, real stand-in backends on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from conftest import call, until


def pending(app) -> int:
    return app.scheduler.snapshot()["pending"]


def totals_add_up(app, headers=None) -> dict:
    s = call(app, "GET", "/v1/queue/status", headers=headers)[2]
    assert s["total_received"] == (s["total_served"] + s["total_rejected"] + s["total_timeouts"]
                                   + s["total_cancelled"] + s["total_errors"] + s["pending"] + s["active_count"])
    return s


def query_async(app, body, results, key):
    def run():
        results[key] = call(app, "POST", "/v1/query", body, timeout=30)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_health_shape(app, backend):
    status, headers, body = call(app, "GET", "/v1/health")
    assert status == 200 and headers["X-Request-Id"]
    assert body["status"] == "ok" and body["models_ready"] == 2 and body["models_total"] == 2
    assert body["backends"] == {backend.url: "ready"}
    assert body["model_status"] == {"reasoning": "ready", "fast": "ready", "cloud": "unavailable"}
    assert set(body["queue"]) == {"pending", "active", "total_served", "avg_latency_ms"}


def test_query_forwards_like_the_seed(app, backend):
    status, headers, body = call(app, "POST", "/v1/query",
                                 {"model": "tiny", "prompt": "hi", "system": "be brief", "priority": 1})
    assert status == 200, body
    assert body["status"] == "ok" and body["source"] == "local" and body["result"] == "echo: hi"
    assert headers["X-Sluice-Backend"] == "fast" and float(headers["X-Sluice-Queue-Wait-Ms"]) >= 0
    sent = backend.arrivals[-1]
    assert sent["_path"] == "/v1/chat/completions"
    assert sent["model"] == "mlx-community/Qwen3-1.7B-4bit"          # alias -> model -> upstream id
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert sent["max_tokens"] == 2048 and sent["temperature"] == 0.3 and sent["stream"] is False
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert "priority" not in sent


def test_think_blocks_are_stripped(app):
    body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "<think>\nmull\n</think>\n42"})[2]
    assert body["result"] == "echo: 42"


def test_request_id_is_echoed_only_when_safe(app):
    assert call(app, "GET", "/v1/health", headers={"X-Request-Id": "abc-123"})[1]["X-Request-Id"] == "abc-123"
    rid = call(app, "GET", "/v1/health", headers={"X-Request-Id": "a b;c"})[1]["X-Request-Id"]
    assert rid != "a b;c" and rid.isalnum()


BAD_BODIES = [
    ({"model": "fast"}, "prompt"),
    ({"model": "fast", "prompt": ""}, "prompt"),
    ({"model": "fast", "prompt": "   "}, "prompt"),
    ({"model": "fast", "prompt": 5}, "prompt"),
    ({"model": "fast", "prompt": ["x"]}, "prompt"),
    ({"model": "fast", "prompt": "x" * 2001}, "prompt"),
    ({"model": "fast", "prompt": "x", "system": 3}, "system"),
    ({"model": 7, "prompt": "x"}, "model"),
    ({"model": "", "prompt": "x"}, "model"),
    ({"model": "gpt-9", "prompt": "x"}, "known models: reasoning, fast, tiny, cloud"),
    ({"model": "fast", "prompt": "x", "priority": "high"}, "priority"),
    ({"model": "fast", "prompt": "x", "priority": 5}, "priority"),
    ({"model": "fast", "prompt": "x", "priority": -1}, "priority"),
    ({"model": "fast", "prompt": "x", "priority": True}, "priority"),
    ({"model": "fast", "prompt": "x", "priority": 1.5}, "priority"),
    ({"model": "fast", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "fast", "prompt": "x", "max_tokens": 10 ** 12}, "max_tokens"),
    ({"model": "fast", "prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"model": "fast", "prompt": "x", "temperature": -0.1}, "temperature"),
    ({"model": "fast", "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": "fast", "prompt": "x", "temperature": "warm"}, "temperature"),
    ({"model": "fast", "prompt": "x", "timeout": -1}, "timeout"),
]


@pytest.fixture
def strict_app(make_app, backend):
    return make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                     "SLUICE_MAX_PROMPT_CHARS": 2000, "SLUICE_MAX_BODY_BYTES": 4096})


@pytest.mark.parametrize("body,mentions", BAD_BODIES)
def test_bad_fields_get_400_naming_the_field(strict_app, backend, body, mentions):
    status, _, resp = call(strict_app, "POST", "/v1/query", body)
    assert status == 400, resp
    assert resp["status"] == "error" and mentions in resp["error"]
    assert backend.arrivals == []


RAW_BODIES = [
    (b"[1, 2]", 400, "JSON object"),
    (b'"prompt"', 400, "JSON object"),
    (b"null", 400, "JSON object"),
    (b"{bad json", 400, "not valid JSON"),
    (b'{"model": "fast", "prompt": "x", "temperature": NaN}', 400, "NaN is not valid JSON"),
    (b'{"model": "fast", "prompt": "x", "max_tokens": 1e400}', 400, "out of range"),
    (b"\xff\xfe{}", 400, "not valid JSON"),
    (b"[" * 1000 + b"]" * 1000, 400, "nested deeper"),
    (b'{"a":' * 500 + b"1" + b"}" * 500, 400, "nested deeper"),
    (b"{}" + b" " * 5000, 413, "limit is 4096"),
]


@pytest.mark.parametrize("raw,status,mentions", RAW_BODIES, ids=[str(i) for i in range(len(RAW_BODIES))])
def test_malformed_bodies(strict_app, backend, raw, status, mentions):
    got, _, resp = call(strict_app, "POST", "/v1/query", raw=raw)
    assert got == status, resp
    assert mentions in resp["error"]
    # the queue still works afterwards, and nothing bad reached the backend
    assert call(strict_app, "POST", "/v1/query", {"model": "fast", "prompt": "ok"})[2]["result"] == "echo: ok"
    assert backend.prompts() == ["ok"]


def raw_request(port: int, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


@pytest.mark.parametrize("head,status", ids=[str(i) for i in range(9)], argvalues=[
    (b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"411"),
    (b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", b"400"),
    (b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n", b"400"),
    (b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", b"400"),
    (b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", b"400"),  # read: no prompt
    (b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"GET /v1/health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n", b"431"),
])
def test_bad_http_framing_gets_json_4xx(strict_app, head, status):
    resp = raw_request(strict_app.port, head)
    assert resp.split(b" ", 2)[1] == status, resp[:200]
    body = resp.split(b"\r\n\r\n", 1)[1]
    assert "error" in json.loads(body)
    assert call(strict_app, "POST", "/v1/query", {"model": "fast", "prompt": "ok"})[0] == 200


def test_a_protocol_error_after_a_request_gets_its_own_id(app):
    """Two requests on one kept-alive connection, the second malformed: its 400 has a fresh id, not the
    first one's (ids are the log's ids)."""
    resp = raw_request(app.port, b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: first-1\r\n\r\n"
                                 b"GET /v1/health HTTP/1.1\r\nno colon here\r\n\r\n")
    ids = re.findall(rb"X-Request-Id: (\S+)", resp)
    assert resp.count(b"HTTP/1.1 200") == 1 and b"HTTP/1.1 400" in resp
    assert ids[0] == b"first-1" and len(ids) == 2 and ids[1] != b"first-1"


def test_unknown_path_and_wrong_method_are_json(app):
    status, _, body = call(app, "GET", "/v2/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, headers, body = call(app, "DELETE", "/v1/query")
    assert status == 405 and headers["Allow"] == "POST" and body["status"] == "error"
    status, _, body = call(app, "BREW", "/v1/health")
    assert status == 405 and "GET" in body["error"]


@pytest.mark.parametrize("mode", ["error500", "garbage", "notobject", "reset"])
def test_backend_failures_are_502_not_200(app, backend, mode):
    status, _, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": f"!{mode}"})
    assert status == 502, body
    assert body["status"] == "error" and "backend" in body["error"]
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "next"})[0] == 200
    totals_add_up(app)


def test_queue_full_is_503_with_retry_after(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_MAX_QUEUE_DEPTH": 1})
    backend.holding = True
    results: dict = {}
    threads = [query_async(app, {"model": "fast", "prompt": "running"}, results, 0)]
    assert backend.wait_arrivals(1)
    threads.append(query_async(app, {"model": "fast", "prompt": "queued"}, results, 1))
    until(lambda: pending(app) == 1, what="one queued job")
    status, headers, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "rejected"})
    assert status == 503 and headers["Retry-After"] == "1" and headers["X-Queue-Position"] == "2"
    assert body["status"] == "rejected" and "SLUICE_MAX_QUEUE_DEPTH" in body["error"]
    backend.release(2)
    for t in threads:
        t.join(10)
    assert [r[0] for r in results.values()] == [200, 200]
    s = totals_add_up(app)
    assert s["total_rejected"] == 1 and s["total_served"] == 2


def test_queue_timeout_is_504_and_leaves_the_queue_at_once(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_QUEUE_TIMEOUT": 0.3})
    backend.holding = True
    results: dict = {}
    t = query_async(app, {"model": "fast", "prompt": "running", "timeout": 30}, results, 0)
    assert backend.wait_arrivals(1)
    status, headers, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "late"})
    assert status == 504 and body["status"] == "timeout" and headers["X-Queue-Position"] == "1"
    assert pending(app) == 0
    backend.release()
    t.join(10)
    assert backend.prompts() == ["running"]       # the timed-out job never ran later
    assert totals_add_up(app)["total_timeouts"] == 1


def test_priority_order_is_observed_at_the_backend(app, backend):
    backend.holding = True
    results: dict = {}
    threads = [query_async(app, {"model": "fast", "prompt": "blocker"}, results, "b")]
    assert backend.wait_arrivals(1)
    order = [(4, "bg1"), (2, "n1"), (0, "crit1"), (2, "n2"), (1, "hi1"), (4, "bg2"), (0, "crit2")]
    for i, (prio, name) in enumerate(order):
        threads.append(query_async(app, {"model": "reasoning" if i % 2 else "fast", "prompt": name,
                                         "priority": prio}, results, name))
        until(lambda: pending(app) == i + 1, what=f"{name} queued")
    backend.release(len(order) + 1)
    for t in threads:
        t.join(10)
    assert backend.prompts() == ["blocker", "crit1", "crit2", "hi1", "n1", "n2", "bg1", "bg2"]
    assert backend.max_seen == 1


def test_one_slot_serializes_concurrent_requests(make_app, make_backend):
    fast, reasoning = make_backend(limit=1), make_backend(limit=1)
    counting = make_backend(limit=1)
    app = make_app({"SLUICE_FAST_URL": counting.url, "SLUICE_REASONING_URL": counting.url})
    results: dict = {}
    threads = [query_async(app, {"model": ("fast", "reasoning")[i % 2], "prompt": f"p{i}"}, results, i)
               for i in range(12)]
    for t in threads:
        t.join(20)
    assert [results[i][0] for i in range(12)] == [200] * 12
    assert counting.violations == [] and counting.max_seen == 1
    assert fast.arrivals == reasoning.arrivals == []


def test_disconnect_while_queued_is_never_forwarded(app, backend):
    backend.holding = True
    results: dict = {}
    t = query_async(app, {"model": "fast", "prompt": "blocker"}, results, 0)
    assert backend.wait_arrivals(1)
    body = json.dumps({"model": "fast", "prompt": "abandoned"}).encode()
    s = socket.create_connection(("127.0.0.1", app.port))
    s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    until(lambda: pending(app) == 1, what="the job to queue")
    s.close()
    until(lambda: app.scheduler.totals["cancelled"] == 1, what="the job to be cancelled")
    assert pending(app) == 0
    backend.release_all()
    t.join(10)
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "after"})[0] == 200
    assert backend.prompts() == ["blocker", "after"]
    totals_add_up(app)


def test_a_hung_backend_times_out_without_a_retry(app, backend):
    status, _, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "!hang", "timeout": 0.5})
    assert status == 504, body
    assert backend.wait_disconnects(1)             # sluice closed the upstream connection
    assert backend.prompts() == ["!hang"]          # and never sent the request a second time
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "next"})[0] == 200


def test_dead_backend_is_503_degraded_and_recovers(make_app, backend):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()                                   # nothing listens there: connections are refused
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": f"http://127.0.0.1:{port}/v1"},
                   wait_ready=False)
    until(lambda: call(app, "GET", "/v1/health")[2]["model_status"] == {
        "reasoning": "down", "fast": "ready", "cloud": "unavailable"}, what="both probed")
    health = call(app, "GET", "/v1/health")[2]
    assert health["status"] == "degraded"
    assert health["model_status"]["reasoning"] == "down" and health["model_status"]["fast"] == "ready"
    status, headers, body = call(app, "POST", "/v1/query", {"model": "reasoning", "prompt": "x"})
    assert status == 503 and "Retry-After" in headers and "down" in body["error"]
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x"})[0] == 200


def test_cloud_without_sdk_key_or_cli_says_how_to_enable_it(app):
    status, _, body = call(app, "POST", "/v1/query", {"model": "cloud", "prompt": "x"})
    assert status == 503 and "ANTHROPIC_API_KEY" in body["error"]


def test_queue_status_shape(app):
    call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x"})
    s = totals_add_up(app)
    for key in ("pending", "active", "active_elapsed_s", "total_served", "total_rejected", "total_timeouts",
                "avg_latency_ms", "uptime_s", "total_errors", "total_cancelled"):
        assert key in s
    assert s["total_served"] == 1 and s["active"] is False


def test_drain_refuses_new_work_but_finishes_the_queue(app, backend):
    backend.holding = True
    results: dict = {}
    threads = [query_async(app, {"model": "fast", "prompt": "running"}, results, 0)]
    assert backend.wait_arrivals(1)
    threads.append(query_async(app, {"model": "fast", "prompt": "queued"}, results, 1))
    until(lambda: pending(app) == 1)
    status, _, body = call(app, "POST", "/admin/drain")
    assert status == 200 and body == {"status": "draining", "pending": 1}
    status, _, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "new"})
    assert status == 503 and "draining" in body["error"]
    backend.release_all()
    for t in threads:
        t.join(10)
    assert [results[i][0] for i in (0, 1)] == [200, 200] and backend.prompts() == ["running", "queued"]
