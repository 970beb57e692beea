"""The thread that notices clients closing their sockets while their request waits or streams.

A half-close is a close. A client that shuts down its sending side after its request reads as EOF here,
exactly like one that has gone, and nothing tells the two apart until a write fails, which for a queued
request may be minutes later. sluice does what nginx (499) and Go's net/http (a cancelled context) do:
the job is cancelled, so no GPU time goes to an answer nobody may read. An answer ready within the
watcher's grace (about 0.1 s) still goes out. Every HTTP client library keeps its write side open.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("sluice.server")


class DisconnectWatcher:
    """One thread that notices clients closing their sockets while their request waits or streams.

    A readable socket whose MSG_PEEK returns b"" has been closed by the client: the registered callback
    runs (it cancels the queued job or aborts the upstream exchange). Nothing is ever consumed.

    Most requests are answered in a few milliseconds, and a client that leaves during those loses
    nothing worth cancelling. So a socket is only noted when its request starts (no syscall) and put in
    the selector once it has been waiting `grace_s`; a closed client is noticed within about
    2 x grace_s. The loop ticks every grace_s while anything is watched and sleeps when idle.
    """

    IDLE_AFTER_S = 2.0      # with nothing watched this long, stop ticking (the next watch wakes the loop)

    def __init__(self, grace_s: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.grace_s = grace_s
        self._clock = clock
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._pending: dict[socket.socket, tuple[Callable[[], None], float]] = {}
        self._registered: set[socket.socket] = set()
        self._dropped: list[socket.socket] = []     # registered sockets to unregister (by the loop's thread)
        self._asleep = False
        self._last_busy = clock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sluice-disconnects", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, on_close: Callable[[], None]) -> "_Watch":
        return _Watch(self, sock, on_close)

    def _add(self, sock, cb) -> None:
        with self._lock:
            self._pending[sock] = (cb, self._clock())
            wake, self._asleep = self._asleep, False
        if wake:
            self._wake_w.send(b"x")

    def _remove(self, sock) -> None:
        """The request is done with its socket (a request thread). Only the loop's thread touches the
        selector, so a registered socket is handed to it to unregister; its events are ignored from now."""
        with self._lock:
            if self._pending.pop(sock, None) is not None or sock not in self._registered:
                return
            self._registered.discard(sock)
            self._dropped.append(sock)
        self._wake_w.send(b"x")

    def close(self) -> None:
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=2)
        self._wake_w.close()

    def _promote(self) -> float | None:
        """Put sockets watched for grace_s into the selector; the select timeout to use next."""
        now = self._clock()
        with self._lock:
            for sock in self._dropped:
                self._unregister(sock)
            self._dropped.clear()
            for sock, (cb, since) in list(self._pending.items()):
                if now - since >= self.grace_s:
                    del self._pending[sock]
                    try:
                        self._sel.register(sock, selectors.EVENT_READ, cb)
                        self._registered.add(sock)
                    except (KeyError, ValueError, OSError):
                        pass                 # closed already: its request is about to find out itself
            if self._pending or self._registered:
                self._last_busy = now
                return self.grace_s
            if now - self._last_busy < self.IDLE_AFTER_S:
                return self.grace_s
            self._asleep = True
            return None

    def _unregister(self, sock) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass                     # closed meanwhile: the kernel dropped it from the selector itself

    def _loop(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select(timeout=self._promote()):
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                sock = key.fileobj
                try:
                    closed = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    continue
                except OSError:
                    closed = True
                # Data (a pipelined request) cannot tell us anything more: stop watching either way.
                with self._lock:
                    live = sock in self._registered      # not handed back by its request meanwhile
                    self._registered.discard(sock)
                    self._unregister(sock)
                if closed and live:
                    try:
                        key.data()
                    except Exception:
                        log.exception("disconnect callback failed")
        self._sel.close()
        self._wake_r.close()


class _Watch:
    def __init__(self, watcher: DisconnectWatcher, sock, on_close):
        self._w, self._sock, self._cb = watcher, sock, on_close

    def __enter__(self):
        self._w._add(self._sock, self._cb)
        return self

    def __exit__(self, *exc):
        self._w._remove(self._sock)
