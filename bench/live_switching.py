#!/usr/bin/env python3
"""The live daemon against the simulator: one llmux profile replayed through a real `python -m sluice`.

Two vLLM-like stand-ins (real HTTP servers, in this process) sit behind one exclusive gate with the default
policy: A sleeps at level 1, B at level 2, each `/sleep`, `/wake_up` and L2 weight reload taking Report 1's
time on an L40 (doublewordai/llmux reports/switching-efficiency.md), and each chat completion the profile's
0.5 s, all scaled by --scale. The same scaled trace and costs go through bench/trace_sim.py's `Sim` (the real
Scheduler on an injected clock), and the live switch count and GPU serving share must agree with its
prediction within 10 %.

    python bench/live_switching.py                       # bursty (Report 4), scale 0.1, 3 runs, ~40 s
    python bench/live_switching.py --profile heavy_burst --reps 1
    python bench/live_switching.py --profile bursty --scale 0.2

Live measurements: switches from the daemon's /admin/status, switch seconds (sleep + wake phases) from its
/metrics, busy seconds from the stand-ins' own clocks, and for our serving share the time some job was
waiting or running (from its scheduled arrival to its answer). Exit 1 when a figure is off by more than
--tolerance, when a request failed, or when the stand-ins saw two models awake or a request while asleep.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.llmux_profiles import L40_COSTS, L40_MIN_ACTIVE_S, MAX_WAIT_S, SERVICE_S, SIM_PROFILES  # noqa: E402
from bench.trace_sim import Sim  # noqa: E402
from sluice.config import GateConfig  # noqa: E402

# Report 1's switches, split between the model going to sleep and the one waking in the report's own
# proportions (cooldown spread over both, since sluice applies min_active_s itself):
# A -> B 38.5 s = 15 % sleep of A + 81 % wake of B (L2: reload weights), B -> A 3.6 s = 28 % sleep of B + 32 %
# wake of A (L1: weights back from CPU RAM). So sleep(A) + wake(B) and sleep(B) + wake(A) are L40_COSTS.
SLEEP_S = {"A": L40_COSTS[("A", "B")] * 15 / 96, "B": L40_COSTS[("B", "A")] * 28 / 60}
WAKE_S = {"A": L40_COSTS[("B", "A")] * 32 / 60, "B": L40_COSTS[("A", "B")] * 81 / 96}
LEVEL = {"A": 1, "B": 2}


class Gpu:
    """What both stand-ins share: who is awake and serving, and any breach of the gate's promises."""

    def __init__(self):
        self.lock = threading.Lock()
        self.awake = {"A": True, "B": True}        # vLLM starts awake; the first switch puts the other down
        self.serving = 0
        self.served: list[tuple[int, float, float]] = []    # (job index, start, end), monotonic
        self.violations: list[str] = []


