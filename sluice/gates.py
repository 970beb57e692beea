"""Gate: one unit of hardware exclusion (a GPU or a server) with `slots` requests allowed through at once.

A Gate is plain state; the Scheduler's lock guards it (grants must see queues and slots atomically).
"""

from __future__ import annotations


class Gate:
    def __init__(self, config):
        self.config = config
        self.name = config.name
        self.slots = config.slots
        self.mode = config.mode
        self.inflight = 0
        self.resident: str | None = None
        self.switches = 0
        self.last_switch: dict | None = None

    @property
    def state(self) -> str:
        return "serving" if self.inflight else "idle"

    def view(self) -> dict:
        return {"name": self.name, "mode": self.mode, "slots": self.slots, "inflight": self.inflight,
                "state": self.state, "resident": self.resident, "switches": self.switches,
                "last_switch": self.last_switch}
