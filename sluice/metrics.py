"""A small Prometheus registry (text exposition format 0.0.4). Each metric owns its lock; updates are a
dict lookup and an addition, cheap enough for the request path."""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable, Iterable

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[tuple, object] = {}

    def _key(self, labels: dict) -> tuple:
        try:
            if len(labels) == len(self.labels):
                return tuple([str(labels[n]) for n in self.labels])
        except KeyError:
            pass
        raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(labels)}")

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels) -> None:
        self.inc_at(self._key(labels), amount)

    def inc_at(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        """`inc` with the label values already in label order, as strings (the per-request path)."""
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labels, k)} {_num(v)}" for k, v in items]


class GaugeFn(_Metric):
    """A gauge read at render time from `fn() -> [(label values tuple, value)]` (queue depth, states...)."""
    kind = "gauge"

    def __init__(self, name, help, labels, fn: Callable[[], Iterable[tuple[tuple, float]]]):
        super().__init__(name, help, labels)
        self._fn = fn

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.labels, k)} {_num(v)}" for k, v in sorted(self._fn())]


class CounterFn(GaugeFn):
    """A counter kept elsewhere (e.g. a backend's restart count), read at render time."""
    kind = "counter"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, labels=(), buckets=DEFAULT_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))

    def observe(self, value: float, **labels) -> None:
        self.observe_at(self._key(labels), value)

    def observe_at(self, key: tuple[str, ...], value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)      # the first bucket it fits; cumulated when rendered
        with self._lock:
            counts = self._values.get(key)
            if counts is None:
                counts = self._values[key] = [0] * (len(self.buckets) + 1) + [0.0]   # per bucket, +Inf, sum
            counts[i] += 1
            counts[-1] += value

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        out = []
        for key, counts in items:
            total = 0
            for le, c in zip(self.buckets, counts):
                total += c
                bound = 'le="' + repr(float(le)) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labels, key, bound)} {total}")
            total += counts[-2]
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.labels, key, inf)} {total}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {total}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_num(counts[-1])}")
        return out


class Registry:
    def __init__(self):
        self._metrics: list[_Metric] = []

    def _add(self, m):
        self._metrics.append(m)
        return m

    def counter(self, name, help, labels=()) -> Counter:
        return self._add(Counter(name, help, labels))

    def gauge_fn(self, name, help, labels, fn) -> GaugeFn:
        return self._add(GaugeFn(name, help, labels, fn))

    def counter_fn(self, name, help, labels, fn) -> CounterFn:
        return self._add(CounterFn(name, help, labels, fn))

    def histogram(self, name, help, labels=(), buckets=DEFAULT_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labels, buckets))

    def render(self) -> str:
        lines = []
        for m in self._metrics:
            lines += m.header() + m.samples()
        return "\n".join(lines) + "\n"


class SluiceMetrics:
    """sluice's metric set. `status()` returns the admin status document the gauges are read from: once
    per scrape (`render`), so every gauge shows the same moment."""

    def __init__(self, version: str, status: Callable[[], dict], uptime: Callable[[], float]):
        self._status = status
        self._doc: dict | None = None
        self._rendering = threading.Lock()

        def doc() -> dict:                   # the scrape's one document
            return self._doc
        r = self.registry = Registry()
        self.requests = r.counter("sluice_requests_total", "Finished requests by outcome",
                                  ("model", "priority", "route", "outcome"))
        self.wait = r.histogram("sluice_queue_wait_seconds", "Time from arrival to grant", ("model", "priority"))
        self.duration = r.histogram("sluice_request_duration_seconds", "Time from grant to the last byte", ("model",))
        self.ttft = r.histogram("sluice_time_to_first_token_seconds", "Time from grant to the upstream's first byte",
                                ("model",))
        self.tokens = r.counter("sluice_tokens_total", "Tokens reported by backends", ("model", "kind"))
        self.switches = r.counter("sluice_model_switches_total", "Model switches on exclusive gates",
                                  ("gate", "from", "to", "result"))
        self.phases = r.histogram("sluice_switch_phase_seconds", "Seconds per switch phase", ("gate", "phase"))

        def queue_depth():
            d = doc()
            depth = {(m, str(p)): 0 for m in [x["name"] for x in d["models"]] for p in range(5)}
            for j in d["queue"]["jobs"]:
                depth[(j["model"], str(j["priority"]))] = depth.get((j["model"], str(j["priority"])), 0) + 1
            return depth.items()

        r.gauge_fn("sluice_queue_depth", "Jobs waiting", ("model", "priority"), queue_depth)
        r.gauge_fn("sluice_inflight", "Requests through each gate now", ("gate",),
                   lambda: [((g["name"],), g["inflight"]) for g in doc()["gates"]])
        r.gauge_fn("sluice_gate_slots", "Requests each gate lets through at once", ("gate",),
                   lambda: [((g["name"],), g["slots"]) for g in doc()["gates"]])
        r.gauge_fn("sluice_backend_up", "1 when the backend can serve", ("backend",),
                   lambda: [((b["name"],), 1 if b["state"] in ("ready", "pending", "stopped", "sleeping") else 0)
                            for b in doc()["backends"]])
        states = ("pending", "ready", "down", "stopped", "starting", "sleeping", "stopping", "failed")
        r.gauge_fn("sluice_backend_state", "1 for the state each backend is in", ("backend", "state"),
                   lambda: [((b["name"], st), 1 if b["state"] == st else 0)
                            for b in doc()["backends"] for st in states])
        r.counter_fn("sluice_backend_restarts_total", "Restarts of managed backends", ("backend",),
                     lambda: [((b["name"],), b.get("restarts") or 0) for b in doc()["backends"]])
        r.gauge_fn("sluice_build_info", "sluice version", ("version",), lambda: [((version,), 1)])
        r.gauge_fn("sluice_uptime_seconds", "Seconds since sluice started", (), lambda: [((), uptime())])

    def render(self) -> str:
        with self._rendering:
            self._doc = self._status()
            try:
                return self.registry.render()
            finally:
                self._doc = None

    def record(self, entry: dict, granted: bool) -> None:
        """One finished job (the request-log entry); `granted`: it reached a backend (it has a duration)."""
        model, prio = entry["model"], str(entry["priority"])
        self.requests.inc_at((model, prio, entry["route"], entry["outcome"]))
        self.wait.observe_at((model, prio), entry["wait_ms"] / 1000)
        if granted:
            self.duration.observe_at((model,), entry["service_ms"] / 1000)
        if entry.get("ttfb_ms") is not None:
            self.ttft.observe_at((model,), entry["ttfb_ms"] / 1000)
        usage = entry.get("usage") or {}
        for kind in ("prompt", "completion"):
            n = usage.get(f"{kind}_tokens")
            if isinstance(n, (int, float)) and n > 0:
                self.tokens.inc_at((model, kind), n)

    def record_switch(self, gate: str, phases: dict) -> None:
        self.switches.inc(gate=gate, **{"from": str(phases.get("from")), "to": str(phases["to"])},
                          result=phases["result"])
        for phase in ("drain", "sleep", "wake"):
            if phases.get(f"{phase}_s") is not None:
                self.phases.observe(phases[f"{phase}_s"], gate=gate, phase=phase)
