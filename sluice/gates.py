"""Gate: one unit of hardware exclusion (a GPU or a server) with `slots` requests allowed through at once,
the backends behind it, and the `Pool` of them all with each model's max_concurrency: who can take a job.

Gates, Backends and the Pool are plain state; the Scheduler's lock guards every field (grants must see queues and
slots atomically). An exclusive gate has one resident model at a time and moves between models in phases:

    serving --(policy picks another model)--> draining --(in-flight reaches 0)--> switching
    switching --(old asleep, new awake)--> serving        switching --(wake failed)--> idle (no resident)
    switching --(old neither asleep nor gone)--> serving the old model (aborted; nothing was woken)

Only the dispatcher starts a switch; only the switch thread ends one (one writer per transition; both are
in sluice/switching.py). An
operator's load/sleep/unload is a `SwitchOrder`: while one is pending it overrides the policy, and the gate
grants nothing until the order's switch has run.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping

from sluice import errors


class Health(str, enum.Enum):
    PENDING = "pending"   # not probed yet
    READY = "ready"
    DOWN = "down"         # its probe failed (on an exclusive gate that may just mean asleep: not trusted)
    FAILED = "failed"     # a managed backend out of restarts: down everywhere until an operator loads it


@dataclass(frozen=True)
class BackendSpec:
    """What the scheduler needs to know of a backend: where it sits and what it serves."""
    name: str
    gate: str
    models: frozenset[str]
    slots: int | None = None      # None: as many as the gate allows
    jit_swap: bool = False        # loads models on demand (LM Studio JIT): never mix models in flight


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
        self.backends: list[Backend] = []      # the backends behind it (fixed; their models may change)

    def models(self) -> set[str]:
        """Every model some backend behind this gate serves."""
        return {m for b in self.backends for m in b.models}

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


@dataclass(eq=False)
class Backend:
    """A backend's place behind its gate: its slots, health, and what it last served."""
    spec: BackendSpec
    gate: Gate
    slots: int
    inflight: int = 0
    health: Health = Health.PENDING
    current: str | None = None    # the model it last served (affinity; JIT drain guard while inflight)
    reserved: bool = False        # JIT: draining so a better-placed job for another model can load
    held: bool = False            # an operator's sleep/unload is running on it (Scheduler.holding): no grants
    why: str | None = None        # what made it FAILED

    @property
    def out(self) -> bool:
        """It cannot take work now. A failed probe on an exclusive gate does not count: a sleeping backend
        fails its probe, and waking it is the switch's job."""
        return self.health is Health.FAILED or (self.health is Health.DOWN and not self.gate.exclusive)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def models(self) -> frozenset[str]:
        return self.spec.models

    def can_take(self, model: str) -> bool:
        if self.held or self.inflight >= self.slots or not self.gate.has_slot():
            return False
        if self.gate.exclusive:
            # Only the resident model's backend is awake; a failed probe of a sleeping one means nothing.
            if self.gate.resident != model or self.gate.drain_target is not None or self.gate.order is not None:
                return False
        elif self.health is not Health.READY:
            return False
        # Drain guard: a server that swaps models on demand must finish model A before it sees model B,
        # and takes no more A while a B that is ahead in the queue waits for it to drain.
        return not (self.spec.jit_swap and self.inflight and (self.current != model or self.reserved))


