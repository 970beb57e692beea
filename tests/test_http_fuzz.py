"""A byte-level fuzzer of the framing layer: valid requests mutated (split points, duplicated and folded
headers, odd whitespace, bad chunk sizes, wrong lengths, pipelining), seeded. Every connection gets at most
one answer per request line it carried, each answer strictly framed (h11), no 500; afterwards no thread is
left behind, memory is bounded and the queue's counters add up."""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import threading

import h11
import pytest

from conftest import call, until
from test_api_native import totals_add_up

CASES = int(os.environ.get("SLUICE_HTTP_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("SLUICE_HTTP_FUZZ_SEED", "1913"))

_QUERY = json.dumps({"model": "fast", "prompt": "fuzz"}).encode()
_CHAT = json.dumps({"model": "fast", "messages": [{"role": "user", "content": "fuzz"}]}).encode()


def _req(method: str, path: str, body: bytes | None = None, extra: list[bytes] = (), chunked: bool = False) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method.encode(), path.encode()), b"Host: 127.0.0.1", *extra]
    if body is not None and chunked:
        lines.append(b"Transfer-Encoding: chunked")
        half = len(body) // 2
        body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
    elif body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


BASES = [
    _req("GET", "/v1/health"),
    _req("GET", "/v1/queue/status", extra=[b"Accept: */*"]),
    _req("POST", "/v1/query", _QUERY, [b"Content-Type: application/json"]),
    _req("POST", "/v1/chat/completions", _CHAT, [b"X-Sluice-Priority: 1"]),
    _req("POST", "/v1/query", _QUERY, chunked=True),
    _req("GET", "/v1/models/fast"),
    _req("POST", "/v1/nope", b'{"x": 1}'),
    _req("GET", "/v1/health", b"smuggled"),
]


# Mutations that change where a request ends: the bytes may then frame as several requests (each takes at
# least one line). The others leave one request, answered at most once.
REFRAMING = {1, 3, 4, 6, 7, 8}


def _mutate(rng: random.Random, data: bytes, kind: int) -> bytes:
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if kind == 0 and len(lines) > 1:                     # a header line twice
        lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(lines[1:]))
    elif kind == 1 and len(lines) > 1:                   # obsolete line folding
        i = rng.randrange(1, len(lines))
        lines[i] = lines[i].replace(b": ", b":\r\n ", 1)
    elif kind == 2 and len(lines) > 1:                   # odd whitespace around the colon or the line
        i = rng.randrange(1, len(lines))
        lines[i] = lines[i].replace(b":", rng.choice([b" :", b"\t:", b":\t", b":  "]), 1) + rng.choice([b"", b" ", b"\t"])
    elif kind == 3:                                      # a wrong Content-Length
        n = rng.choice([0, 1, 5, 10_000, 2 ** 64, -1])
        lines = [x for x in lines if not x.lower().startswith(b"content-length")] + [b"Content-Length: %d" % n]
    elif kind == 4:                                      # bad chunk sizes
        lines.append(b"Transfer-Encoding: chunked")
        lines = [x for x in lines if not x.lower().startswith(b"content-length")]
        body = rng.choice([b"zz\r\nab\r\n0\r\n\r\n", b"ffffffffffffffffff\r\n", b"2\r\nabcd\r\n0\r\n\r\n",
                           b"1;" + b"e" * 1100 + b"\r\na\r\n0\r\n\r\n", b"0\r\nX: y\r\n", b"\r\n"])
    elif kind == 5:                                      # the request line mangled
        lines[0] = rng.choice([lines[0].replace(b" ", b"  ", 1), lines[0].replace(b"HTTP/1.1", b"HTTP/2.0"),
                               lines[0].replace(b"HTTP/1.1", b"HTTP/1.0"), lines[0] + b" extra",
                               lines[0].replace(b"/", b"http://127.0.0.1/", 1), b"\x16\x03\x01" + lines[0]])
    elif kind == 6:                                      # bare CR / LF / NUL somewhere in the head
        i = rng.randrange(len(lines))
        at = rng.randrange(len(lines[i]) + 1)
        lines[i] = lines[i][:at] + rng.choice([b"\r", b"\n", b"\0", b"\x7f"]) + lines[i][at:]
    elif kind == 7:                                      # a byte flipped anywhere
        raw = bytearray(data)
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    elif kind == 8:                                      # truncated
        return data[:rng.randrange(len(data))]
    elif kind == 9:                                      # Connection / Expect / Host games
        lines.append(rng.choice([b"Connection: close", b"Expect: 100-continue", b"Host: evil.example",
                                 b"Origin: https://evil.example", b"Connection: keep-alive, close"]))
    elif kind == 10:                                     # a huge header
        lines.append(b"X-Big: " + b"a" * rng.choice([100, 40_000]))
    # kind 11: unchanged
    return b"\r\n".join(lines) + sep + body


