"""The front door's rules (docs/design.md, "The front door"), one test each, over raw sockets, with h11
reading sluice's answers strictly. Each would fail on the framing sluice had before."""

from __future__ import annotations

import json
import pathlib
import resource
import socket
import sys
import threading
import urllib.error
import urllib.request

import pytest

from conftest import call, until
from test_api_native import totals_add_up
from wire import SENTINEL, exchange, in_sync, read_answers, request

pytest.importorskip("h11")

CHAT = json.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def keyed_app(make_app, backend):
    return make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                     "SLUICE_API_KEYS": "good-key"}, wait_ready=False)


# ---- 1. one request in, one answer out: an unread body is never read as the next request ---------------
SMUGGLED = request("GET", "/v1/queue/status", headers={"Authorization": "Bearer good-key", "X-Request-Id": "smuggled"})


@pytest.mark.parametrize("method,path,headers", [
    ("GET", "/v1/health", {}),                                   # a GET with a body nobody reads
    ("POST", "/v1/responses-nope", {}),                          # 404
    ("POST", "/v1/models", {}),                                  # 405
    ("PUT", "/v1/query", {}),                                    # 405
    ("POST", "/v1/query", {}),                                   # 401: no key (its body holds one)
    ("POST", "/admin/drain", {"Authorization": "Bearer wrong"}),  # 401 on an admin route
], ids=["get", "404", "405", "put", "401", "401-admin"])
def test_unread_body_is_dropped_not_parsed(keyed_app, method, path, headers):
    ex = exchange(keyed_app.port, request(method, path, SMUGGLED, headers) + SENTINEL, [method, "GET"])
    assert ex.answers[0].status in (200, 401, 404, 405)
    assert in_sync(ex, 1), [(a.status, a.headers.get("x-request-id")) for a in ex.answers]
    assert all(a.headers.get("x-request-id") != "smuggled" for a in ex.answers)


def test_unread_large_body_closes_the_connection(app):
    big = b"x" * (200 * 1024)                       # past what is worth reading to keep the connection
    ex = exchange(app.port, request("POST", "/v1/nope", big), ["POST", "GET"], then=SENTINEL)
    assert ex.answers[0].status == 404 and ex.answers[0].headers.get("connection") == "close"
    assert ex.closed and len(ex.answers) == 1


def test_431_closes_the_connection(app):
    head = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    ex = exchange(app.port, head + b"\r\n" + SENTINEL, ["GET", "GET"])
    assert ex.answers[0].status == 431 and ex.closed and len(ex.answers) == 1


def test_expect_continue_not_sent_when_answered_before_the_body(keyed_app):
    """A request refused before its body is read gets no 100 Continue, and the connection closes (the
    client may still send the body it held back)."""
    head = request("POST", "/v1/query", None, {"Expect": "100-continue", "Content-Length": "10"})
    ex = exchange(keyed_app.port, head, ["POST"])
    assert ex.answers[0].status == 401 and ex.answers[0].informational == [] and ex.closed


# ---- 2. numbers in headers: ASCII digits, bounded ------------------------------------------------------
@pytest.mark.parametrize("value", ["²", "¹²", "9" * 5000, "+5", "0x10", "5 5", "-1", "1_0", "٣"])
def test_content_length_must_be_ascii_digits(app, value):
    raw = f"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {value}\r\n\r\n".encode("utf-8", "replace")
    ex = exchange(app.port, raw + SENTINEL, ["POST", "GET"])
    assert ex.answers[0].status == 400 and "Content-Length" in json.loads(ex.answers[0].body)["error"]["message"]
    assert ex.closed and len(ex.answers) == 1


@pytest.mark.parametrize("value", ["²", "¹", "9" * 5000, "1.0", "-0"])      # sent as Latin-1 bytes
def test_priority_header_must_be_ascii_digits(app, value):
    ex = exchange(app.port, request("POST", "/v1/chat/completions", CHAT, {"X-Sluice-Priority": value}), ["POST"])
    assert ex.answers[0].status == 400 and "X-Sluice-Priority" in ex.answers[0].body.decode()