class Pool:
    """Every gate and backend, and each model's max_concurrency (requests of it in flight at once across its
    backends): where a job of a model may go now, and the slot accounting of grants."""

    def __init__(self, gates, specs: Iterable[BackendSpec]):
        self.gates = {c.name: Gate(c) for c in gates}
        self.backends = {s.name: Backend(s, self.gates[s.gate], s.slots or self.gates[s.gate].slots) for s in specs}
        for b in self.backends.values():
            b.gate.backends.append(b)
        self.limits: dict[str, int] = {}      # model -> its max_concurrency; replaced whole
        self._running: dict[str, int] = {}    # model -> its jobs in flight on a backend

    def models(self) -> Iterator[str]:
        """Every model some backend serves (a model served by several backends comes more than once)."""
        return (m for b in self.backends.values() for m in b.models)

    def set_models(self, serving: Mapping[str, Iterable[str]], limits: Mapping[str, int] | None,
                   unsettle: Callable[[Backend, frozenset[str]], None]) -> None:
        """`serving`: backend name -> every model it serves from now on (backends not named keep theirs; the
        set of backends itself is fixed); `unsettle(backend, models)` is told before a backend's models
        change. `limits`, when given, replaces each model's max_concurrency (a model not named has none):
        a model at its limit is passed over and other models' jobs go ahead; lowering one cancels nothing.
        Raises ValueError, before changing anything, for a backend that does not exist."""
        unknown = set(serving) - set(self.backends)
        if unknown:
            raise ValueError(f"no backend named {', '.join(sorted(unknown))}")
        for name, models in serving.items():
            b = self.backends[name]
            new = frozenset(models)
            if new != b.spec.models:
                unsettle(b, new)
                b.spec = replace(b.spec, models=new)
        if limits is not None:
            self.limits = dict(limits)

    def set_health(self, backend: str, health: Health, why: str | None) -> Backend | None:
        """Record a probe result (`why`: what made it FAILED); returns the backend when its health changed."""
        b = self.backends.get(backend)
        if b is None or b.health is health:
            return None
        b.health, b.why = health, why
        return b

    def take(self, b: Backend, model: str) -> None:
        """A job of `model` was granted on `b`."""
        b.inflight += 1
        b.gate.inflight += 1
        b.gate.served_since_switch += 1
        b.current = model
        self._running[model] = self._running.get(model, 0) + 1

    def give_back(self, b: Backend, model: str) -> None:
        b.inflight -= 1
        b.gate.inflight -= 1
        self._running[model] -= 1

    def at_limit(self, model: str) -> bool:
        limit = self.limits.get(model)
        return limit is not None and self._running.get(model, 0) >= limit

    def up_elsewhere(self, model: str, backend: str) -> bool:
        """Whether a backend other than `backend` serves `model` and is not out."""
        return any(b.name != backend and model in b.models and not b.out for b in self.backends.values())

    def candidates(self, model: str, gate: Gate | None = None) -> list[Backend]:
        """Backends (on `gate`, if given) that can take `model` now: the one that already has it loaded
        first (affinity), then the least loaded. None while `model` is at its max_concurrency."""
        if self.at_limit(model):
            return []
        free = [b for b in (self.backends.values() if gate is None else gate.backends)
                if model in b.models and b.can_take(model)]
        if len(free) < 2:
            return free
        return sorted(free, key=lambda b: (b.current != model, b.inflight / b.slots))

    def runnable(self, gate: Gate) -> set[str]:
        """The models a backend behind `gate` can take a job of now."""
        return {m for b in gate.backends for m in b.models if b.can_take(m) and not self.at_limit(m)}

    def reserve_jit(self, best: Callable[[list[str]], object]) -> None:
        """A swapping server whose best waiting job (`best(models)`) is for another model drains: it takes
        nothing more."""
        for b in self.backends.values():
            if b.spec.jit_swap:
                job = best([m for m in b.models if not self.at_limit(m)]) if b.inflight else None
                b.reserved = job is not None and job.model != b.current

    def unservable(self, model: str, unserved: str | None = None) -> errors.SluiceError | None:
        """Why no backend can take `model` now (none serves it: `unserved` says why, all failed, all down);
        None while one can."""
        backends = []
        for b in self.backends.values():
            if model in b.models:
                if not b.out:
                    return None                  # the usual answer, found without building the rest
                backends.append(b)
        if not backends:
            why = f"model {model!r} {unserved}" if unserved else \
                f"no backend serves model {model!r} right now (none is configured for it or lists it at /v1/models)"
            return errors.Unavailable(f"{why}; retry later", retry_after=5)
        if all(b.health is Health.FAILED for b in backends):
            why = "; ".join(f"{b.name}: {b.why}" if b.why else b.name for b in backends)
            return errors.Unavailable(f"model {model!r} cannot be served: its backend failed and is not restarted "
                                      f"on its own ({why}); see /admin/status, then POST /admin/models/{model}/load "
                                      "to try again", retry_after=30)
        return errors.Unavailable(
            f"no backend for model {model!r} is up ({', '.join(b.name for b in backends)} down); "
            "start the inference server or check its URL, and retry when it is back", retry_after=5)

    def view(self) -> dict:
        return {b.name: {"health": b.health.value, "inflight": b.inflight, "slots": b.slots, "gate": b.gate.name,
                         "current": b.current, "models": sorted(b.models), "out": b.out}
                for b in self.backends.values()}
