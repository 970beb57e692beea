"""The dispatcher: the one thread that grants what a request thread could not grant inline on submit.

Like the Switcher (switching.py) it shares the Scheduler's lock: `work` is the scheduler's Condition on that
lock, notified whenever a grant might have become possible. `pass_locked` runs with the lock held (on the
dispatcher thread, or from Scheduler.dispatch_once); queued jobs stay the scheduler's, reached through the
Queues and granted only through the `grant(job, backend, now)` it is given.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sluice.gates import Backend, Pool
from sluice.queues import Job, Queues
from sluice.switching import Switcher

log = logging.getLogger("sluice.scheduler")


class Dispatcher:
    """Each pass: every exclusive gate's switch decision (the Switcher), the JIT servers' drain reservations,
    then the best waiting job on every gate with a free slot, round after round until none takes one more."""

    def __init__(self, work: threading.Condition, queued: Queues, pool: Pool, switching: Switcher, *,
                 grant: Callable[[Job, Backend, float], None], clock: Callable[[], float]):
        self._work = work
        self._queued, self._pool, self._switching = queued, pool, switching
        self._grant = grant
        self._clock = clock
        self._fault: str | None = None     # the last pass that raised, until one passes again
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sluice-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify_all()
        if self._thread:
            self._thread.join(timeout=5)

    def problem(self) -> str | None:
        """Why grants may not be made (the thread died, or its last pass raised); None when fine."""
        t = self._thread
        if t is not None and not t.is_alive() and not self._stopping:
            return "the dispatcher thread is not running; queued requests are not granted (see the log)"
        return self._fault

    def pass_locked(self) -> float | None:
        """Grant what can be granted; returns when a time-based decision is next due (or None)."""
        now = self._clock()
        due: list[float] = []
        for gate in self._pool.gates.values():
            when = self._switching.dispatch_locked(gate, now) if gate.exclusive else None
            if when is not None:
                due.append(when)
        # Shared gates (and the resident model of exclusive ones): best job among the models that a free
        # backend can take. A job blocked on one gate never blocks another gate, nor a model at its
        # max_concurrency the other models of its gate (no head-of-line blocking).
        self._pool.reserve_jit(lambda models: self._queued.best(models, now))
        progress = True
        while progress and self._queued.depth:
            progress = False
            for gate in self._pool.gates.values():
                if not gate.has_slot():
                    continue
                job = self._queued.best(self._pool.runnable(gate), now)
                if job is not None:
                    self._grant(job, self._pool.candidates(job.model, gate)[0], now)
                    progress = True
        return min(due, default=None)

    def _loop(self) -> None:
        with self._work:
            while not self._stopping:
                try:
                    due = self.pass_locked()
                    timeout = None if due is None else max(0.0, due - self._clock())
                    self._fault = None
                except Exception as e:
                    # One bad pass must not end every grant: log it, say so in health, look again soon.
                    log.exception("dispatcher: a dispatch pass failed; retrying in 1s")
                    self._fault = f"a dispatch pass failed: {e!r}"
                    timeout = 1.0
                self._work.wait(timeout)
