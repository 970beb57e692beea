"""Limits that keep sluice responsive: slow clients, connection floods, SIGTERM drain."""

from __future__ import annotations

import socket
import time

from conftest import call, until


def test_slowloris_client_is_dropped_and_others_are_served(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_CLIENT_TIMEOUT_S": 0.5})
    s = socket.create_connection(("127.0.0.1", app.port))
    s.settimeout(5)
    start = time.monotonic()
    closed_at = None
    head = b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 100
    for i, byte in enumerate(head):         # one byte every 50 ms: each recv is quick, the request never ends
        try:
            s.sendall(bytes([byte]))
            if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                closed_at = time.monotonic()
                break
        except BlockingIOError:
            pass
        except OSError:
            closed_at = time.monotonic()
            break
        if i == 3:
            assert call(app, "GET", "/v1/health")[0] == 200     # everyone else is still served
        time.sleep(0.05)                                          # the slow client's pace, not a wait
    assert closed_at is not None, "the trickling client was never dropped"
    assert closed_at - start < 2.0
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x"})[0] == 200


def test_connection_cap_answers_503_at_once_when_nothing_is_idle(make_app, backend):
    """At the cap, with every connection in the middle of a request (none idle to shed), a new one is
    answered 503 at once."""
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_MAX_CONNECTIONS": 2})
    until(lambda: app.server.connections.count == 0, timeout=10, what="the readiness checks' connections to end")
    busy = [socket.create_connection(("127.0.0.1", app.port)) for _ in range(2)]
    for c in busy:
        c.sendall(b"GET /v1/health HTTP/1.1\r\n")          # a request line, the head still to come
    until(lambda: app.server.connections.count == 2 and app.server.connections.idle_count == 0, timeout=10,
          what="two busy connections")
    s = socket.create_connection(("127.0.0.1", app.port))
    s.settimeout(2)
    data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 503") and b"too many connections" in data and b"Retry-After: 1" in data
    for c in busy:
        c.close()
    until(lambda: app.server.connections.count == 0, timeout=5, what="the connections to end")
    assert call(app, "GET", "/v1/health")[0] == 200


def test_expect_100_continue_is_answered(app):
    s = socket.create_connection(("127.0.0.1", app.port))
    s.settimeout(5)
    body = b'{"model": "fast", "prompt": "big"}'
    s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body))
    assert s.recv(64).startswith(b"HTTP/1.1 100 Continue")
    s.sendall(body)
    data = b""
    while b'"result"' not in data:
        data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 200") and b"echo: big" in data
    s.close()
