"""The open client connections: a cap on all of them and on each client address, and who gives way.

A connection is *idle* while it waits for the first byte of a request (a new one, or a kept-alive one
between requests), and *busy* from a complete request line until its answer is written. At the cap, the
connection idle the longest is shed (its read side shut down: the thread waiting on it sees EOF and
ends, as on a keep-alive timeout) before a new one is refused, so a flood of idle connections cannot lock
other clients out. A client address past `per_client` gives way the same, among its own connections.

When the server stops (`shed_idle`), every idle connection is shed the same way, and each busy one as soon as
its answer is written: nothing is kept alive past a stop, as nothing is past a process exit.

Loopback peers are exempt from the per-client cap: every local program shares 127.0.0.1, so a cap per
address there would be a cap on everyone; the shedding rule is what protects a new local client.
"""

from __future__ import annotations

import ipaddress
import socket
import threading


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _shut_read(sock: socket.socket) -> None:
    """Shed a connection: its handler's read sees EOF and the thread ends, as on a keep-alive timeout."""
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


class Connections:
    def __init__(self, max_total: int, per_client: int):
        self.max_total = max_total
        self.per_client = per_client
        self._lock = threading.Lock()
        self._idle: dict[socket.socket, str] = {}     # insertion order: the longest idle first
        self._addr: dict[socket.socket, str] = {}
        self._per_addr: dict[str, int] = {}
        self.shed_total = 0
        self._stopping = False        # shed_idle() was called: no connection is kept alive any more

    @property
    def count(self) -> int:
        return len(self._addr)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def admit(self, sock: socket.socket, addr: str) -> bool:
        """Count a new connection in, shedding an idle one if a cap is reached; False: refuse it."""
        victim = None
        with self._lock:
            capped = not _loopback(addr) and self._per_addr.get(addr, 0) >= self.per_client
            if capped:
                victim = next((s for s, a in self._idle.items() if a == addr), None)
            elif len(self._addr) >= self.max_total:
                victim = next(iter(self._idle), None)
            if (capped or len(self._addr) >= self.max_total) and victim is None:
                return False
            if victim is not None:
                self._forget(victim)
                self.shed_total += 1
            self._addr[sock] = addr
            self._per_addr[addr] = self._per_addr.get(addr, 0) + 1
            self._idle[sock] = addr
        if victim is not None:
            _shut_read(victim)
        return True

    def idle(self, sock: socket.socket) -> None:
        """The connection waits for its next request: it may be shed (at once, once the server stops)."""
        with self._lock:
            addr = self._addr.get(sock)
            if addr is None:
                return
            if not self._stopping:
                self._idle[sock] = addr
                return
            self._forget(sock)
        _shut_read(sock)

    def shed_idle(self) -> int:
        """The server stopped accepting: end every idle connection now (its thread sees EOF), and every busy
        one when its answer is written. Returns how many were idle."""
        with self._lock:
            self._stopping = True
            idle = list(self._idle)
            for sock in idle:
                self._forget(sock)
        for sock in idle:
            _shut_read(sock)
        return len(idle)

    def busy(self, sock: socket.socket) -> bool:
        """A request has arrived: not to be shed until it is answered. False if it was shed already."""
        with self._lock:
            self._idle.pop(sock, None)
            return sock in self._addr

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            self._forget(sock)

    def _forget(self, sock: socket.socket) -> None:
        self._idle.pop(sock, None)
        addr = self._addr.pop(sock, None)
        if addr is not None:
            n = self._per_addr[addr] - 1
            if n:
                self._per_addr[addr] = n
            else:
                del self._per_addr[addr]
