"""Switching exclusive gates: the policy's decision, the drain, and sleep -> wake on a switch thread.

The Switcher shares the Scheduler's lock, as CPython's queue.py shares one mutex among its Conditions:
`work` is the scheduler's Condition on that lock, notified when a switch hands its gate back. Every
`*_locked` method is called with that lock held (by the dispatcher's pass or by the scheduler's
set_models); the switch thread takes it only to hand the gate back, and calls the backends (`act`)
without it. Queued and in-flight jobs stay the scheduler's: the Switcher reaches them only through the
callbacks it is given (`waiting`, `fail_waiting`, `abort`, `finished`).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from sluice import errors
from sluice.gates import Backend, Gate, SwitchOrder
from sluice.policies import GateView, SwitchCosts, Waiting, next_deadline

log = logging.getLogger("sluice.scheduler")


class Switcher:
    """Decides and runs the switches of exclusive gates.

    `act(backend, action)` puts a backend to sleep, stops or wakes it ("sleep" / "stop" / "wake"), raising
    on failure; `on_switch(gate, phases)` hears of each switch; `decide` is the policy (policies.decide).
    From the scheduler: `waiting(models, now)` the runnable queued jobs of those models as the policy sees
    them, `fail_waiting(model, err)` answers every queued job of a model with `err` and returns them,
    `abort(gate, err)` cuts the gate's jobs in flight short, `finished(jobs)` tells the observers (no lock),
    `woken(backend)` records a woken backend READY (through the Pool, health's one writer).
    """

    def __init__(self, work: threading.Condition, gates: Iterable[Gate], *, clock: Callable[[], float],
                 act: Callable[[str, str], None], on_switch: Callable[[str, dict], None] | None,
                 decide: Callable[[str, GateView, SwitchCosts], str | None],
                 waiting: Callable[[set[str], float], tuple[Waiting, ...]],
                 fail_waiting: Callable[[str, errors.SluiceError], list],
                 abort: Callable[[Gate, errors.SluiceError], None], finished: Callable[[list], None],
                 woken: Callable[[Backend], object] = lambda b: None):
        self._work = work
        self._gates = {g.name: g for g in gates}
        self._clock = clock
        self._act = act
        self._on_switch = on_switch
        self._decide = decide
        self._waiting, self._fail_waiting, self._abort, self._finished = waiting, fail_waiting, abort, finished
        self._woken = woken          # a woken backend is READY: recorded by its one writer (Pool.set_health)
        # what each gate has measured; read and written only under the lock
        self.costs = {g.name: SwitchCosts(seed_s=g.config.switch_cost_s) for g in self._gates.values()}
        self._stale: set[str] = set()     # gates whose running switch the model table overtook

    # ---- readers ---------------------------------------------------------------------------------------
    def switch_cost(self, gate: str, frm: str | None, to: str) -> float:
        """The gate's current estimate of a switch's seconds (measured EMA, else the configured guess)."""
        with self._work:
            return self.costs[gate].get(frm, to)

    def service_cost(self, gate: str, model: str) -> float:
        """The gate's estimate of one job's service seconds for `model` (measured EMA, else seeded)."""
        with self._work:
            return self.costs[gate].service(model)

    # ---- under the scheduler's lock ---------------------------------------------------------------
    def dispatch_locked(self, gate: Gate, now: float) -> float | None:
        """Decide whether an exclusive gate keeps serving its resident model or switches (drain first).
        Returns when to look again, or None."""
        if gate.switching:
            return None
        if gate.order is not None:
            return self._run_order_locked(gate, now)
        costs = self.costs[gate.name]
        waiting = self._waiting(gate.models(), now)
        view = GateView(now=now, resident=gate.resident, inflight=gate.inflight,
                        resident_since=gate.resident_since, served_since_switch=gate.served_since_switch,
                        waiting=waiting, max_wait_s=gate.config.max_wait_s, min_active_s=gate.config.min_active_s)
        target = self._decide(gate.config.policy, view, costs) if waiting else None
        if target is None or target == gate.resident:
            gate.drain_target = gate.drain_started = None   # nothing to switch to (a cancel can end a drain)
            return next_deadline(view, costs) if waiting else None
        if gate.drain_target != target:
            gate.drain_target, gate.drain_started = target, now
        if gate.inflight:
            deadline = gate.drain_started + gate.config.drain_timeout_s
            if now < deadline:
                return min(deadline, next_deadline(view, costs) or deadline)
            self._abort(gate, errors.Unavailable(
                f"cancelled after {gate.config.drain_timeout_s:g}s: gate {gate.name!r} must switch to model "
                f"{target!r} (drain_timeout_s); retry", retry_after=1))
            return None
        self._start_locked(gate, target, now)
        return None

    def unsettle_locked(self, b: Backend, new: frozenset[str]) -> None:
        """`b` is about to serve `new`. On an exclusive gate, if that changes which backends serve the
        resident model, the backend awake for it may no longer be the one that serves it (or a sleeping one
        now claims it): forget the resident, so the next grant goes through a full switch that drains, puts
        every other backend to sleep and wakes the right one."""
        gate = b.gate
        if not gate.exclusive:
            return
        if gate.switching:
            self._stale.add(gate.name)     # the switch thread forgets it when it hands the gate back
        elif gate.resident is not None and (gate.resident in b.models) != (gate.resident in new):
            gate.resident = None

    # ---- an operator's switch ---------------------------------------------------------------------
    def order(self, gate: str, target: str | None, evict: str | None, how: str, timeout: float) -> dict:
        """See Scheduler.switch_now."""
        with self._work:
            g = self._gates[gate]
            if not g.exclusive:
                raise ValueError(f"gate {gate!r} is not exclusive")
            if g.switching or g.order is not None:
                raise errors.Conflict(f"a model switch is running on gate {gate!r}; retry when it ends")
            if target is not None and target == g.resident and g.drain_target is None:
                return {"from": target, "to": target, "result": "ok", "resident": target}
            order = g.order = SwitchOrder(target, evict, how)
            self._work.notify()
        if not order.done.wait(timeout):
            raise errors.Unavailable(f"the switch on gate {gate!r} is still running after {timeout:g}s; "
                                     "see /admin/status", retry_after=5)
        if order.error is not None:
            raise order.error
        return order.result

    def _run_order_locked(self, gate: Gate, now: float) -> float | None:
        """An operator's order overrides the policy: drain the resident if the order takes it down, then
        switch. Returns when to look again (the drain timeout), or None."""
        order = gate.order
        if order.target is not None or order.evict == gate.resident:
            if gate.inflight:
                if gate.drain_started is None:
                    gate.drain_started = now
                deadline = gate.drain_started + gate.config.drain_timeout_s
                if now < deadline:
                    return deadline
                self._abort(gate, errors.Unavailable(
                    f"cancelled after {gate.config.drain_timeout_s:g}s: an operator took model {gate.resident!r} "
                    f"off gate {gate.name!r} (drain_timeout_s); retry", retry_after=1))
                return None
        self._start_locked(gate, order.target, now, order)
        return None

    # ---- the switch -------------------------------------------------------------------------------
    def _start_locked(self, gate: Gate, target: str | None, now: float, order: SwitchOrder | None = None) -> None:
        old = gate.resident
        gate.switching = True
        gate.order = None                 # it travels with the switch thread now
        drain_s = now - gate.drain_started if gate.drain_started is not None else 0.0
        gate.drain_target = gate.drain_started = None
        if target is not None:
            sleepers = [b for b in gate.backends if target not in b.models and (old is None or old in b.models)]
            wakers = [b for b in gate.backends if target in b.models]
        else:                             # evict: its backends go down, unless one also serves the resident
            sleepers = [b for b in gate.backends if order.evict in b.models
                        and (old is None or old == order.evict or old not in b.models)]
            wakers = []
        how = order.how if order is not None else "sleep"
        threading.Thread(target=self._switch, args=(gate, old, target, sleepers, wakers, drain_s, how, order),
                         name=f"sluice-switch-{gate.name}", daemon=True).start()

    def _take_down(self, gate: Gate, sleepers: list[Backend], how: str, down: list[Backend]) -> str | None:
        """Put every sleeper to sleep (or stop it), adding each to `down`; None once each is verified asleep
        or gone, else why not. A failed sleep falls back to "stop", which for a server sluice does not run
        means: seen asleep (`/is_sleeping`) or gone. Anything else leaves it possibly awake, so the switch must
        not wake another."""
        for b in sleepers:
            try:
                self._act(b.name, how)
                down.append(b)
                continue
            except Exception as e:
                if how != "sleep":
                    return f"{how} {b.name} failed: {e}"
                log.warning("gate %s: sleeping %s failed (%s); stopping it instead", gate.name, b.name, e)
                first = e
            try:
                self._act(b.name, "stop")
                down.append(b)
            except Exception as e2:
                return f"putting {b.name} to sleep failed ({first}) and it is neither stopped nor seen asleep ({e2})"
        return None

    def _back_up(self, gate: Gate, down: list[Backend]) -> bool:
        """An aborted switch: the old model stays resident, so the sleepers already put down (they serve it)
        are woken again. False if one would not come back: then no resident is trusted."""
        ok = True
        for b in down:
            try:
                self._act(b.name, "wake")
            except Exception as e:
                log.error("gate %s: waking %s again after the aborted switch failed: %s", gate.name, b.name, e)
                ok = False
        return ok

    def _switch(self, gate: Gate, old: str | None, target: str | None, sleepers: list[Backend],
                wakers: list[Backend], drain_s: float, how: str, order: SwitchOrder | None) -> None:
        """Runs off the dispatcher: take the old model down, bring the new one up, then hand the gate back.
        Whatever happens here (a bug included), the gate is handed back and waiting jobs are answered."""
        t0 = t1 = t2 = self._clock()
        phases = {"from": old, "to": target, "drain_s": round(drain_s, 3)}
        failure = aborted = None
        down: list[Backend] = []
        restored = True
        try:
            aborted = self._take_down(gate, sleepers, how, down)
            if aborted and down:
                restored = self._back_up(gate, down)
            t1 = self._clock()
            if aborted is None:
                for b in wakers:
                    try:
                        self._act(b.name, "wake")
                    except Exception as e:
                        failure = f"waking {b.name} failed: {e}"
                        break
            t2 = self._clock()
        except Exception as e:        # a bug in the switch itself: fail safe (the old model may be awake)
            log.exception("gate %s: switch %s -> %s crashed", gate.name, old, target)
            aborted = f"the switch crashed: {e!r}"
            restored = not down
        result = "aborted" if aborted else "failed" if failure else "ok"
        phases.update(sleep_s=round(t1 - t0, 3), wake_s=round(t2 - t1, 3), result=result)
        failed: list = []
        try:
            with self._work:
                failed = self._hand_back_locked(gate, old, target, wakers, order, phases, failure, aborted,
                                                t0, t2, restored)
            if aborted:
                log.error("gate %s: switch %s -> %s aborted, %s stays loaded: %s", gate.name, old, target, old,
                          aborted)
            elif failure:
                log.error("gate %s: switch %s -> %s failed: %s", gate.name, old, target, failure)
            else:
                log.info("gate %s: switched %s -> %s (drain %.2fs, sleep %.2fs, wake %.2fs)", gate.name, old,
                         target, drain_s, t1 - t0, t2 - t1)
            if self._on_switch is not None:
                try:
                    self._on_switch(gate.name, phases)
                except Exception:
                    log.exception("gate %s: on_switch callback failed", gate.name)
        finally:
            self._finished(failed)
            if order is not None:
                if order.result is None and order.error is None:
                    order.error = errors.Unavailable("the switch ended without a result; see the log")
                order.done.set()

    def _hand_back_locked(self, gate: Gate, old, target, wakers: list[Backend], order, phases, failure, aborted,
                          t0: float, t2: float, restored: bool = True) -> list:
        """End the switch: record its result, settle the resident, answer the target's waiting jobs if it
        did not come up. Returns those jobs (their observers are told outside the lock)."""
        gate.switching = False
        gate.last_switch = phases
        stale = gate.name in self._stale
        self._stale.discard(gate.name)
        err = None
        if aborted:
            # Nothing of the target was woken: the old model stays resident, unless one of its backends would
            # not come back or the model table changed under the switch (then the next switch starts from no
            # resident, putting every other backend to sleep). The target's waiting jobs are answered now.
            if stale or not restored:
                gate.resident = None
            gate.switch_failures += 1
            err = errors.Unavailable(f"model {target or order.evict!r} was not switched: {aborted}; "
                                     f"{old!r} stays loaded; retry later", retry_after=5)
        elif failure is None:
            if target is not None:
                gate.resident, gate.resident_since, gate.served_since_switch = target, t2, 0
                gate.switches += 1
                for b in wakers:
                    self._woken(b)
                self.costs[gate.name].observe(old, target, t2 - t0)
            elif order is not None and old == order.evict:
                gate.resident = None
            if stale:      # the model table changed under the switch: the next grant switches afresh
                gate.resident = None
        else:
            # The target did not come up (some of its backends may have): no resident, so the next switch
            # puts every backend but its target's to sleep first. Fail its waiting jobs fast.
            gate.resident = None
            gate.switch_failures += 1
            err = errors.Unavailable(f"model {target!r} could not be loaded ({failure}); retry later",
                                     retry_after=5)
        failed = self._fail_waiting(target, err) if err is not None and target is not None else []
        if order is not None:
            order.result, order.error = dict(phases, resident=gate.resident), err
        self._work.notify()
        return failed