# ---- 3. header bytes are counted while they are read ---------------------------------------------------
def test_431_arrives_as_soon_as_the_total_is_passed(app):
    """40 KiB of one endless header line and nothing more: answered 431 without waiting for the rest."""
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 40_000)
        ex = read_answers(s, ["GET"])
    assert ex.answers[0].status == 431 and ex.closed


def test_header_floods_do_not_grow_memory(app):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def flood():
        try:
            with socket.create_connection(("127.0.0.1", app.port), timeout=10) as s:
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                line = b"X-Pad: " + b"a" * 60_000 + b"\r\n"
                for _ in range(100):                       # 6 MB of header lines, if sluice kept reading
                    s.sendall(line)
        except OSError:
            pass                                           # sluice answered 431 and closed: what we want
    threads = [threading.Thread(target=flood) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grew_kib < 40_000, f"RSS grew {grew_kib} KiB for 20 header floods"
    assert call(app, "GET", "/v1/health")[0] == 200


# ---- 4. the browser threat model -----------------------------------------------------------------------
def test_cross_site_no_cors_drain_is_refused(app):
    ex = exchange(app.port, request("POST", "/admin/drain", b"{}", {"Origin": "https://evil.example",
                                                                     "Content-Type": "text/plain"}), ["POST"])
    assert ex.answers[0].status == 403 and "cors_origins" in ex.answers[0].body.decode()
    assert call(app, "GET", "/v1/health")[2]["status"] == "ok"
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "still here"})[0] == 200


def test_cross_site_chat_is_refused_before_any_work(app, backend):
    ex = exchange(app.port, request("POST", "/v1/chat/completions", CHAT, {"Origin": "http://evil.example:8000",
                                                                          "Content-Type": "text/plain"}), ["POST"])
    assert ex.answers[0].status == 403 and backend.arrivals == []
    ex = exchange(app.port, request("POST", "/v1/chat/completions", CHAT, {"Sec-Fetch-Site": "cross-site"}), ["POST"])
    assert ex.answers[0].status == 403 and backend.arrivals == []


@pytest.mark.parametrize("host", ["evil.example:5590", "evil.example", "127.0.0.1.nip.io:80", "localhost.evil.example"])
def test_rebinding_host_is_refused(app, host):
    ex = exchange(app.port, request("GET", "/v1/queue/status", host=host), ["GET"])
    assert ex.answers[0].status == 421 and "allowed_hosts" in ex.answers[0].body.decode()


@pytest.mark.parametrize("host", ["127.0.0.1:5590", "localhost:5590", "[::1]:5590", "LOCALHOST", "app.localhost",
                                  "192.168.1.7:5590"])
def test_hosts_of_this_machine_are_served(app, host):
    assert exchange(app.port, request("GET", "/v1/health", host=host), ["GET"]).answers[0].status == 200


def test_missing_host_is_400(app):
    ex = exchange(app.port, b"GET /v1/health HTTP/1.1\r\n\r\n", ["GET"])
    assert ex.answers[0].status == 400 and "Host" in ex.answers[0].body.decode()


