#!/usr/bin/env python3
"""Scheduling quality on one exclusive gate: the real Scheduler and policies, an injected clock, no sleeping.

A discrete-event loop feeds arrivals to `Scheduler.submit`, finishes jobs after their service time, and
holds each model switch (run by the scheduler's own switch thread) for its switch cost in simulated time.

    python bench/trace_sim.py            # prints one markdown table per trace (all of them, ~30 s)
    python bench/trace_sim.py --llmux    # llmux's workloads: its three policies beside sluice's
    python bench/trace_sim.py --sleep    # adaptive sleep levels

Traces: llama-swap #612's `A B A A C A B C` repeated with Poisson arrivals (steady, and in bursts as agents
send them); interactive P0 + a P4 flood; three models with unequal switch costs; then the steady #612
trace at rising load. Then llmux's own workloads (bench/llmux_profiles.py) under its three policies
(bench/llmux_baselines.py, reference baselines run through the same Scheduler) beside sluice's, and
adaptive sleep levels (`SleepLevels`).
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sluice.config import GateConfig  # noqa: E402
from sluice.scheduler import BackendSpec, Health, Job, JobState, Outcome, Scheduler  # noqa: E402


class Sim:
    """The real Scheduler on one exclusive gate, driven by a discrete-event loop on a simulated clock.

    A switch runs on the scheduler's own switch thread: the wake blocks until the loop's clock reaches the
    switch's end, so jobs that arrive meanwhile are submitted at their own time (they queue behind the
    switch). `decide` replaces sluice's policies (bench/llmux_baselines.py); its `deadline` tells the loop
    when to look again. `levels` (SleepLevels) prices each wake by the level the model slept at; otherwise
    `switch_cost[(from, to)]` (else ["default"]) does. `free_cold_start`: a first wake costs nothing and is
    not a switch, as llmux's simulator counts them."""

    def __init__(self, policy: str, models: list[str], service: dict, switch_cost: dict, max_wait_s: float,
                 seed_cost: float, *, min_active_s: float = 0.0, baseline=None, levels=None,
                 free_cold_start: bool = False):
        self.t = 0.0
        self.cost = switch_cost
        self.service = service
        self.levels = levels
        self._asleep: list[tuple[str, bool]] = []
        self.free_cold_start = free_cold_start
        self.resident = None
        self.switches = 0
        self.switching_s = 0.0
        self.switch_end: float | None = None
        self.baseline = baseline
        self.baseline_due: float | None = None
        self._started = threading.Event()    # the switch thread has priced its wake
        self._release = threading.Event()    # the loop's clock reached the switch's end
        self._done = threading.Event()       # the scheduler handed the gate back
        gate = GateConfig("gpu", slots=1, mode="exclusive", policy=policy, max_wait_s=max_wait_s,
                          switch_cost_s=seed_cost, drain_timeout_s=1e9, min_active_s=min_active_s)
        specs = [BackendSpec(m, "gpu", frozenset({m})) for m in models]
        extra = {"decide": self._baseline_decide} if baseline is not None else {}
        self.s = Scheduler([gate], specs, max_queue_depth=10 ** 6, aging_s=1e9, clock=lambda: self.t,
                           switcher=self._switcher, on_switch=lambda g, p: self._done.set(), **extra)
        for m in models:
            self.s.set_health(m, Health.READY)

    def _baseline_decide(self, policy, view, costs):
        self.baseline_due = self.baseline.deadline(view, costs)
        return self.baseline.decide(policy, view, costs)

    def _switcher(self, backend: str, action: str) -> None:
        if action in ("sleep", "stop"):
            if self.levels is not None:         # applied at the wake, which names the model coming back
                if action == "sleep" and backend in self.levels.failing:
                    raise RuntimeError(f"{backend}: sleep failed")      # the scheduler escalates to stop
                self._asleep.append((backend, action == "stop"))
            return
        if self.levels is not None:
            for name, stop in self._asleep:
                self.levels.sleep(name, self.t, stop=stop, waking=backend)
            self._asleep = []
            cost = self.levels.wake(backend, self.t)
        else:
            cost = self.cost.get((self.resident, backend), self.cost.get("default", 5.0))
        if self.resident is None and self.free_cold_start:
            cost = 0.0
        else:
            self.switches += 1
            self.switching_s += cost
        self.resident = backend
        self.switch_end = self.t + cost
        self._started.set()
        self._release.wait(30)
        self._release.clear()

    def _dispatch(self) -> float | None:
        self.baseline_due = None
        due = self.s.dispatch_once()
        # a switch started by that pass blocks in the sim's switcher until released, so it is still on
        switching = self.s.snapshot()["gates"]["gpu"]["state"] == "switching"
        if switching:                        # wait until the switch thread has priced its wake
            self._started.wait(30)
            self._started.clear()
        if self.baseline_due is not None:
            due = self.baseline_due if due is None else min(due, self.baseline_due)
        return due

    def _end_switch(self) -> None:
        self.switch_end = None
        self._release.set()
        self._done.wait(30)
        self._done.clear()

    def run(self, arrivals: list[tuple[float, str, int]]) -> dict:
        arrivals = sorted(arrivals)
        jobs: list[tuple[Job, float]] = []
        queued: list[Job] = []
        running: dict[Job, float] = {}
        busy = held = 0.0
        i = 0
        due = None
        while True:
            nxt = [x for x in (arrivals[i][0] if i < len(arrivals) else None,
                               min(running.values()) if running else None, self.switch_end) if x is not None]
            if queued and due is not None and self.switch_end is None:
                nxt.append(due)
            if not nxt:
                break
            now = max(self.t, min(nxt))
            if not running and queued and self.switch_end is None:
                held += now - self.t              # the GPU idle while jobs wait: a policy holding it
            self.t = now
            if self.switch_end is not None and self.switch_end <= self.t:
                self._end_switch()
            for job, end in list(running.items()):
                if end <= self.t:
                    del running[job]
                    self.s.finish(job, Outcome.OK)
            while i < len(arrivals) and arrivals[i][0] <= self.t:
                at, model, prio = arrivals[i]
                job = Job(model, prio, timeout_s=1e9)
                self.s.submit(job)
                jobs.append((job, at))
                queued.append(job)
                i += 1
            if self.switch_end is None:
                due = self._dispatch()
            still = []
            for job in queued:
                if job.state is JobState.GRANTED:
                    running[job] = self.t + self.service[job.model]
                    busy += self.service[job.model]
                else:
                    still.append(job)
            queued = still
        return summarize(jobs, self.switches, busy, self.switching_s, held, self.service)


