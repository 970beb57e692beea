"""The degrade-safe client: every row of the seed's degradation table, against real sluice and against real
stand-in servers on 127.0.0.1 that misbehave on purpose. No method ever raises (Exception); each returns its
safe default, and the stand-in checks what was actually sent."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sluice.client as client_mod
from fakes import QuietServer
from sluice import P_BG, P_CRITICAL, SluiceClient, sluice

SECRET = "SECRET-PROMPT-TEXT-7f3a"


class Server(QuietServer):
    request_queue_size = 64      # the concurrency test connects 16 at once


class Misbehaving:
    """An HTTP/1.1 server whose every answer is `self.answer(handler)`; records each request it read as
    (method, path, headers, parsed JSON body or None, raw body bytes)."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict, object, bytes]] = []
        self.answer = lambda h: h.reply(200, {"status": "ok", "result": "fine"})
        self.unblock = threading.Event()       # released at teardown: no handler outlives its test
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            owner = outer

            def log_message(self, *a):
                pass

            def reply(self, status, obj=None, raw=None, length=None, close=False):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length if length is not None else len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = self.close_connection or close

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                self.body = body
                outer.requests.append((self.command, self.path, dict(self.headers), body, raw))
                outer.answer(self)

            do_GET = do_POST = _any

        self.server = Server(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.unblock.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def srv():
    s = Misbehaving()
    yield s
    s.close()


@pytest.fixture
def refused_url():
    """A port that is bound but not listening: connecting is refused, and nothing else can take the port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


# ---- misbehaviours ------------------------------------------------------------------------------------
def reset(h):
    """RST right after reading the request: linger 0, then close the descriptor itself (no FIN first)."""
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    os.close(h.connection.detach())
    h.close_connection = True


def hang(h):
    h.owner.unblock.wait(10)


def trickle(h):
    """Headers promising 100 bytes, then one byte every 0.05 s: each read succeeds, the whole never ends."""
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.end_headers()
    for _ in range(100):
        if h.owner.unblock.wait(0.05):
            break
        try:
            h.wfile.write(b" ")
        except OSError:
            break
    h.close_connection = True


# 200 with a JSON object that has a string status: useless to query(), but a health document to health().
HAS_STATUS = {"no result": {"status": "ok"}, "result not text": {"status": "ok", "result": 5},
              "status not ok": {"status": "error", "result": "partial"}}
ANSWERS = {
    "503 queue full": lambda h: h.reply(503, {"status": "rejected", "error": "queue full"}),
    "504 timeout": lambda h: h.reply(504, {"status": "timeout", "error": "waited"}),
    "500": lambda h: h.reply(500, {"status": "error", "error": "boom"}),
    "500 not json": lambda h: h.reply(500, raw=b"<html>oops</html>"),
    "401": lambda h: h.reply(401, {"error": {"message": "bad key", "type": "authentication_error"}}),
    "reset": reset,
    "incomplete read": lambda h: h.reply(200, raw=b'{"status":', length=100, close=True),
    "bad json": lambda h: h.reply(200, raw=b"{nope"),
    "empty body": lambda h: h.reply(200, raw=b""),
    "json list": lambda h: h.reply(200, ["a"]),
    "json string": lambda h: h.reply(200, "fine"),
    "no result": lambda h: h.reply(200, HAS_STATUS["no result"]),
    "result not text": lambda h: h.reply(200, HAS_STATUS["result not text"]),
    "status not ok": lambda h: h.reply(200, HAS_STATUS["status not ok"]),
    "not utf-8": lambda h: h.reply(200, raw=b'{"status": "ok", "result": "\xff\xfe"}'),
    "hang": hang,
    "trickle": trickle,
}
UNREACHABLE = {"reset", "hang", "trickle"}     # health() says exactly {"status": "down"} for these
# What the client must log for the failure, proving the stand-in really did what its name says.
LOGGED = {"reset": "ConnectionResetError", "incomplete read": "IncompleteRead", "hang": "TimeoutError",
          "trickle": "TimeoutError", "not utf-8": "UnicodeDecodeError", "bad json": "JSONDecodeError",
          "503 queue full": "HTTP 503: rejected - queue full", "401": "HTTP 401: bad key"}
TIMEOUT = 0.3


def use(srv, name):
    srv.answer = ANSWERS[name]


@pytest.mark.parametrize("name", list(ANSWERS))
def test_query_returns_empty_string_on_every_failure(srv, name, caplog):
    use(srv, name)
    caplog.set_level(logging.DEBUG, logger="sluice.client")
    t0 = time.monotonic()
    assert SluiceClient(srv.url, timeout=TIMEOUT).query("fast", SECRET) == ""
    assert time.monotonic() - t0 < 2.0                 # "trickle" would take 5 s if only each read were bounded
    assert len(srv.requests) == 1 and srv.requests[0][3]["prompt"] == SECRET   # it got there; the answer failed it
    assert LOGGED.get(name, "") in caplog.text and "sluice query" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("name", list(ANSWERS))
def test_chat_returns_empty_string_on_every_failure(srv, name, caplog):
    use(srv, name)
    caplog.set_level(logging.DEBUG, logger="sluice.client")
    assert SluiceClient(srv.url, timeout=TIMEOUT).chat("fast", [{"role": "user", "content": SECRET}]) == ""
    assert len(srv.requests) == 1 and SECRET not in caplog.text


@pytest.mark.parametrize("name", list(ANSWERS))
def test_health_and_queue_status_degrade_on_every_failure(srv, name):
    use(srv, name)
    c = SluiceClient(srv.url, timeout=TIMEOUT)
    h = c.health()
    if name in UNREACHABLE:
        assert h == {"status": "down"}
    elif name in HAS_STATUS:
        assert h == HAS_STATUS[name]
    else:
        assert h["status"] == "down" and isinstance(h["error"], str) and set(h) == {"status", "error"}
    qs = c.queue_status()
    if name in HAS_STATUS:
        assert qs == HAS_STATUS[name]              # a JSON object on 200 is the counters, whatever they say
    else:
        assert set(qs) == {"error"} and isinstance(qs["error"], str)
    assert [r[:2] for r in srv.requests] == [("GET", "/v1/health"), ("GET", "/v1/queue/status")]


def test_server_down_everything_degrades(refused_url):
    c = SluiceClient(refused_url)
    assert c.query("fast", "x") == "" and c.chat("fast", []) == ""
    assert c.health() == {"status": "down"}
    assert "ConnectionRefusedError" in c.queue_status()["error"]


# ---- the request that goes out ------------------------------------------------------------------------
def test_query_sends_the_seed_fields_and_omits_none(srv):
    c = SluiceClient(srv.url)
    assert c.query("reasoning", "Explain", system="sys", priority=P_CRITICAL, max_tokens=50) == "fine"
    method, path, headers, body, _ = srv.requests[-1]
    assert (method, path) == ("POST", "/v1/query")
    assert body == {"model": "reasoning", "prompt": "Explain", "system": "sys", "priority": 0, "max_tokens": 50}
    assert headers["Content-Type"] == "application/json" and "Authorization" not in headers

    assert c.query("fast", "hi") == "fine"
    assert srv.requests[-1][3] == {"model": "fast", "prompt": "hi", "priority": 2}
    assert c.query("fast", "hi", system="s", priority=P_BG, max_tokens=7, temperature=0.0, timeout=30) == "fine"
    assert srv.requests[-1][3] == {"model": "fast", "prompt": "hi", "system": "s", "priority": 4, "max_tokens": 7,
                                   "temperature": 0.0, "timeout": 30}


def test_chat_sends_body_and_priority_header(srv):
    srv.answer = lambda h: h.reply(200, {"choices": [{"message": {"role": "assistant", "content": "hey"}}]})
    msgs = [{"role": "user", "content": "x"}]
    assert SluiceClient(srv.url).chat("fast", msgs, priority=1, max_tokens=5, stream=True) == "hey"
    method, path, headers, body, _ = srv.requests[-1]
    assert (method, path) == ("POST", "/v1/chat/completions") and headers["X-Sluice-Priority"] == "1"
    assert body == {"model": "fast", "messages": msgs, "max_tokens": 5}     # no priority, no stream in the body
    assert SluiceClient(srv.url).chat("fast", msgs) == "hey" and srv.requests[-1][2]["X-Sluice-Priority"] == "2"


@pytest.mark.parametrize("answer", [{"choices": []}, {"choices": [{"message": {"content": None}}]},
                                    {"choices": [{"text": "legacy"}]}, {"object": "chat.completion"}])
def test_chat_without_text_content_is_empty(srv, answer):
    srv.answer = lambda h: h.reply(200, answer)
    assert SluiceClient(srv.url).chat("fast", []) == ""


def test_api_key_from_constructor_or_environment(srv, monkeypatch, caplog):
    monkeypatch.setenv("SLUICE_API_KEY", "env-key")
    assert SluiceClient(srv.url).query("fast", "x") == "fine"
    assert srv.requests[-1][2]["Authorization"] == "Bearer env-key"
    assert SluiceClient(srv.url, api_key="own-key").health()["status"] == "ok"
    assert srv.requests[-1][2]["Authorization"] == "Bearer own-key"
    # A key that cannot be a header value fails the call locally, and the key is not logged.
    n = len(srv.requests)
    assert SluiceClient(srv.url, api_key="sk-LEAK\r\nX-Evil: 1").query("fast", "x") == ""
    assert len(srv.requests) == n and "LEAK" not in caplog.text


@pytest.mark.parametrize("kwargs", [{"prompt": {1, 2}}, {"prompt": object()}, {"system": b"bytes"},
                                    {"temperature": float("nan")}, {"max_tokens": float("inf")},
                                    {"model": {"a": {1}}}])
def test_unserializable_arguments_fail_before_sending(srv, kwargs):
    args = {"model": "fast", "prompt": "x", **kwargs}
    assert SluiceClient(srv.url).query(**args) == ""
    loop: list = []
    loop.append(loop)
    assert SluiceClient(srv.url).chat("fast", loop) == ""
    assert srv.requests == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "http://", "http://127.0.0.1:notaport", "http://[::1",
                                 "http://127.0.0.1:99999"])
def test_bad_base_url(url):
    c = SluiceClient(url)
    assert c.query("fast", "x") == "" and c.chat("fast", []) == ""
    assert c.health()["status"] == "down" and "error" in c.queue_status()


# ---- base URL resolution ------------------------------------------------------------------------------
def test_base_url_is_resolved_from_the_environment_at_call_time(srv, monkeypatch):
    monkeypatch.delenv("SLUICE_URL", raising=False)
    monkeypatch.delenv("SLUICE_PORT", raising=False)
    assert sluice.base_url is None and sluice.url == "http://127.0.0.1:5590"
    monkeypatch.setenv("SLUICE_URL", srv.url + "/")
    assert sluice.url == srv.url and sluice.query("fast", "x") == "fine"
    monkeypatch.delenv("SLUICE_URL")
    port = srv.url.rsplit(":", 1)[1]
    monkeypatch.setenv("SLUICE_PORT", port)
    assert sluice.url == f"http://127.0.0.1:{port}" and sluice.query("fast", "x") == "fine"
    monkeypatch.setenv("SLUICE_URL", f"127.0.0.1:{port}")          # no scheme: http is assumed
    assert sluice.query("fast", "x") == "fine"
    monkeypatch.setenv("SLUICE_URL", "http://127.0.0.1:1")         # an explicit base_url wins over the env
    assert SluiceClient(srv.url + "/").query("fast", "x") == "fine"
    assert len(srv.requests) == 4


def test_path_prefix_is_kept(srv):
    assert SluiceClient(srv.url + "/llm/").query("fast", "x") == "fine"
    assert SluiceClient(srv.url + "/llm").health()["status"] == "ok"
    assert [r[1] for r in srv.requests] == ["/llm/v1/query", "/llm/v1/health"]


# ---- health: the seed's degradation table ---------------------------------------------------------------
@pytest.mark.parametrize("status,doc", [
    (200, {"status": "ok", "models_ready": 2, "queue": {"pending": 0}}),
    (200, {"status": "warming", "models_ready": 0}),
    (200, {"status": "degraded", "models_ready": 1}),
    (503, {"status": "warming", "models_ready": 0}),
    (503, {"status": "degraded", "models_ready": 1}),
])
def test_health_passes_sluices_own_status_through(srv, status, doc):
    srv.answer = lambda h: h.reply(status, doc)
    assert SluiceClient(srv.url).health() == doc


@pytest.mark.parametrize("status,doc", [(200, {"models_ready": 2}), (200, {"status": 3}), (200, ["ok"]),
                                        (503, {"status": "rejected"}), (500, {"status": "error"})])
def test_health_of_something_that_is_not_a_health_document_is_down_with_a_reason(srv, status, doc):
    srv.answer = lambda h: h.reply(status, doc)
    h = SluiceClient(srv.url).health()
    assert h["status"] == "down" and h["error"]


def test_health_is_quick_even_with_a_long_query_timeout(srv):
    use(srv, "hang")
    t0 = time.monotonic()
    assert SluiceClient(srv.url).health(timeout=TIMEOUT) == {"status": "down"}
    assert SluiceClient(srv.url, timeout=TIMEOUT).health() == {"status": "down"}
    assert time.monotonic() - t0 < 2.0
    assert client_mod.HEALTH_TIMEOUT_S <= 10


def test_queue_status_success(srv):
    counters = {"pending": 3, "active": True, "total_served": 142}
    srv.answer = lambda h: h.reply(200, counters)
    assert SluiceClient(srv.url).queue_status() == counters


# ---- it never swallows what it must not ------------------------------------------------------------------
def test_keyboard_interrupt_propagates(srv, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(http.client.HTTPConnection, "getresponse", interrupted)
    c = SluiceClient(srv.url)
    for call in (lambda: c.query("fast", "x"), lambda: c.chat("fast", []), c.health, c.queue_status):
        with pytest.raises(KeyboardInterrupt):
            call()


def test_concurrent_calls_share_nothing(srv):
    srv.answer = lambda h: h.reply(200, {"status": "ok", "result": "re: " + h.body["prompt"]})
    c = SluiceClient(srv.url, timeout=5)
    out: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, c.query("fast", f"p{i}"))) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {i: f"re: p{i}" for i in range(16)}


# ---- against real sluice ----------------------------------------------------------------------------------
def test_against_real_sluice(app, backend):
    c = SluiceClient(app.url)
    assert c.query("tiny", "hello") == "echo: hello"
    assert c.query("tiny", "hello", timeout=30) == "echo: hello"          # sluice accepts the timeout field
    assert c.health()["status"] == "ok" and c.queue_status()["total_served"] == 2
    assert c.chat("fast", [{"role": "user", "content": "hi"}], priority=P_CRITICAL)
    assert c.query("unknown-model", "x") == ""          # 400 -> ""
    assert c.query("fast", "x", priority=9) == ""       # 400 -> ""
    backend.mode = "error500"
    assert c.query("fast", "x") == ""                   # backend crashed -> ""
    assert c.health()["status"] in ("ok", "degraded")


# ---- property: whatever comes back, nothing raises ----------------------------------------------------------
class RawWire:
    """A TCP server that reads one HTTP request and answers with whatever bytes `self.payload` holds."""

    def __init__(self):
        self.payload = b""
        outer = self

        class H(socketserver.StreamRequestHandler):
            def handle(self):
                length = 0
                while (line := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.rfile.read(length)
                self.wfile.write(outer.payload)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stand_ins():
    http_srv, wire = Misbehaving(), RawWire()
    yield http_srv, wire
    http_srv.close()
    wire.close()


texts = st.one_of(st.text(), st.none(), st.integers())


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(prompt=texts, system=texts, model=texts, priority=st.one_of(st.integers(), st.none()),
       max_tokens=st.one_of(st.integers(), st.none()), raw=st.binary(max_size=64),
       status=st.sampled_from([200, 400, 500, 503]), on_the_wire=st.booleans())
def test_never_raises_whatever_comes_back(stand_ins, prompt, system, model, priority, max_tokens, raw, status,
                                          on_the_wire):
    http_srv, wire = stand_ins
    if on_the_wire:                     # random bytes instead of an HTTP response, then the connection closes
        wire.payload = raw
        url = wire.url
    else:                               # a well-formed HTTP response whose body is random bytes
        http_srv.answer = lambda h: h.reply(status, raw=raw)
        url = http_srv.url
    c = SluiceClient(url, timeout=2)
    assert isinstance(c.query(model, prompt, system=system, priority=priority, max_tokens=max_tokens), str)
    assert isinstance(c.chat(model, [{"role": "user", "content": prompt}], priority=priority), str)
    h = c.health()
    assert isinstance(h, dict) and isinstance(h["status"], str)
    assert isinstance(c.queue_status(), dict)