def test_allowed_hosts_and_cors_origins(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_ALLOWED_HOSTS": "gpu-box.lan", "SLUICE_CORS_ORIGINS": "http://localhost:3000"})
    assert exchange(app.port, request("GET", "/v1/health", host="gpu-box.lan:5590"), ["GET"]).answers[0].status == 200
    ok = exchange(app.port, request("POST", "/v1/chat/completions", CHAT, {"Origin": "http://localhost:3000"}),
                  ["POST"]).answers[0]
    assert ok.status == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    pre = exchange(app.port, request("OPTIONS", "/v1/chat/completions", None, {
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}), ["OPTIONS"]).answers[0]
    assert pre.status == 204 and pre.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "POST" in pre.headers["access-control-allow-methods"] and pre.body == b""
    other = exchange(app.port, request("OPTIONS", "/v1/chat/completions", None, {
        "Origin": "http://localhost:3001", "Access-Control-Request-Method": "POST"}), ["OPTIONS"]).answers[0]
    assert other.status == 403 and "access-control-allow-origin" not in other.headers


def test_same_origin_page_and_navigation_are_served(app):
    origin = f"http://127.0.0.1:{app.port}"
    same = exchange(app.port, request("POST", "/v1/chat/completions", CHAT, {"Origin": origin, "Sec-Fetch-Site":
                                                                              "same-origin"}, host=f"127.0.0.1:{app.port}"),
                    ["POST"]).answers[0]
    assert same.status == 200 and "access-control-allow-origin" not in same.headers
    nav = exchange(app.port, request("GET", "/", None, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}),
                   ["GET"]).answers[0]
    assert nav.status == 200 and nav.headers["content-type"].startswith("text/html")


def test_non_browser_clients_keep_any_content_type(app):
    """`curl -d` sends application/x-www-form-urlencoded; without Origin it is served as before."""
    body = json.dumps({"model": "fast", "prompt": "form"}).encode()
    ex = exchange(app.port, request("POST", "/v1/query", body, {"Content-Type": "application/x-www-form-urlencoded"}),
                  ["POST"])
    assert ex.answers[0].status == 200 and json.loads(ex.answers[0].body)["result"] == "echo: form"


def test_drain_is_visible_and_reversible(app):
    assert call(app, "POST", "/admin/drain")[0] == 200
    assert call(app, "GET", "/v1/health")[2]["status"] == "draining"
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x"})[0] == 503
    status, _, body = call(app, "POST", "/admin/resume")
    assert status == 200 and body["resumed"] is True
    assert call(app, "GET", "/v1/health")[2]["status"] == "ok"
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "back"})[2]["result"] == "echo: back"


# ---- 5. an oversized body's answer reaches the client --------------------------------------------------
def test_oversized_body_gets_its_413(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_MAX_BODY_BYTES": 1 << 20})
    req = urllib.request.Request(f"http://127.0.0.1:{app.port}/v1/query", data=b"x" * (5 << 20),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=20)
    assert e.value.code == 413 and "SLUICE_MAX_BODY_BYTES" in e.value.read().decode()


# ---- 6. chunked request bodies -------------------------------------------------------------------------
def chunked(body: bytes, sizes=(7, 3), trailer: bytes = b"") -> bytes:
    out, i = b"", 0
    for n in sizes:
        out += b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + n]), body[i:i + n])
        i += n
    if i < len(body):
        out += b"%X\r\n%s\r\n" % (len(body) - i, body[i:])
    return out + b"0\r\n" + trailer + b"\r\n"


def test_chunked_body_is_read(app, backend):
    body = json.dumps({"model": "fast", "prompt": "chunky"}).encode()
    raw = request("POST", "/v1/query", None, {"Transfer-Encoding": "chunked"}) + chunked(body, trailer=b"X-T: 1\r\n")
    ex = exchange(app.port, raw + SENTINEL, ["POST", "GET"])
    assert ex.answers[0].status == 200 and json.loads(ex.answers[0].body)["result"] == "echo: chunky"
    assert in_sync(ex, 1)


def test_chunked_body_over_the_limit_is_413(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_MAX_BODY_BYTES": 2048})
    raw = request("POST", "/v1/query", None, {"Transfer-Encoding": "chunked"}) + chunked(b"x" * 5000, (1000,) * 5)
    ex = exchange(app.port, raw + SENTINEL, ["POST", "GET"])
    assert ex.answers[0].status == 413 and ex.closed and len(ex.answers) == 1


@pytest.mark.parametrize("framing,status", [
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
    (b"Transfer-Encoding: gzip, chunked\r\n", 501),
    (b"Transfer-Encoding: identity\r\n", 501),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 501),
], ids=["cl+te", "gzip", "identity", "twice"])
def test_bad_transfer_encodings_are_refused_and_closed(app, framing, status):
    raw = b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    ex = exchange(app.port, raw + SENTINEL, ["POST", "GET"])
    assert ex.answers[0].status == status and ex.closed and len(ex.answers) == 1