def summarize(jobs, switches, busy, switching_s, held, service) -> dict:
    waits = sorted(j.granted_at - at for j, at in jobs)
    # `floor`: the worst wait of a server that never switches, taking jobs in arrival order: queueing that
    # no policy can avoid. Where it exceeds the bound, every policy does.
    free = floor = 0.0
    for j, at in sorted(jobs, key=lambda x: (x[1], x[0].seq)):
        start = max(at, free)
        free = start + service[j.model]
        floor = max(floor, start - at)
    p0 = sorted(j.granted_at - at for j, at in jobs if j.priority == 0)
    done = [j.finished_at - at for j, at in jobs]
    # GPU serving fraction: of the time the GPU had work, the share spent serving rather than switching
    # or held idle while jobs waited. llmux's: serving / (serving + switching), idle time not counted.
    return {"jobs": len(jobs), "switches": switches,
            "serving": busy / (busy + switching_s + held),
            "llmux_serving": busy / (busy + switching_s),
            "p0_p50": statistics.median(p0) if p0 else float("nan"),
            "p0_p99": p0[min(len(p0) - 1, int(len(p0) * 0.99))] if p0 else float("nan"),
            "p95_wait": waits[min(len(waits) - 1, math.ceil(len(waits) * 0.95) - 1)],
            "max_wait": waits[-1], "floor": floor, "mean_completion": statistics.mean(done)}


