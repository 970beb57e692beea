"""The degrade-safe client: every row of the seed's degradation table, against real sluice and against
real stand-in servers that misbehave on purpose. It never raises."""

from __future__ import annotations

import json
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice import P_CRITICAL, SluiceClient, sluice


class Misbehaving:
    """A server whose every answer is `self.answer(handler)`; records requests."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        self.answer = lambda h: h.reply(200, {"status": "ok", "result": "fine"})
        self.unblock = threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def reply(self, status, obj=None, raw=None, length=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(length if length is not None else len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else {}
                outer.requests.append((self.path, dict(self.headers), body))
                outer.answer(self)

            do_GET = do_POST = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.unblock.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def srv():
    s = Misbehaving()
    yield s
    s.close()


def reset(h):
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.close_connection = True


def hang(srv):
    return lambda h: srv.unblock.wait(10)


ANSWERS = {
    "503 queue full": lambda h: h.reply(503, {"status": "rejected", "error": "queue full"}),
    "504 timeout": lambda h: h.reply(504, {"status": "timeout", "error": "waited"}),
    "500": lambda h: h.reply(500, {"status": "error"}),
    "reset": reset,
    "incomplete read": lambda h: (h.reply(200, raw=b'{"status": "ok"', length=100),
                                  setattr(h, "close_connection", True)),
    "bad json": lambda h: h.reply(200, raw=b"{nope"),
    "json list": lambda h: h.reply(200, ["a"]),
    "no result": lambda h: h.reply(200, {"status": "ok"}),
    "result not text": lambda h: h.reply(200, {"status": "ok", "result": 5}),
    "not utf-8": lambda h: h.reply(200, raw=b'{"result": "\xff\xfe"}'),
}


@pytest.mark.parametrize("name", list(ANSWERS))
def test_query_returns_empty_string_on_every_failure(srv, name):
    srv.answer = ANSWERS[name]
    assert SluiceClient(srv.url, timeout=2).query("fast", "x") == ""


def test_query_success_sends_the_seed_fields_and_omits_none(srv):
    c = SluiceClient(srv.url)
    assert c.query("reasoning", "Explain", system="sys", priority=P_CRITICAL, max_tokens=50) == "fine"
    path, headers, body = srv.requests[-1]
    assert path == "/v1/query" and body == {"model": "reasoning", "prompt": "Explain", "system": "sys",
                                            "priority": 0, "max_tokens": 50}


def test_timeout_and_down_and_bad_url_return_defaults(srv):
    srv.answer = hang(srv)
    assert SluiceClient(srv.url, timeout=0.3).query("fast", "x") == ""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    down = SluiceClient(f"http://127.0.0.1:{port}")
    assert down.query("fast", "x") == "" and down.health() == {"status": "down", "error": down.health()["error"]}
    assert "error" in down.queue_status()
    assert SluiceClient("not a url").query("fast", "x") == ""
    assert SluiceClient(srv.url).query("fast", {1, 2}) == ""          # unserializable argument


@pytest.mark.parametrize("doc", [{"status": "warming", "models_ready": 0}, {"status": "degraded"},
                                 {"status": "ok", "models_ready": 2}])
def test_health_passes_sluices_own_status_through(srv, doc):
    srv.answer = lambda h: h.reply(503 if doc["status"] != "ok" else 200, doc)
    assert SluiceClient(srv.url).health() == doc


def test_health_of_nonsense_is_down(srv):
    srv.answer = lambda h: h.reply(200, ["x"])
    assert SluiceClient(srv.url).health()["status"] == "down"


def test_chat_sends_priority_header(srv):
    srv.answer = lambda h: h.reply(200, {"choices": [{"message": {"content": "hey"}}]})
    assert SluiceClient(srv.url).chat("fast", [{"role": "user", "content": "x"}], priority=1, max_tokens=5) == "hey"
    path, headers, body = srv.requests[-1]
    assert path == "/v1/chat/completions" and headers["X-Sluice-Priority"] == "1" and body["max_tokens"] == 5
    srv.answer = ANSWERS["reset"]
    assert SluiceClient(srv.url).chat("fast", []) == ""


def test_base_url_from_the_environment_at_call_time(srv, monkeypatch):
    monkeypatch.setenv("SLUICE_URL", srv.url + "/")
    assert sluice.query("fast", "x") == "fine"
    monkeypatch.delenv("SLUICE_URL")
    monkeypatch.setenv("SLUICE_PORT", srv.url.rsplit(":", 1)[1])
    assert sluice.query("fast", "x") == "fine"


def test_against_real_sluice(app, backend, monkeypatch):
    c = SluiceClient(app.url)
    assert c.query("tiny", "hello") == "echo: hello"
    assert c.health()["status"] == "ok" and c.queue_status()["total_served"] == 1
    assert c.query("unknown-model", "x") == ""          # 400 -> ""
    backend.mode = "error500"
    assert c.query("fast", "x") == ""                   # backend crashed -> ""


@pytest.fixture(scope="module")
def shared_srv():
    s = Misbehaving()
    yield s
    s.close()


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(prompt=st.one_of(st.text(), st.none(), st.integers()), raw=st.binary(max_size=64),
       status=st.sampled_from([200, 400, 500, 503]))
def test_never_raises_whatever_comes_back(shared_srv, prompt, raw, status):
    shared_srv.answer = lambda h: h.reply(status, raw=raw)
    c = SluiceClient(shared_srv.url, timeout=2)
    assert isinstance(c.query("fast", prompt), str)
    assert isinstance(c.health(), dict) and isinstance(c.queue_status(), dict)
