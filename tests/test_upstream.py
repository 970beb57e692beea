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


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


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
    a, b = tcp_pair()
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
    a, b = tcp_pair()
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


def test_a_slow_reader_does_not_restart_the_write_bound():
    a, b = tcp_pair()
    with a, b:
        stop = threading.Event()

        def trickle():                                   # 64 KiB every 70 ms: every send makes some progress
            while not stop.wait(0.07):
                try:
                    b.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
        reader = threading.Thread(target=trickle, daemon=True)
        reader.start()
        io = BoundedSocket(a)
        io.limit(0.3)
        try:
            with pytest.raises(TimeoutError):
                io.write(b"x" * (8 << 20))              # would take seconds at this pace
        finally:
            stop.set()
            reader.join(5)
        sec, usec = struct.unpack("ll", a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))
        assert sec + usec / 1e6 == pytest.approx(0.3, abs=0.005)   # the next write gets the whole bound again


def test_a_body_that_never_follows_its_head_ends_at_the_read_deadline():
    be = RawBackend([HEAD, BODY])                        # the head alone; the body only after go (never)
    try:
        ex = Upstream("b", be.url).open("POST", "/chat/completions", b"{}", time.monotonic() + 30)
        t0 = time.monotonic()
        with pytest.raises(errors.QueueTimeout):
            ex.read(time.monotonic() + 0.2)
        assert time.monotonic() - t0 < 10                # not the 30 s bound set when the request went out
    finally:
        be.close()


@pytest.fixture
def tls_pair(tmp_path):
    """A connected TLS socket pair (a self-signed certificate made with the openssl tool)."""
    import shutil
    import ssl
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl tool")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    a, b = socket.socketpair()
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(server=server_ctx.wrap_socket(b, server_side=True)))
    t.start()
    client = client_ctx.wrap_socket(a, server_hostname="localhost")
    t.join(10)
    yield client, done["server"]
    client.close()
    done["server"].close()


def test_tls_reads_and_writes_end_at_their_bound(tls_pair):
    client, _server = tls_pair
    io = BoundedSocket(client)
    io.limit(0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        io.readinto(bytearray(10))                       # nothing comes
    with pytest.raises(TimeoutError):
        io.write(b"x" * (64 << 20))                      # nobody reads
    assert time.monotonic() - t0 < 10


def test_a_connection_whose_client_left_before_the_forward_is_closed_not_leaked():
    """The client left between grant and forward: on_open (the scheduler's attach) raises Cancelled. The
    connection just made must be closed at once, not left open until garbage collection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]
    up = Upstream("b", f"http://127.0.0.1:{port}/v1")

    def left(ex):
        raise errors.Cancelled("client disconnected")

    with pytest.raises(errors.Cancelled) as raised:         # `raised` keeps the frames (and any leak) alive
        up.open("POST", "/chat/completions", b"{}", time.monotonic() + 5, on_open=left)
    server_side, _ = listener.accept()
    server_side.settimeout(2)
    try:
        assert server_side.recv(1) == b"", "the upstream connection was left open"
    finally:
        server_side.close()
        listener.close()
    assert raised.value.status == 499