class SleepLevels:
    """Adaptive sleep levels for the simulator (llmux recommends this, Report 3 step 3, but does not ship it).

    A model put to sleep goes to level 1 (weights kept in CPU RAM, the cheapest wake) while the level-1
    weights fit `l1_ram_budget_gb`; to make room the longest-asleep level-1 models drop to level 2 (the
    one just active is the likeliest to come back). A model asleep `demote_after_s` drops to level 2 (frees
    its RAM); asleep `stop_after_s`, it is stopped (frees everything; the next wake is a cold start). A
    sleep that fails escalates to stop, as the scheduler does. Each wake costs its level's `wake_s`.
    Levels change only at a call, from the injected time: deterministic."""

    def __init__(self, sizes_gb: dict, wake_s: dict, *, demote_after_s: float = float("inf"),
                 stop_after_s: float = float("inf"), l1_ram_budget_gb: float = float("inf"),
                 fixed_level: int | None = None, failing: frozenset = frozenset()):
        self.sizes, self.wake_s = sizes_gb, wake_s
        self.demote_after_s, self.stop_after_s = demote_after_s, stop_after_s
        self.budget, self.fixed, self.failing = l1_ram_budget_gb, fixed_level, failing
        self.state: dict[str, tuple[str | int, float]] = {}    # model -> (level, since); absent: never started
        self.peak_l1_gb = 0.0
        self.wakes: dict = {}                                   # level -> count

    def level(self, model: str, now: float) -> str | int:
        self._age(now)
        return self.state.get(model, ("cold", now))[0]

    def l1_gb(self) -> float:
        return sum(self.sizes[m] for m, (lv, _) in self.state.items() if lv == 1)

    def _age(self, now: float) -> None:
        for m, (lv, since) in list(self.state.items()):
            if lv in (1, 2) and now - since >= self.stop_after_s:
                self.state[m] = ("cold", since)
            elif lv == 1 and now - since >= self.demote_after_s:
                self.state[m] = (2, since)

    def sleep(self, model: str, now: float, stop: bool = False, waking: str | None = None) -> None:
        """`waking`: the model the switch wakes next; its level-1 weights leave RAM, so they are not evicted."""
        self._age(now)
        if model not in self.state or self.state[model][0] == "cold":
            return                           # never started, or stopped: nothing to put to sleep
        if stop:
            self.state[model] = ("cold", now)
            return
        if model in self.failing:
            raise RuntimeError(f"{model}: sleep failed")
        level = self.fixed or 1
        if level == 1:
            leaving = self.sizes[waking] if waking and self.state.get(waking, ("", 0))[0] == 1 else 0.0
            need = self.l1_gb() - leaving + self.sizes[model] - self.budget
            for m, (lv, since) in sorted(self.state.items(), key=lambda kv: kv[1][1]):
                if need <= 0:
                    break
                if lv == 1 and m != waking:
                    self.state[m] = (2, since)
                    need -= self.sizes[m]
            if need > 0:
                level = 2                    # it does not fit even alone
        self.state[model] = (level, now)

    def wake(self, model: str, now: float) -> float:
        level = self.level(model, now)
        self.state[model] = ("awake", now)
        self.peak_l1_gb = max(self.peak_l1_gb, self.l1_gb())
        self.wakes[level] = self.wakes.get(level, 0) + 1
        return self.wake_s[model][level]


# Report 1-2's three models on an L40: weights in GB, and seconds to wake from level 1, level 2, a cold start
SLEEP_MODELS = {"gpt-oss-20b": (13.0, {1: 3.6, 2: 20.0, "cold": 130.0}),
                "gemma-12b": (24.0, {1: 4.0, 2: 38.5, "cold": 74.0}),
                "qwen3-4b": (8.0, {1: 2.0, 2: 8.0, "cold": 55.0})}


