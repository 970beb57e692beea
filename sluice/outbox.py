"""A ManagedBackend's outbox (sluice/supervisor.py): what it decides under its lock but must not do there.

Its transitions queue state changes and exited pids here while holding `_cond` (appends only, under this
outbox's own leaf lock); `flush()`, called with no lock of the backend held, forgets the pids in the registry
(an fsync'ed write) and delivers the changes to on_change, in order. See docs/design.md "Lock order".
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from sluice.backend_rules import State
from sluice.processes import Registry

log = logging.getLogger("sluice.supervisor")


class Outbox:
    def __init__(self, name: str, registry: Registry | None,
                 on_change: Callable[[str, State, State], None] | None):
        self.name = name
        self._registry = registry
        self._on_change = on_change
        self._lock = threading.Lock()          # a leaf: guards the two queues; nothing is taken under it
        self._deliver = threading.RLock()      # serializes deliveries; re-entrant: on_change may call back in
        self._changes: deque[tuple[State, State]] = deque()
        self._gone: list[int] = []

    def changed(self, old: State, new: State) -> None:
        if self._on_change is not None:
            with self._lock:
                self._changes.append((old, new))

    def gone(self, pid: int) -> None:
        if self._registry is not None:
            with self._lock:
                self._gone.append(pid)

    def flush(self) -> None:
        with self._lock:
            gone, self._gone = self._gone, []
        for pid in gone:
            self._registry.forget(self.name, pid)
        if self._on_change is None:
            return
        with self._deliver:
            while True:
                with self._lock:
                    if not self._changes:
                        return
                    old, new = self._changes.popleft()
                try:
                    self._on_change(self.name, old, new)
                except Exception:
                    log.exception("on_change callback for backend %s failed", self.name)


__all__ = ["Outbox"]