@pytest.mark.parametrize("chunks", [b"zz\r\nhello\r\n0\r\n\r\n", b"3\r\nhello\r\n0\r\n\r\n",
                                    b"5" + b" " * 2000 + b"\r\nhello\r\n0\r\n\r\n", b"-5\r\nhello\r\n0\r\n\r\n"],
                         ids=["not-hex", "size-short", "line-too-long", "negative"])
def test_bad_chunks_are_400_and_closed(app, chunks):
    raw = request("POST", "/v1/query", None, {"Transfer-Encoding": "chunked"}) + chunks
    ex = exchange(app.port, raw + SENTINEL, ["POST", "GET"])
    assert ex.answers[0].status == 400 and ex.closed and len(ex.answers) == 1


# ---- 7. no lock-out ------------------------------------------------------------------------------------
def test_idle_flood_does_not_lock_out_a_new_client(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_MAX_CONNECTIONS": 64})
    flood = []
    try:
        for _ in range(100):                      # more idle keep-alive connections than the cap
            s = socket.create_connection(("127.0.0.1", app.port), timeout=10)
            s.sendall(request("GET", "/v1/health"))
            assert read_answers(s, ["GET"]).answers[0].status == 200
            flood.append(s)
        assert app.server.connections.count <= 64
        assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "new client"}, timeout=5)[0] == 200
        assert app.server.connections.shed_total >= 36
    finally:
        for s in flood:
            s.close()


def test_per_client_cap_sheds_that_clients_own_idle_connection():
    """The Connections table alone (a remote address cannot be made on 127.0.0.1)."""
    from sluice.connections import Connections
    conns = Connections(max_total=10, per_client=2)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        a, b, c, d = (p[0] for p in pairs)
        assert conns.admit(a, "10.0.0.5") and conns.admit(b, "10.0.0.5")
        conns.busy(b)
        assert conns.admit(c, "10.0.0.5")          # sheds a (idle), not b (busy)
        assert pairs[0][0].recv(1) == b""          # a's read side was shut down
        conns.busy(c)
        assert not conns.admit(d, "10.0.0.5")      # nothing of this client's is idle: refused
        assert conns.admit(d, "10.0.0.6") and conns.count == 3
    finally:
        for x, y in pairs:
            x.close()
            y.close()


# ---- 8. what goes upstream is valid JSON ---------------------------------------------------------------
@pytest.mark.parametrize("raw", [b'{"model":"fast","messages":[{"role":"user","content":"x"}],"foo":NaN}',
                                 b'{"model":"fast","messages":[{"role":"user","content":"x"}],"foo":-Infinity}',
                                 b'{"model":"fast","messages":[{"role":"user","content":"x"}],"foo":1e999}'])
def test_non_json_numbers_are_refused(app, backend, raw):
    status, _, body = call(app, "POST", "/v1/chat/completions", raw=raw)
    assert status == 400 and "JSON" in body["error"]["message"] and backend.raw_arrivals == []


def test_valid_numbers_go_upstream_as_written(app, backend):
    raw = b'{"model":"fast","messages":[{"role":"user","content":"x"}],"foo":1e300,"bar":12345678901234567890123}'
    assert call(app, "POST", "/v1/chat/completions", raw=raw)[0] == 200
    assert b'"foo":1e300,"bar":12345678901234567890123' in backend.raw_arrivals[-1]


