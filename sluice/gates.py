"""Gate: one unit of hardware exclusion (a GPU or a server) with `slots` requests allowed through at once.

A Gate is plain state; the Scheduler's lock guards every field (grants must see queues and slots
atomically). An exclusive gate has one resident model at a time and moves between models in phases:

    serving --(policy picks another model)--> draining --(in-flight reaches 0)--> switching
    switching --(old asleep, new awake)--> serving        switching --(wake failed)--> idle (no resident)
    switching --(old neither asleep nor gone)--> serving the old model (aborted; nothing was woken)

Only the dispatcher starts a switch; only the switch thread ends one (one writer per transition). An
operator's load/sleep/unload is a `SwitchOrder`: while one is pending it overrides the policy, and the gate
grants nothing until the order's switch has run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class SwitchOrder:
    """An operator's "make `target` resident" (target set) or "take `evict` off the GPU" (target None):
    `how` the old model goes down ("sleep" or "stop"). The switch thread sets `result` or `error`, then
    `done`."""
    target: str | None
    evict: str | None = None
    how: str = "sleep"
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: Exception | None = None


class Gate:
    def __init__(self, config):
        self.config = config
        self.name = config.name
        self.slots = config.slots
        self.mode = config.mode
        self.exclusive = config.mode == "exclusive"
        self.inflight = 0
        self.resident: str | None = None      # exclusive gates: the model whose backend is awake
        self.resident_since = 0.0
        self.served_since_switch = 0
        self.switching = False                # a switch thread owns the gate
        self.drain_target: str | None = None  # the model a drain is making room for
        self.drain_started: float | None = None
        self.switches = 0
        self.switch_failures = 0
        self.last_switch: dict | None = None
        self.order: SwitchOrder | None = None  # an operator's switch, waiting for its turn

    @property
    def state(self) -> str:
        if self.switching:
            return "switching"
        if self.drain_target is not None or self.order is not None:
            return "draining"
        return "serving" if self.inflight else "idle"

    def has_slot(self) -> bool:
        return self.inflight < self.slots and not self.switching

    def view(self) -> dict:
        return {"name": self.name, "mode": self.mode, "slots": self.slots, "inflight": self.inflight,
                "state": self.state, "resident": self.resident, "policy": self.config.policy,
                "switches": self.switches, "switch_failures": self.switch_failures,
                "last_switch": self.last_switch}
