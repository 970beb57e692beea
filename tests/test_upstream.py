"""The hand-rolled backend client: response framing, and how it bounds its waits."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from sluice import errors
from sluice.sockets import BoundedSocket
from sluice.upstream import Upstream


class RawBackend:
    """A real TCP server on 127.0.0.1 that answers each request with the byte pieces it is given,
    waiting for `go` before each piece after the first (a body that arrives after its head)."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.go = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            for i, piece in enumerate(self.pieces):
                if i:
                    assert self.go.wait(10)
                conn.sendall(piece)

    def close(self) -> None:
        self.go.set()
        self.sock.close()
        self.thread.join(5)


BODY = b'{"choices":[],"usage":{"prompt_tokens":1}}'
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)


def test_a_body_that_arrives_after_its_head_is_read_whole():
    be = RawBackend([HEAD, BODY[:10], BODY[10:]])
    try:
        ex = Upstream("b", be.url).open("POST", "/chat/completions", b"{}", time.monotonic() + 10)
        assert ex.status == 200
        threading.Timer(0.05, be.go.set).start()       # the rest comes while read() waits for it
        assert ex.read(time.monotonic() + 10) == BODY
        ex.close()
    finally:
        be.close()


def test_a_body_cut_short_is_a_502_naming_the_missing_bytes():
    be = RawBackend([HEAD + BODY[:10]])                 # then the server closes the connection
    try:
        ex = Upstream("b", be.url).open("POST", "/chat/completions", b"{}", time.monotonic() + 10)
        with pytest.raises(errors.BadGateway, match=f"{len(BODY) - 10} body bytes missing"):
            ex.read(time.monotonic() + 10)
    finally:
        be.close()


def test_a_body_that_never_comes_ends_at_the_deadline():
    be = RawBackend([HEAD + BODY[:10], BODY[10:]])      # the rest only after go, which the test never sets
    try:
        ex = Upstream("b", be.url).open("POST", "/chat/completions", b"{}", time.monotonic() + 10)
        with pytest.raises(errors.QueueTimeout):
            ex.read(time.monotonic() + 0.2)
    finally:
        be.close()


def test_a_wait_bound_close_enough_to_the_asked_one_is_kept():
    a, b = socket.socketpair()
    with a, b:
        io = BoundedSocket(a)
        assert a.gettimeout() is None                   # blocking: no poll before each recv and send

        def kernel_wait() -> float:
            sec, usec = struct.unpack("ll", a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
            assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16) == struct.pack("ll", sec, usec)
            return sec + usec / 1e6

        io.limit(30.0)
        assert kernel_wait() == 30.0
        io.limit(29.5)                                  # within 1 s: no syscall, a wait may end 0.5 s off
        assert kernel_wait() == 30.0
        io.limit(28.0)                                  # further off: set
        assert kernel_wait() == 28.0
        io.limit(0.5)                                   # short bounds keep 5 %: 0.025 s here
        io.limit(0.49)
        assert kernel_wait() == 0.5
        io.limit(0.4)
        assert kernel_wait() == 0.4
        io.limit(1e-9)                                  # never 0, which would mean no bound at all
        assert 0 < kernel_wait() < 0.02                 # (the kernel counts in scheduler ticks)
        with pytest.raises(TimeoutError):
            io.limit(0.0)


def test_a_read_or_write_that_waits_too_long_is_a_timeout():
    a, b = socket.socketpair()
    with a, b:
        io = BoundedSocket(a)
        io.limit(0.05)
        with pytest.raises(TimeoutError):
            io.readinto(bytearray(10))                  # nothing comes
        with pytest.raises(TimeoutError):
            io.write(b"x" * (64 << 20))                 # nobody reads: the buffers fill
        io.deadline = time.monotonic() - 1
        with pytest.raises(TimeoutError):
            io.readinto(bytearray(10))                  # a deadline already past
