"""A connection's byte stream with every wait bounded by the kernel, not by Python's socket timeouts.

A Python socket with a timeout polls before each recv and send (two syscalls where one would do) and
settimeout is a syscall of its own. Here the socket stays in blocking mode and the kernel bounds each
wait (SO_RCVTIMEO, SO_SNDTIMEO); a wait that runs out raises TimeoutError as a Python timeout would.
Both sides of sluice use it: client connections (server.py) and backend connections (upstream.py).
"""

from __future__ import annotations

import io
import socket
import ssl
import struct
import time


class BoundedSocket(io.RawIOBase):
    """Reads (wrap it in a BufferedReader) and whole writes on `sock`, each waiting `limit()` at most.

    A TLS socket keeps Python's timeouts: through TLS a blocking socket whose kernel timeout runs out is
    simply read again, so the kernel cannot bound it.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None   # when set, reads must end by then (a client's whole request)
        self._wait: float | None = None     # the bound set now, in seconds
        self._tls = isinstance(sock, ssl.SSLSocket)
        if not self._tls:
            sock.settimeout(None)

    def limit(self, left: float) -> None:
        """Let each following recv, and each whole write, wait about `left` seconds at most.

        Setting the bound costs syscalls, and every read towards one deadline would set it again; a bound
        already within 5 % of `left` (1 s at most) is kept, so a wait ends at most that much off.
        """
        if left <= 0:
            raise TimeoutError("deadline passed")
        if self._wait is None or abs(self._wait - left) > min(1.0, left / 20):
            if self._tls:
                self.sock.settimeout(left)
            else:
                sec = int(left)
                usec = int((left - sec) * 1e6) or (0 if sec else 1)       # zero would mean: no bound at all
                timeval = struct.pack("ll", sec, usec)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self._wait = left

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.deadline is not None:
            self.limit(self.deadline - time.monotonic())
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:              # the kernel's bound ran out (EAGAIN)
            raise TimeoutError("timed out") from None

    def write(self, data) -> int:
        """All of `data`, or TimeoutError. The bound is for the whole write: a reader that takes a little
        at a time does not restart it, as it would for each send."""
        view, start = memoryview(data), time.monotonic()
        try:
            sent = self.sock.send(view)
            if sent < len(view):
                self._send_rest(view[sent:], start)
        except BlockingIOError:
            raise TimeoutError("timed out") from None
        return len(view)

    def _send_rest(self, view: memoryview, start: float) -> None:
        bound = self._wait
        if bound is None:
            self.sock.sendall(view)
            return
        end = start + bound
        try:
            while view:
                self.limit(end - time.monotonic())
                view = view[self.sock.send(view):]
        finally:
            self.limit(bound)                # the next write gets the whole bound again
