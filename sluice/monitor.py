"""All the backends sluice runs: `Supervisor` owns their `ManagedBackend`s (sluice/supervisor.py, the
state machine of one), the on-disk registry of their processes, and the one `sluice-supervisor` monitor
thread that ticks each backend's `check()`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from sluice.backend_rules import State
from sluice.processes import ProcessSpec, Registry, cleanup_orphans
from sluice.supervisor import ManagedBackend

log = logging.getLogger("sluice.supervisor")


class Supervisor:
    """Owns the ManagedBackends, the registry file and one monitor thread.

    start(): clean up orphans of a crashed sluice, start eager backends, start the monitor.
    stop():  stop the monitor (at once: it waits on an Event), then every backend in parallel."""

    def __init__(self, specs: Sequence[ProcessSpec], state_dir: Path | str, clock: Callable[[], float] = time.monotonic,
                 *, on_change: Callable[[str, State, State], None] | None = None, tick_s: float | None = None,
                 is_busy: Callable[[str], bool] | None = None):
        self.state_dir = Path(state_dir)
        self.registry = Registry(self.state_dir)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate backend names: {names}")
        self._backends: dict[str, ManagedBackend] = {}
        for s in specs:
            busy = (lambda n=s.name: is_busy(n)) if is_busy is not None else None
            self._backends[s.name] = ManagedBackend(s, clock=clock, registry=self.registry, on_change=on_change,
                                                    is_busy=busy)
        intervals = [s.probe_interval_s for s in specs] or [1.0]
        self.tick_s = tick_s if tick_s is not None else max(0.05, min(0.25, min(intervals) / 2))
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self.orphans_stopped: list[dict] = []

    def start(self) -> "Supervisor":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.orphans_stopped = cleanup_orphans(self.state_dir)
        self.registry.write()
        for b in self._backends.values():
            if b.spec.start == "eager":
                b.start()
        self._monitor = threading.Thread(target=self._loop, name="sluice-supervisor", daemon=True)
        self._monitor.start()
        return self

    def _loop(self) -> None:
        while not self._stopping.wait(self.tick_s):
            for b in list(self._backends.values()):
                if self._stopping.is_set():
                    return
                try:
                    b.check()
                except Exception:
                    log.exception("monitor check of backend %s failed", b.name)

    def stop(self) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=max([b.spec.probe_timeout_s for b in self._backends.values()] or [1]) + 1)
        threads = [threading.Thread(target=b.close, name=f"sluice-{b.name}-close", daemon=True)
                   for b in self._backends.values()]
        for t in threads:
            t.start()
        for t, b in zip(threads, self._backends.values()):
            t.join(b.spec.stop_timeout_s + 15)
        self.registry.close()

    def __enter__(self) -> "Supervisor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def get(self, name: str) -> ManagedBackend:
        try:
            return self._backends[name]
        except KeyError:
            raise KeyError(f"no managed backend {name!r}; known: {', '.join(self._backends) or 'none'}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._backends

    def snapshot(self) -> list[dict]:
        return [b.info() for b in self._backends.values()]


__all__ = ["Supervisor"]