def trace_sleep(rng):
    """A hot pair (agents alternating gpt-oss and gemma in bursts) and qwen now and then; a quiet hour in the
    middle. 600 jobs."""
    out, t = [], 0.0
    for phase in range(2):
        for _ in range(15):
            t += rng.expovariate(1 / 40.0)
            model = rng.choice(["gpt-oss-20b", "gemma-12b", "gpt-oss-20b", "gemma-12b", "qwen3-4b"])
            out += [(at, model, 2) for at in poisson(rng, 2.0, 20, start=t)]
        t += 3600.0 if phase == 0 else 0.0
    return out


def sleep_table() -> None:
    service = {m: 1.0 for m in SLEEP_MODELS}
    sizes = {m: v[0] for m, v in SLEEP_MODELS.items()}
    wake = {m: v[1] for m, v in SLEEP_MODELS.items()}
    print("\n### Adaptive sleep levels (Report 1-2's three models, service 1 s, max_wait_s 60, lookahead)\n")
    print("| sleep levels | switches | switch s | wakes L1 / L2 / cold | peak L1 RAM GB | GPU serving | max wait s |")
    print("|---|---|---|---|---|---|---|")
    for name, kw in [("always level 2", dict(fixed_level=2)),
                     ("level 1, unlimited RAM", {}),
                     ("level 1 within 32 GB of RAM (LRU to level 2)", dict(l1_ram_budget_gb=32.0)),
                     ("adaptive: L1 within 32 GB, L2 after 900 s, stop after 1800 s",
                      dict(l1_ram_budget_gb=32.0, demote_after_s=900.0, stop_after_s=1800.0))]:
        levels = SleepLevels(sizes, wake, **kw)
        sim = Sim("lookahead", sorted(service), service, {"default": 10.0}, MAX_WAIT, seed_cost=10.0,
                  levels=levels)
        r = sim.run(trace_sleep(random.Random(7)))
        sim.s.stop()
        w = levels.wakes
        print(f"| {name} | {r['switches']} | {sim.switching_s:.0f} | {w.get(1, 0)} / {w.get(2, 0)} / "
              f"{w.get('cold', 0)} | {levels.peak_l1_gb:.0f} | {r['serving']:.0%} | {r['max_wait']:.1f} |")


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


LLMUX_POLICIES = ("llmux FIFO", "llmux CostAware", "llmux TimeSlice", "cost-aware", "lookahead")


def run_llmux(profile, trace, cost: dict, min_active_s: float = 0.0, policies=LLMUX_POLICIES) -> dict:
    """One llmux profile under every policy: {policy: result}, with `bound` and `within` added."""
    from bench.llmux_baselines import baselines
    from bench.llmux_profiles import MAX_WAIT_S, SERVICE_S
    models = sorted({m for _, m, _ in trace})
    service = {m: SERVICE_S for m in models}
    bound = MAX_WAIT_S + SERVICE_S + max(v for v in cost.values())
    by_name = {b.name: b for b in baselines(MAX_WAIT_S, min_active_s)}
    out = {}
    for policy in policies:
        b = by_name.get(policy)
        sim = Sim("fifo" if b else policy, models, service, cost, MAX_WAIT_S, seed_cost=cost["default"],
                  min_active_s=min_active_s, baseline=b, free_cold_start=True)
        r = sim.run(list(trace))
        sim.s.stop()
        r["bound"], r["within"] = bound, r["max_wait"] <= bound + 1e-9
        out[policy] = r
    return out


