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

# What a blocking socket raises when the kernel's wait runs out (EAGAIN; through TLS, SSL_ERROR_WANT_*).
_RAN_OUT = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BoundedSocket(io.RawIOBase):
    """Reads (wrap it in a BufferedReader) and whole writes on `sock`, each waiting `limit()` at most."""

    def __init__(self, sock: socket.socket):
        sock.settimeout(None)
        self.sock = sock
        self.deadline: float | None = None   # when set, reads must end by then (a client's whole request)
        self._wait: float | None = None     # what the kernel's timeouts are set to now

    def limit(self, left: float) -> None:
        """Let each following recv or send wait about `left` seconds at most (a deadline's remaining time).

        Setting the kernel's timeouts is two syscalls, and every read towards one deadline would set them
        again; a setting already within 5 % of `left` (1 s at most) is kept, so a wait ends at most that
        much off the deadline.
        """
        if left <= 0:
            raise TimeoutError("deadline passed")
        if self._wait is None or abs(self._wait - left) > min(1.0, left / 20):
            sec = int(left)
            usec = int((left - sec) * 1e6) or (0 if sec else 1)       # zero would mean: no limit at all
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
        except _RAN_OUT:
            raise TimeoutError("timed out") from None

    def write(self, data) -> int:
        """All of `data` (sendall), or TimeoutError."""
        try:
            self.sock.sendall(data)
        except _RAN_OUT:
            raise TimeoutError("timed out") from None
        return len(data)
