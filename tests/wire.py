"""Raw-socket HTTP/1.1 exchanges read back with h11, a strict client-side parser: framing, not just
status codes, is checked (one response per request, Content-Length or chunked exact, close when said)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import h11


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    informational: list[int] = field(default_factory=list)


@dataclass
class Exchange:
    answers: list[Answer]
    closed: bool           # the server closed the connection after the last answer read


def exchange(port: int, data: bytes, methods: list[str], *, timeout: float = 10.0, host: str = "127.0.0.1",
             then: bytes = b"", half_close: bool = False) -> Exchange:
    """Send `data` (then `then`), read one response per entry of `methods` (the method of each request
    sent, which decides whether a body follows: HEAD). Stops early if the server closes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        if then:
            s.sendall(then)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return read_answers(s, methods)


def read_answers(s: socket.socket, methods: list[str]) -> Exchange:
    conn = h11.Connection(h11.CLIENT)
    answers: list[Answer] = []
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        current: Answer | None = None
        informational: list[int] = []
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                conn.receive_data(chunk)
                continue
            if isinstance(ev, h11.InformationalResponse):
                informational.append(ev.status_code)
            elif isinstance(ev, h11.Response):
                current = Answer(ev.status_code, {k.decode().lower(): v.decode("latin-1") for k, v in ev.headers},
                                 informational=informational)
            elif isinstance(ev, h11.Data):
                current.body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                answers.append(current)
                break
            elif isinstance(ev, h11.ConnectionClosed):
                return Exchange(answers, True)
        if conn.their_state is h11.MUST_CLOSE:
            return Exchange(answers, _closed(s))
        conn.start_next_cycle()
    return Exchange(answers, False)


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def request(method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            host: str = "127.0.0.1") -> bytes:
    """One well-formed request's bytes (Content-Length set when a body is given)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


SENTINEL_ID = "sentinel-1"
SENTINEL = request("GET", "/v1/health", headers={"X-Request-Id": SENTINEL_ID})


def in_sync(ex: Exchange, n_before: int) -> bool:
    """After `n_before` answers, the pipelined SENTINEL's answer came next, or the server closed."""
    if len(ex.answers) == n_before:
        return ex.closed
    return len(ex.answers) == n_before + 1 and ex.answers[n_before].headers.get("x-request-id") == SENTINEL_ID