def wins(results: dict, mine: str) -> list[str]:
    """What `mine` loses to the best baseline on: serving share (llmux's and ours), p95 and max wait, bound."""
    base = [r for p, r in results.items() if p.startswith("llmux")]
    r, lost = results[mine], []
    eps = 1e-6
    if r["llmux_serving"] < max(b["llmux_serving"] for b in base) - eps:
        lost.append("llmux serving")
    if r["serving"] < max(b["serving"] for b in base) - eps:
        lost.append("serving")
    if r["p95_wait"] > min(b["p95_wait"] for b in base) + eps:
        lost.append("p95")
    if r["max_wait"] > min(b["max_wait"] for b in base) + eps:
        lost.append("max wait")
    if not r["within"] and any(b["within"] for b in base):
        lost.append("bound")
    return lost


def llmux_tables(costs=None) -> None:
    from bench.llmux_profiles import (GPU_PROFILES, L40_COSTS, L40_MIN_ACTIVE_S, MAX_WAIT_S, SERVICE_S,
                                      SIM_PROFILES, SWITCH_COSTS)
    runs = [(f"switch {c:g} s", SIM_PROFILES, {"default": c}, 0.0) for c in (costs or SWITCH_COSTS)]
    runs.append(("L40 (Report 4): to A 3.6 s (level 1), to B 38.5 s (level 2), min_active 5 s", GPU_PROFILES,
                 L40_COSTS, L40_MIN_ACTIVE_S))
    mine = LLMUX_POLICIES[-1]
    for title, profiles, cost, min_active in runs:
        print(f"\n### llmux profiles, {title}  (service {SERVICE_S:g} s, max_wait_s {MAX_WAIT_S:g}, "
              f"bound {MAX_WAIT_S + SERVICE_S + max(cost.values()):g} s)\n")
        print("| profile | policy | switches | GPU serving (llmux) | GPU serving (ours) | p95 wait s | max wait s "
              "| within bound |")
        print("|---|---|---|---|---|---|---|---|")
        for name, trace in profiles:
            res = run_llmux(name, trace, cost, min_active)
            for policy, r in res.items():
                print(f"| {name} | {policy} | {r['switches']} | {r['llmux_serving']:.1%} | {r['serving']:.1%} | "
                      f"{r['p95_wait']:.1f} | {r['max_wait']:.1f} | {'yes' if r['within'] else 'no'} |")
            lost = wins(res, mine)
            floor = res[mine]["floor"]
            print(f"| {name} | **{mine} wins** | {'yes' if not lost else 'no: ' + ', '.join(lost)} | | | | "
                  f"switch-free floor {floor:.1f} | {'unreachable' if floor > res[mine]['bound'] else ''} |")


def main() -> int:
    if "--llmux" in sys.argv:
        llmux_tables()
        return 0
    if "--sleep" in sys.argv:
        sleep_table()
        return 0
    for title, make, service, cost in TRACES:
        print(f"\n### {title}  (max_wait_s {MAX_WAIT:g})\n")
        bound = MAX_WAIT + max(service.values()) + max(cost.values())
        print(f"max wait bound = max_wait_s + the drain of one job + one switch = {bound:g} s\n")
        print("| policy | jobs | switches | GPU serving | P0 wait p50 / p99 s | max wait s | within bound "
              "| mean completion s |")
        print("|---|---|---|---|---|---|---|---|")
        for policy in ("fifo", "cost-aware", "drain-first", "lookahead"):
            arrivals = make(random.Random(612))
            sim = Sim(policy, sorted(service), service, cost, MAX_WAIT, seed_cost=cost.get("default", 8.0))
            r = sim.run(arrivals)
            p0 = "-" if r["p0_p50"] != r["p0_p50"] else f"{r['p0_p50']:.1f} / {r['p0_p99']:.1f}"
            print(f"| {policy} | {r['jobs']} | {r['switches']} | {r['serving']:.0%} | {p0} | "
                  f"{r['max_wait']:.1f} | {'yes' if r['max_wait'] <= bound else 'no'} | {r['mean_completion']:.1f} |")
            sim.s.stop()
    sweep()
    llmux_tables()
    sleep_table()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
