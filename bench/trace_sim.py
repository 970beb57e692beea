#!/usr/bin/env python3
"""Scheduling quality on one exclusive gate: the real Scheduler and policies, an injected clock, no sleeping.

A discrete-event loop feeds arrivals to `Scheduler.submit`, finishes jobs after their service time, and
holds each model switch (run by the scheduler's own switch thread) for its switch cost in simulated time.

    python bench/trace_sim.py            # prints one markdown table per trace

Traces: llama-swap #612's `A B A A C A B C` repeated with Poisson arrivals (steady, and in bursts as agents
send them); interactive P0 + a P4 flood; three models with unequal switch costs; then the steady #612
trace at rising load.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sluice.config import GateConfig  # noqa: E402
from sluice.scheduler import BackendSpec, Health, Job, JobState, Outcome, Scheduler  # noqa: E402


class Sim:
    """The real Scheduler on one exclusive gate. A switch runs on the scheduler's own switch thread while
    the loop waits for it; the switcher charges the switch cost to the simulated clock. Jobs arriving
    during a switch are submitted when it ends (their waits still count from their true arrival)."""

    def __init__(self, policy: str, models: list[str], service: dict, switch_cost: dict, max_wait_s: float,
                 seed_cost: float):
        self.t = 0.0
        self.cost = switch_cost
        self.service = service
        self.resident = None
        self.switches = 0
        self.switching_s = 0.0
        self.switch_done = threading.Event()
        gate = GateConfig("gpu", slots=1, mode="exclusive", policy=policy, max_wait_s=max_wait_s,
                          switch_cost_s=seed_cost, drain_timeout_s=1e9)
        specs = [BackendSpec(m, "gpu", frozenset({m})) for m in models]
        self.s = Scheduler([gate], specs, max_queue_depth=10 ** 6, aging_s=1e9, clock=lambda: self.t,
                           switcher=self._switcher, on_switch=lambda g, p: self.switch_done.set())
        for m in models:
            self.s.set_health(m, Health.READY)

    def _switcher(self, backend: str, action: str) -> None:
        if action == "wake":                      # the whole switch's cost is charged at the wake
            cost = self.cost.get((self.resident, backend), self.cost.get("default", 5.0))
            self.t += cost
            self.switching_s += cost
            self.resident = backend
            self.switches += 1

    def _dispatch(self) -> float | None:
        while True:
            with self.s._lock:
                due = self.s._dispatch_locked()
                switching = self.s._gates["gpu"].switching
            if not switching:
                return due
            self.switch_done.wait(10)
            self.switch_done.clear()

    def run(self, arrivals: list[tuple[float, str, int]]) -> dict:
        arrivals = sorted(arrivals)
        jobs: list[tuple[Job, float]] = []
        running: dict[Job, float] = {}
        busy = held = 0.0
        i = 0
        due = None
        while True:
            times = [x for x in (arrivals[i][0] if i < len(arrivals) else None,
                                 min(running.values()) if running else None) if x is not None]
            if not times and due is not None and self.s.snapshot()["pending"]:
                times = [due]
            if not times:
                break
            now = max(self.t, min(times))
            if not running and self.s.snapshot()["pending"]:
                held += now - self.t              # the GPU idle while jobs wait: a policy holding it
            self.t = now
            for job, end in list(running.items()):
                if end <= self.t:
                    del running[job]
                    self.s.finish(job, Outcome.OK)
            while i < len(arrivals) and arrivals[i][0] <= self.t:
                at, model, prio = arrivals[i]
                job = Job(model, prio, timeout_s=1e9)
                self.s.submit(job)
                jobs.append((job, at))
                i += 1
            due = self._dispatch()
            for job, _ in jobs:
                if job.state is JobState.GRANTED and job not in running and job.finished_at is None:
                    running[job] = self.t + self.service[job.model]
                    busy += self.service[job.model]
        waits = [j.granted_at - at for j, at in jobs]
        p0 = sorted(j.granted_at - at for j, at in jobs if j.priority == 0)
        done = [j.finished_at - at for j, at in jobs]
        # GPU serving fraction: of the time the GPU had work, the share spent serving rather than switching
        # or held idle while jobs waited.
        return {"jobs": len(jobs), "switches": self.switches,
                "serving": busy / (busy + self.switching_s + held),
                "p0_p50": statistics.median(p0) if p0 else float("nan"),
                "p0_p99": p0[min(len(p0) - 1, int(len(p0) * 0.99))] if p0 else float("nan"),
                "max_wait": max(waits), "mean_completion": statistics.mean(done)}


def poisson(rng, rate, n, start=0.0):
    t = start
    for _ in range(n):
        t += rng.expovariate(rate)
        yield t


def trace_612(rng):
    pattern = "ABAACABC" * 25
    return [(t, m, 2) for t, m in zip(poisson(rng, 1 / 2.0, len(pattern)), pattern)]


def trace_612_loaded(rng):
    """The same pattern at 90 % load: a GPU with a queue, which is when switching policy matters."""
    pattern = "ABAACABC" * 50
    return [(t, m, 2) for t, m in zip(poisson(rng, 1 / 1.1, len(pattern)), pattern)]


def trace_612_bursts(rng):
    """#612 as its users hit it: agents fire requests in bursts, so the queue holds interleaved models
    (llama-swap swapped on each: "ABCABC results in 5 swaps"). 16 bursts of the pattern twice (16 requests,
    ~12/s) with Poisson gaps of 20 s on average: ~80 % load, a backlog at every burst."""
    out, t = [], 0.0
    for _ in range(16):
        t += rng.expovariate(1 / 20.0)
        out += [(at, m, 2) for at, m in zip(poisson(rng, 12.0, 16, start=t), "ABAACABC" * 2)]
    return out


def trace_p0_flood(rng):
    flood = [(t, "B", 4) for t in poisson(rng, 1 / 1.5, 200)]
    interactive = [(t, "A", 0) for t in poisson(rng, 1 / 8.0, 25)]
    return flood + interactive


def trace_three(rng):
    return [(t, rng.choice("ABC"), rng.choice([1, 2, 2, 3])) for t in poisson(rng, 1 / 2.0, 200)]


TRACES = [
    ("llama-swap #612 pattern (service 1 s, switch 8 s)", trace_612, {"A": 1.0, "B": 1.0, "C": 1.0},
     {"default": 8.0}),
    ("llama-swap #612 pattern at 90 % load (service 1 s, switch 1 s)", trace_612_loaded,
     {"A": 1.0, "B": 1.0, "C": 1.0}, {"default": 1.0}),
    ("llama-swap #612 pattern in bursts (service 1 s, switch 1 s)", trace_612_bursts,
     {"A": 1.0, "B": 1.0, "C": 1.0}, {"default": 1.0}),
    ("P0 interactive + P4 flood (service 0.8 s, switch 6 s)", trace_p0_flood, {"A": 0.8, "B": 0.8},
     {"default": 6.0}),
    ("three models, unequal switch costs", trace_three, {"A": 1.0, "B": 0.7, "C": 1.5},
     {(None, "A"): 2, (None, "B"): 2, (None, "C"): 2, ("A", "B"): 3.0, ("B", "A"): 3.0, ("A", "C"): 12.0,
      ("C", "A"): 12.0, ("B", "C"): 12.0, ("C", "B"): 12.0, "default": 8.0}),
]
MAX_WAIT = 60.0


def sweep() -> None:
    """The steady #612 trace at rising load: where the GPU-serving share comes from."""
    print("\n### llama-swap #612 pattern, steady Poisson arrivals, 2000 jobs, by load (service 1 s, switch 1 s)\n")
    print("| load | fifo switches | fifo serving | cost-aware switches | cost-aware serving | cost-aware max wait s |")
    print("|---|---|---|---|---|---|")
    service = {"A": 1.0, "B": 1.0, "C": 1.0}
    for load in (0.5, 0.8, 0.9, 1.0, 1.2):
        row = []
        for policy in ("fifo", "cost-aware"):
            rng = random.Random(612)
            arrivals = [(t, m, 2) for t, m in zip(poisson(rng, load, 2000), "ABAACABC" * 250)]
            sim = Sim(policy, sorted(service), service, {"default": 1.0}, MAX_WAIT, seed_cost=1.0)
            row.append(sim.run(arrivals))
            sim.s.stop()
        f, c = row
        print(f"| {load:.0%} | {f['switches']} | {f['serving']:.0%} | {c['switches']} | {c['serving']:.0%} | "
              f"{c['max_wait']:.1f} |")


def main() -> int:
    for title, make, service, cost in TRACES:
        print(f"\n### {title}  (max_wait_s {MAX_WAIT:g})\n")
        bound = MAX_WAIT + max(service.values()) + max(cost.values())
        print(f"max wait bound = max_wait_s + the drain of one job + one switch = {bound:g} s\n")
        print("| policy | jobs | switches | GPU serving | P0 wait p50 / p99 s | max wait s | within bound "
              "| mean completion s |")
        print("|---|---|---|---|---|---|---|---|")
        for policy in ("fifo", "cost-aware", "drain-first"):
            arrivals = make(random.Random(612))
            sim = Sim(policy, sorted(service), service, cost, MAX_WAIT, seed_cost=cost.get("default", 8.0))
            r = sim.run(arrivals)
            p0 = "-" if r["p0_p50"] != r["p0_p50"] else f"{r['p0_p50']:.1f} / {r['p0_p99']:.1f}"
            print(f"| {policy} | {r['jobs']} | {r['switches']} | {r['serving']:.0%} | {p0} | "
                  f"{r['max_wait']:.1f} | {'yes' if r['max_wait'] <= bound else 'no'} | {r['mean_completion']:.1f} |")
            sim.s.stop()
    sweep()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