# ---- 9. the smaller rules ------------------------------------------------------------------------------
def test_head_answers_as_get_without_a_body(app):
    ex = exchange(app.port, request("HEAD", "/v1/health") + SENTINEL, ["HEAD", "GET"])
    head = ex.answers[0]
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0
    assert in_sync(ex, 1)
    ex = exchange(app.port, request("HEAD", "/v1/query"), ["HEAD"])
    assert ex.answers[0].status == 405 and "POST" in ex.answers[0].headers["allow"]


def test_absolute_form_target(app):
    body = json.dumps({"model": "fast", "prompt": "abs"}).encode()
    raw = (b"POST http://127.0.0.1:%d/v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
           % (app.port, len(body), body))
    ex = exchange(app.port, raw, ["POST"])
    assert ex.answers[0].status == 200 and json.loads(ex.answers[0].body)["result"] == "echo: abs"
    evil = b"GET http://evil.example/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert exchange(app.port, evil, ["GET"]).answers[0].status == 421   # the target's authority is the Host


def test_models_retrieve(app):
    status, _, body = call(app, "GET", "/v1/models/tiny")
    assert status == 200 and body["id"] == "tiny" and body["object"] == "model"
    status, _, body = call(app, "GET", "/v1/models/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_half_close_cancels_a_queued_request(app, backend):
    """A half-close is a close (docs/design.md): the held request is cancelled, nothing left behind."""
    backend.holding = True
    body = json.dumps({"model": "fast", "prompt": "held"}).encode()
    blocker = threading.Thread(target=call, args=(app, "POST", "/v1/query", {"model": "fast", "prompt": "first"}))
    blocker.start()
    assert backend.wait_arrivals(1)
    ex_box = {}
    t = threading.Thread(target=lambda: ex_box.setdefault("ex", exchange(
        app.port, request("POST", "/v1/query", body), ["POST"], half_close=True)))
    t.start()
    until(lambda: app.scheduler.snapshot()["totals"]["cancelled"] == 1, timeout=10, what="the cancel")
    backend.release_all()
    blocker.join(10)
    t.join(10)
    ex = ex_box["ex"]               # a half-closed client can still read: it is told, and the connection ends
    assert [a.status for a in ex.answers] == [400] and b"cancelled" in ex.answers[0].body and ex.closed
    totals_add_up(app)


def test_client_reset_is_one_log_line_not_a_traceback(app, capfd, caplog):
    s = socket.create_connection(("127.0.0.1", app.port))
    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()                                                # RST on a kept-alive connection
    until(lambda: app.server.connections.count == 0, timeout=5, what="the connection to end")
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info]


def test_health_is_warming_while_a_managed_backend_starts(make_app, tmp_path):
    """A managed backend still starting makes health say "warming" (README's promise), then "ok"."""
    gate = tmp_path / "go"
    script = tmp_path / "slow_engine.py"
    engine = pathlib.Path(__file__).parent / "fake_engine.py"
    script.write_text(f"import pathlib, runpy, sys, time\n"
                      f"while not pathlib.Path({str(gate)!r}).exists():\n    time.sleep(0.01)\n"   # a model load
                      f"sys.path.insert(0, {str(engine.parent)!r})\n"
                      f"runpy.run_path({str(engine)!r}, run_name='__main__')\n")
    toml = f"""
[[backends]]
name = "slow"
command = [{json.dumps(sys.executable)}, {json.dumps(str(script))}, "--port", "{{port}}"]
start = "eager"
start_timeout_s = 30
[[models]]
name = "m"
upstream_model = "fake-model"
backends = ["slow"]
"""
    app = make_app(toml=toml, wait_ready=False)
    until(lambda: app.supervisor.snapshot()[0]["state"] == "starting", timeout=10, what="the start")
    doc = call(app, "GET", "/v1/health")[2]
    assert doc["status"] == "warming" and doc["model_status"]["m"] == "warming"
    gate.write_text("go")
    until(lambda: call(app, "GET", "/v1/health")[2]["status"] == "ok", timeout=20, what="ready")