def _case(rng: random.Random) -> tuple[bytes, list[int], int]:
    """Bytes to send (one to three requests, pipelined), the split points to send them at, and the most
    answers they may get."""
    pieces, most = [], 0
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind = rng.randrange(12) if rng.random() < 0.8 else 11
        pieces.append(_mutate(rng, rng.choice(BASES), kind))
        most += pieces[-1].count(b"\n") + 1 if kind in REFRAMING else 1
    data = b"".join(pieces)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(3)))
    return data, cuts, most


def _answers(s: socket.socket) -> tuple[list[int], str | None]:
    """Statuses read until the server closes; the framing error h11 found, if any. A close between two
    answers is the end; a close inside one is a framing error."""
    conn = h11.Connection(h11.CLIENT)
    statuses: list[int] = []
    try:
        while True:
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
            got = False                           # any byte of this answer yet
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    try:
                        data = s.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    if not data and not got:
                        return statuses, None
                    got = True
                    conn.receive_data(data)
                elif isinstance(ev, h11.Response):
                    statuses.append(ev.status_code)
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    return statuses, None
            if conn.their_state is h11.MUST_CLOSE:
                return statuses, None if s.recv(1) == b"" else "bytes after a Connection: close answer"
            conn.start_next_cycle()
    except h11.RemoteProtocolError as e:
        return statuses, f"bad framing from sluice: {e}"


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    from conftest import base_env
    from fakes import FakeBackend
    from sluice import config
    from sluice.app import App
    backend = FakeBackend()
    env = base_env(tmp_path_factory.mktemp("httpfuzz"), SLUICE_FAST_URL=backend.url, SLUICE_REASONING_URL=backend.url,
                   SLUICE_MAX_BODY_BYTES=4096, SLUICE_CLIENT_TIMEOUT_S=5)
    app = App(config.load(environ=env), environ=env).start()
    app.health.probe_all()
    yield app
    app.stop(timeout=2)
    backend.close()


def test_framing_fuzz(fuzz_app):
    rng = random.Random(SEED)
    threads_before = threading.active_count()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    problems = []
    for i in range(CASES):
        data, cuts, most = _case(rng)
        with socket.create_connection(("127.0.0.1", fuzz_app.port), timeout=10) as s:
            try:
                for a, b in zip([0, *cuts], [*cuts, len(data)]):
                    s.sendall(data[a:b])
                s.shutdown(socket.SHUT_WR)        # all sent: sluice reads to the end instead of waiting
            except OSError:
                pass                              # sluice answered and closed while we sent: allowed
            statuses, error = _answers(s)
        if error or len(statuses) > most or any(x >= 500 and x not in (501, 505) for x in statuses):
            problems.append((i, data[:200], statuses, error))
            if len(problems) > 5:
                break
    assert not problems, problems
    until(lambda: fuzz_app.server.connections.count == 0, timeout=20, what="every connection to end")
    until(lambda: threading.active_count() <= threads_before + 40, timeout=20, what="threads back to baseline")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000      # KiB
    totals_add_up(fuzz_app)
    assert call(fuzz_app, "POST", "/v1/query", {"model": "fast", "prompt": "after"})[2]["result"] == "echo: after"