class StandIn:
    """A vLLM-like server for one model: /v1/chat/completions after `service_s`, and vLLM's dev-mode sleep API
    (/sleep?level=N, /wake_up, /collective_rpc reload_weights, /reset_prefix_cache, GET /is_sleeping)."""

    def __init__(self, model: str, gpu: Gpu, service_s: float, sleep_s: float, wake_s: float):
        self.model, self.gpu = model, gpu
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _json(self, status: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/is_sleeping":
                    return self._json(200, {"is_sleeping": not gpu.awake[model]})
                if self.path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
                self._json(200 if self.path == "/health" else 404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                path = self.path.split("?")[0]
                if path == "/v1/chat/completions":
                    return self._json(*outer.complete(body))
                if path == "/sleep":
                    time.sleep(sleep_s)
                    with gpu.lock:
                        if gpu.serving:
                            gpu.violations.append(f"{model} put to sleep while serving")
                        gpu.awake[model] = False
                elif path == "/collective_rpc" and body.get("method") == "reload_weights":
                    time.sleep(wake_s)                 # level 2: the weights come back from disk
                elif path == "/wake_up":
                    if LEVEL[model] == 1 and not gpu.awake[model]:
                        time.sleep(wake_s)             # level 1: the weights come back from CPU RAM
                    with gpu.lock:
                        others = [m for m, up in gpu.awake.items() if up and m != model]
                        if others:
                            gpu.violations.append(f"{model} woken while {others} awake")
                        gpu.awake[model] = True
                self._json(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.service_s = service_s
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def complete(self, body: dict) -> tuple[int, dict]:
        gpu = self.gpu
        with gpu.lock:
            if not gpu.awake[self.model]:
                gpu.violations.append(f"request for {self.model} while asleep")
                return 503, {"error": {"message": "asleep"}}
            gpu.serving += 1
            if gpu.serving > 1:
                gpu.violations.append(f"{gpu.serving} requests served at once on one exclusive gate")
            start = time.monotonic()
        time.sleep(self.service_s)
        with gpu.lock:
            gpu.serving -= 1
            gpu.served.append((int(body["messages"][-1]["content"].split()[-1]), start, time.monotonic()))
        return 200, {"id": "cmpl-1", "object": "chat.completion", "model": self.model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Setup:
    trace: list            # (arrival s, model, priority), scaled
    service_s: float
    cost: dict             # the sim's switch costs, scaled
    max_wait_s: float
    min_active_s: float
    seed_s: float          # the gate's first guess of a switch (switch_cost_s), the sim's seed_cost
    scale: float


def setup(profile: str, scale: float) -> Setup:
    trace = dict(SIM_PROFILES)[profile]
    if not {m for _, m, _ in trace} <= {"A", "B"}:
        raise SystemExit(f"{profile}: needs models other than A and B; pick a two-model profile")
    cost = {k: v * scale for k, v in L40_COSTS.items()}
    return Setup([(t * scale, m, p) for t, m, p in trace], SERVICE_S * scale, cost, MAX_WAIT_S * scale,
                 L40_MIN_ACTIVE_S * scale, cost["default"], scale)


def simulate(s: Setup) -> dict:
    models = sorted({m for _, m, _ in s.trace})
    sim = Sim(GateConfig("gpu").policy, models, {m: s.service_s for m in models}, s.cost, s.max_wait_s,
              seed_cost=s.seed_s, min_active_s=s.min_active_s, free_cold_start=True)
    try:
        r = sim.run(list(s.trace))
    finally:
        sim.s.stop()
    r["switching_s"] = sim.switching_s
    return r


def _http(port: int, method: str, path: str, body=None, timeout: float = 60.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _config(s: Setup, urls: dict) -> str:
    """The daemon's file: one exclusive gate, the default policy (not named), one stand-in per model."""
    out = [f'[[gates]]\nname = "gpu"\nmode = "exclusive"\nslots = 1\nmax_wait_s = {s.max_wait_s!r}\n'
           f'min_active_s = {s.min_active_s!r}\nswitch_cost_s = {s.seed_s!r}\n']
    for m, url in urls.items():
        out.append(f'[[backends]]\nname = "{m.lower()}"\nurl = "{url}"\ngate = "gpu"\n'
                   f'switch = "vllm-sleep-{LEVEL[m]}"\nmodels = ["{m}"]\n')
        out.append(f'[[models]]\nname = "{m}"\nbackends = ["{m.lower()}"]\n')
    return "\n".join(out)


def _switch_seconds(port: int) -> float:
    status, text = _http(port, "GET", "/metrics")
    pat = r'^sluice_switch_phase_seconds_sum\{gate="gpu",phase="(?:sleep|wake)"\} (\S+)$'
    return sum(float(v) for v in re.findall(pat, text.decode(), re.M))


def _switches(port: int) -> int:
    gates = json.loads(_http(port, "GET", "/admin/status")[1])["gates"]
    return next(g["switches"] for g in gates if g["name"] == "gpu")


def live(s: Setup, workdir: Path) -> dict:
    """Replay the trace through a fresh daemon (fresh learned costs, as the sim starts from its seeds)."""
    gpu = Gpu()
    standins = {m: StandIn(m, gpu, s.service_s, SLEEP_S[m] * s.scale, WAKE_S[m] * s.scale) for m in ("A", "B")}
    (workdir / "sluice.toml").write_text(_config(s, {m: b.url for m, b in standins.items()}))
    env = dict(os.environ, SLUICE_CONFIG=str(workdir / "sluice.toml"), SLUICE_PORT="0",
               SLUICE_LOG_DIR=str(workdir / "logs"), SLUICE_STATE_DIR=str(workdir / "run"),
               SLUICE_AGING_S="1e6", SLUICE_QUEUE_TIMEOUT="600", SLUICE_MAX_QUEUE_DEPTH="100000",
               SLUICE_HEALTH_INTERVAL_S="0.5",
               SLUICE_CLAUDE_BIN=str(workdir / "no-claude"), PYTHONPATH=str(ROOT))
    err = open(workdir / "daemon.err", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "sluice"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=err, stderr=err)
    try:
        port = _wait_listening(proc, workdir / "daemon.err")
        deadline = time.monotonic() + 15
        while json.loads(_http(port, "GET", "/v1/health")[1]).get("status") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("the stand-ins never became ready; see " + str(workdir / "daemon.err"))
            time.sleep(0.05)
        # The sim's first wake is free and uncounted (llmux's cold start): make the first model resident first.
        first = min(s.trace)[1]
        status, body = _http(port, "POST", f"/admin/models/{first}/load")
        if status != 200:
            raise RuntimeError(f"loading {first} answered {status}: {body[:300]!r}")
        switches0, switch_s0 = _switches(port), _switch_seconds(port)
        with gpu.lock:
            gpu.served.clear()
        answers: list[tuple[int, float] | None] = [None] * len(s.trace)
        t0 = time.monotonic() + 0.3

        def client(i: int, at: float, model: str) -> None:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": f"job {i}"}]}
            try:
                status, _ = _http(port, "POST", "/v1/chat/completions", body, timeout=600)
            except OSError:
                status = 0
            answers[i] = (status, time.monotonic())

        threads = [threading.Thread(target=client, args=(i, at, m), daemon=True)
                   for i, (at, m, _) in enumerate(s.trace)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        switches, switch_s = _switches(port) - switches0, _switch_seconds(port) - switch_s0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()
        for b in standins.values():
            b.close()
    failed = sum(1 for a in answers if a is None or a[0] != 200)
    busy = sum(end - start for _, start, end in gpu.served)
    pending = _union([(t0 + at, a[1]) for (at, _, _), a in zip(s.trace, answers) if a is not None])
    starts = {i: start for i, start, _ in gpu.served}
    waits = sorted(starts[i] - (t0 + at) for i, (at, _, _) in enumerate(s.trace) if i in starts)
    return {"switches": switches, "serving": busy / pending if pending else float("nan"),
            "llmux_serving": busy / (busy + switch_s) if busy + switch_s else float("nan"),
            "switching_s": switch_s, "busy_s": busy, "failed": failed, "violations": gpu.violations,
            "p95_wait": waits[max(0, math.ceil(len(waits) * 0.95) - 1)] if waits else float("nan"),
            "max_wait": waits[-1] if waits else float("nan")}


def _wait_listening(proc, err_path: Path) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"listening on http://[^:]+:(\d+)", err_path.read_text())
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("sluice did not start:\n" + err_path.read_text()[-2000:])


def _union(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one interval: the time the GPU had work (waiting or running)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def compare(sim: dict, got: dict, tolerance: float) -> list[tuple[str, float, float, float, bool]]:
    """(metric, sim, live, relative difference, within tolerance) for the checked figures."""
    rows = []
    for key in ("switches", "serving", "llmux_serving"):
        a, b = sim[key], got[key]
        diff = (b - a) / a if a else (0.0 if b == a else math.inf)
        rows.append((key, a, b, diff, abs(diff) <= tolerance))
    return rows


def run(profile: str = "bursty", scale: float = 0.1, reps: int = 3, tolerance: float = 0.10,
        out=print) -> bool:
    """Every repetition against the one prediction; True when all agree and none broke the gate's rules."""
    s = setup(profile, scale)
    sim = simulate(s)
    out(f"profile {profile}, {len(s.trace)} jobs, scale {scale:g}: job {s.service_s:g} s, switch A->B "
        f"{s.cost[('A', 'B')]:.3g} s (L2 wake), B->A {s.cost[('B', 'A')]:.3g} s (L1 wake), max_wait_s "
        f"{s.max_wait_s:g}, min_active_s {s.min_active_s:g}, policy {GateConfig('gpu').policy}\n")
    out("| run | switches | GPU serving (ours) | GPU serving (llmux) | switch s | p95 wait s | max wait s | agree |")
    out("|---|---|---|---|---|---|---|---|")
    out(f"| sim | {sim['switches']} | {sim['serving']:.1%} | {sim['llmux_serving']:.1%} | "
        f"{sim['switching_s']:.2f} | {sim['p95_wait']:.2f} | {sim['max_wait']:.2f} | |")
    ok = True
    with tempfile.TemporaryDirectory(prefix="sluice-live-") as tmp:
        for rep in range(reps):
            workdir = Path(tmp) / f"run{rep}"
            workdir.mkdir()
            got = live(s, workdir)
            rows = compare(sim, got, tolerance)
            good = all(r[-1] for r in rows) and not got["failed"] and not got["violations"]
            ok &= good
            diffs = ", ".join(f"{k} {d:+.1%}" for k, _, _, d, _ in rows)
            out(f"| live {rep + 1} | {got['switches']} | {got['serving']:.1%} | {got['llmux_serving']:.1%} | "
                f"{got['switching_s']:.2f} | {got['p95_wait']:.2f} | {got['max_wait']:.2f} | "
                f"{'yes' if good else 'NO'}: {diffs} |")
            if got["failed"]:
                out(f"  {got['failed']} request(s) not answered 200")
            for v in got["violations"]:
                out(f"  stand-in saw: {v}")
    out(f"\nagree: switches and serving shares within {tolerance:.0%} of the sim" if ok else
        f"\nDISAGREE: beyond {tolerance:.0%} of the sim, a request failed, or the gate's rules broke")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="bursty", help="a two-model llmux profile (bench/llmux_profiles.py)")
    p.add_argument("--scale", type=float, default=0.1, help="time scale for jobs, switches and the trace")
    p.add_argument("--reps", type=int, default=3, help="live runs, each with a fresh daemon")
    p.add_argument("--tolerance", type=float, default=0.10)
    a = p.parse_args()
    return 0 if run(a.profile, a.scale, a.reps, a.tolerance) else 1


if __name__ == "__main__":
    raise SystemExit(main())
