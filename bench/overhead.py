#!/usr/bin/env python3
"""What sluice adds in front of an OpenAI-compatible backend: latency, throughput, TTFB, inter-chunk delay.

Follows the method of the shared peer harness (../shared/bench-peers/README.md) and reuses its
`fake_backend.py` and `loadgen.py` by path (not copied):

  * two fake backends, delay 0 ms (d0) and 50 ms (d50), both streaming 64 chunks 5 ms apart;
  * sluice as a subprocess (`python -m sluice`, TOML config and log dir in a temp dir) with one gate of
    --slots (64) slots, so nothing queues: what is measured is the router itself;
  * every scenario against the backend directly and through sluice, back to back, the target order
    alternating per repetition; paired overhead = sluice - direct within a repetition; medians over
    repetitions with [min-max];
  * sluice's CPU per request from /proc/<pid>/stat (utime+stime, warm-up requests included), its RSS
    (VmRSS) idle after start-up, after the warm-up and after the runs; per run the CPU used by anything
    else on the machine (`other_cpu_s`, a noise flag), and before each scenario a bounded wait for quiet;
  * with mlx-lm importable, a real mlx_lm.server on the tiny offline model (sluice/tinymodel.py): C=1
    chat completions (max_tokens 16) and streams, direct vs through sluice, alternating per request.

Scenarios: lat_c1 (non-stream, 1 client, 500 requests), thr_c16_d0 / thr_c16_d50 (16 clients, 10 s),
stream_c1 (30 streams, 1 client), stream_c16 (16 clients, 10 s).

    python bench/overhead.py                  # 3 repetitions, about 6 minutes on 2 cores
    python bench/overhead.py --quick          # smoke run, under a minute
    python bench/overhead.py --reps 5 --scenarios lat_c1,stream_c1 --no-mlx

Results: bench/results/overhead-<stamp>.md and .json (every run's loadgen line plus the summary).
Everything listens on 127.0.0.1; every load loop is bounded by a count and a duration; only processes
this script started are signalled, by PID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")

SCENARIOS = {   # the shared harness's scenarios (run_peers.py SCENARIOS)
    "lat_c1": dict(mode="nonstream", c=1, n=500, t=20.0, backend="d0", warmup=20),
    "thr_c16_d0": dict(mode="nonstream", c=16, n=200000, t=10.0, backend="d0", warmup=2),
    "thr_c16_d50": dict(mode="nonstream", c=16, n=200000, t=10.0, backend="d50", warmup=2),
    "stream_c1": dict(mode="stream", c=1, n=30, t=15.0, backend="d0", warmup=2),
    "stream_c16": dict(mode="stream", c=16, n=5000, t=10.0, backend="d0", warmup=1),
}
CHUNKS, CHUNK_MS = 64, 5

# Targets from the OpenAI-API issue.
TARGET_P50_MS, TARGET_P99_MS, TARGET_TTFB_MS = 0.3, 2.0, 1.0
TARGET_INTERCHUNK_MS = 0.5      # "no added inter-chunk delay": first content event -> end grows <= 0.5 ms

# Anchors from ../shared/bench-peers/README.md (run summary-20261122-111501, 5 reps, quiet machine).
PEERS = {
    "LiteLLM": {"p50_add": 12.75, "p99_add": 18.85, "d0_rps": 103, "d50_ratio": 0.281, "ttfc_add": 12.81,
                "cpu_c1": 13.0, "rss_idle_mb": 317},
    "Portkey": {"p50_add": 1.22, "p99_add": 7.69, "d0_rps": 1471, "d50_ratio": 0.932, "ttfc_add": 28.32,
                "cpu_c1": 2.15, "rss_idle_mb": 81},
    "vLLM router": {"p50_add": 0.19, "p99_add": 0.23, "d0_rps": 12287, "d50_ratio": 0.982, "ttfc_add": 0.62,
                    "cpu_c1": 0.14, "rss_idle_mb": 79},
}


def log(*a) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- /proc: process-tree CPU and RSS, machine busy time ---------------------------------------------------

def _children() -> dict[int, list[int]]:
    m: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                s = Path(f"/proc/{d}/stat").read_text()
                m.setdefault(int(s[s.rindex(")") + 2:].split()[1]), []).append(int(d))
            except (OSError, ValueError):
                pass
    return m


def tree(pid: int) -> list[int]:
    m, out, stack = _children(), [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(m.get(p, []))
    return out


def cpu_s(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            s = Path(f"/proc/{p}/stat").read_text()
            f = s[s.rindex(")") + 2:].split()
            total += int(f[11]) + int(f[12])          # utime + stime
        except (OSError, ValueError):
            pass
    return total / CLK


def rss_kb(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def sys_busy_s() -> float:
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK


# ---- processes ---------------------------------------------------------------------------------------------

class Proc:
    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict | None = None, cwd: Path | None = None):
        self.name = name
        self.logpath = logdir / f"{name}.log"
        self._log = open(self.logpath, "wb")
        self.p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.p.poll() is None:
            kids = tree(self.pid)[1:]
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
            for k in kids:                           # descendants it left behind, by PID
                try:
                    os.kill(k, signal.SIGTERM)
                except OSError:
                    pass
        self._log.close()


def get_json(port: int, path: str, timeout: float = 2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        return r.status, (json.loads(body) if body[:1] in (b"{", b"[") else None)
    finally:
        c.close()


def wait_ready(proc: Proc, port: int, path: str, timeout: float, want_ok: bool = False) -> float:
    """Poll until GET path answers 200 (and, with want_ok, a JSON body whose status is "ok")."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up; log {proc.logpath}:\n"
                               f"{proc.logpath.read_text(errors='replace')[-2000:]}")
        try:
            status, doc = get_json(port, path)
            last = (status, doc)
            if status == 200 and (not want_ok or (isinstance(doc, dict) and doc.get("status") == "ok")):
                return time.monotonic() - t0
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout}s on :{port}{path} (last answer {last})")


def clean_env() -> dict:
    """The caller's environment minus SLUICE_* (a stray SLUICE_API_KEYS or SLUICE_CONFIG would change what
    is measured)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}


def start_sluice(name: str, work: Path, slots: int, backends: dict[str, tuple[str, str]]) -> tuple[Proc, int, float]:
    """backends: model name -> (upstream base URL ending in /v1, upstream model id)."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    toml = ["[server]", "max_queue_depth = 1000", "", "[[gates]]", 'name = "bench"', f"slots = {slots}", ""]
    for model, (url, upstream) in backends.items():
        toml += ["[[backends]]", f'name = "{model}"', f'url = "{url}"', 'gate = "bench"', "",
                 "[[models]]", f'name = "{model}"', f'upstream_model = "{upstream}"', f'backends = ["{model}"]', ""]
    cfg = d / "sluice.toml"
    cfg.write_text("\n".join(toml))
    env = {**clean_env(), "SLUICE_CONFIG": str(cfg), "SLUICE_HOST": "127.0.0.1", "SLUICE_PORT": str(port),
           "SLUICE_LOG_DIR": str(d / "logs"), "SLUICE_STATE_DIR": str(d / "state"), "PYTHONUNBUFFERED": "1"}
    p = Proc(name, [PY, "-m", "sluice"], work, env=env, cwd=ROOT)
    ready = wait_ready(p, port, "/v1/health", 60, want_ok=True)
    return p, port, ready


def wait_quiet(mine: list[Proc], max_wait_s: float, cores: float) -> tuple[float, float]:
    """Wait (bounded) until processes other than ours use < `cores` CPU over 1 s. -> (waited s, other cores)."""
    t0 = time.monotonic()
    while True:
        c0, b0 = sum(cpu_s(p.pid) for p in mine), sys_busy_s()
        time.sleep(1.0)
        b1, c1 = sys_busy_s(), sum(cpu_s(p.pid) for p in mine)
        other = max(0.0, (b1 - b0) - (c1 - c0))
        waited = time.monotonic() - t0
        if other < cores or waited >= max_wait_s:
            return round(waited, 1), round(other, 2)


# ---- load ----------------------------------------------------------------------------------------------------

def loadgen(peers: Path, url: str, model: str, mode: str, c: int, n: int, t: float, warmup: int,
            label: str = "") -> dict:
    argv = [PY, str(peers / "loadgen.py"), "--url", url, "--model", model, "--mode", mode, "-c", str(c),
            "-n", str(n), "-t", str(t), "--warmup", str(warmup), "--timeout", "60", "--label", label]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=t + 180)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen printed nothing (rc {r.returncode}): {r.stderr[-1500:]}")
    return json.loads(lines[-1])


def measured_run(peers: Path, target: dict, scen_name: str, sc: dict, rep: int, backends: dict,
                 sluice: Proc) -> dict:
    b = backends[sc["backend"]]
    url, model = target["url"](b), target["model"](sc["backend"])
    watch = {"sluice": sluice, "backend": b["proc"]}
    cpu0 = {k: cpu_s(p.pid) for k, p in watch.items()}
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = sys_busy_s()
    res = loadgen(peers, url, model, sc["mode"], sc["c"], sc["n"], sc["t"], sc["warmup"],
                  f"{scen_name}/{target['name']}/r{rep}")
    busy1 = sys_busy_s()
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = {k: cpu_s(p.pid) - cpu0[k] for k, p in watch.items()}
    lg = (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
    res.update(scenario=scen_name, target=target["name"], rep=rep, backend_cpu_s=round(used["backend"], 3),
               sluice_cpu_s=round(used["sluice"], 3), loadgen_cpu_s=round(lg, 3),
               machine_busy_s=round(busy1 - busy0, 3), loadavg_1m=os.getloadavg()[0])
    # other processes' CPU during the run: machine busy minus backend, loadgen and (when it is the target)
    # sluice; sluice's idle CPU during a direct run (health probes) counts as "other" there
    mine = lg + used["backend"] + (used["sluice"] if target["name"] == "sluice" else 0.0)
    res["other_cpu_s"] = round(busy1 - busy0 - mine, 3)
    nreq = res["ok"] + sc["warmup"] * sc["c"]
    if target["name"] == "sluice":
        res["sluice_rss_kb"] = rss_kb(sluice.pid)
        if res["ok"]:
            res["sluice_cpu_ms_per_req"] = round(1000 * used["sluice"] / nreq, 4)
    if res["ok"]:
        res["backend_cpu_ms_per_req"] = round(1000 * used["backend"] / nreq, 4)
    lat = res.get("latency_ms") or {}
    extra = f" ttfb_p50={res['ttfb_ms']['p50']}" if res.get("ttfb_ms") else ""
    log(f"{scen_name:<11} {target['name']:<6} r{rep} ok={res['ok']} err={res['error_count']} "
        f"rps={res['throughput_rps']} p50={lat.get('p50')} p99={lat.get('p99')}{extra} "
        f"cpu/req={res.get('sluice_cpu_ms_per_req', '-')} other_cpu={res['other_cpu_s']}")
    return res


# ---- summary -------------------------------------------------------------------------------------------------

def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


def rng(xs):
    xs = [x for x in xs if x is not None]
    return [round(min(xs), 4), round(max(xs), 4)] if xs else None


def dig(r: dict | None, path: str):
    cur = r
    for k in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(k)
    return cur if isinstance(cur, (int, float)) else None


NONSTREAM = ["throughput_rps", "latency_ms.p50", "latency_ms.p90", "latency_ms.p99", "latency_ms.max"]
STREAM = ["throughput_rps", "ttfb_ms.p50", "ttfb_ms.p99", "ttfc_ms.p50", "ttfc_ms.p99", "stream_total_ms.p50",
          "stream_total_ms.p99", "events_per_stream", "chunk_span_ms"]
EXTRA = ["sluice_cpu_ms_per_req", "backend_cpu_ms_per_req", "client_cpu_pct", "other_cpu_s", "sluice_rss_kb"]


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:                 # first content event -> end of stream: what inter-chunk delay would grow
        if r["mode"] == "stream" and dig(r, "stream_total_ms.p50") is not None and dig(r, "ttfc_ms.p50") is not None:
            r["chunk_span_ms"] = {"p50": round(r["stream_total_ms"]["p50"] - r["ttfc_ms"]["p50"], 3)}
    for s in dict.fromkeys(r["scenario"] for r in rows):
        srows = [r for r in rows if r["scenario"] == s]
        metrics = STREAM if srows[0]["mode"] == "stream" else NONSTREAM
        direct = {r["rep"]: r for r in srows if r["target"] == "direct"}
        out[s] = {}
        for t in ("direct", "sluice"):
            trows = sorted((r for r in srows if r["target"] == t), key=lambda r: r["rep"])
            d: dict = {"reps": len(trows), "errors": sum(r["error_count"] for r in trows),
                       "error_kinds": {}, "connections_opened": [r.get("connections_opened") for r in trows]}
            for r in trows:
                for k, v in r["errors"].items():
                    d["error_kinds"][k] = d["error_kinds"].get(k, 0) + v
            for m in metrics + EXTRA:
                vals = [dig(r, m) if "." in m else (r.get(m) if m != "chunk_span_ms" else dig(r, m + ".p50"))
                        for r in trows]
                if any(v is not None for v in vals):
                    d[m] = {"median": med(vals), "range": rng(vals), "values": vals}
            if t == "sluice":
                vs = {}
                for m in metrics:
                    diffs, ratios = [], []
                    for r in trows:
                        key = m + ".p50" if m == "chunk_span_ms" else m
                        a, b = dig(r, key), dig(direct.get(r["rep"]), key)
                        if a is None or b is None:
                            continue
                        diffs.append(a - b)
                        if b:
                            ratios.append(a / b)
                    vs[m] = {"diff_median": med(diffs), "diff_range": rng(diffs),
                             "ratio_median": med(ratios), "ratio_range": rng(ratios)}
                d["vs_direct"] = vs
            out[s][t] = d
    return out


def f(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) >= 1000:
        return f"{x:,.0f}".replace(",", " ")
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def cell(d: dict | None, m: str, nd=3) -> str:
    v = (d or {}).get(m)
    if not v:
        return "-"
    lo, hi = v["range"]
    return f"{f(v['median'], nd)} [{f(lo, nd)}–{f(hi, nd)}]" if lo != hi else f(v["median"], nd)


def pair(d: dict | None, m: str, kind: str = "diff", nd=3) -> tuple[str, float | None]:
    v = ((d or {}).get("vs_direct") or {}).get(m)
    if not v or v.get(kind + "_median") is None:
        return "-", None
    x, (lo, hi) = v[kind + "_median"], v[kind + "_range"]
    sign = "+" if kind == "diff" and x >= 0 else ""
    txt = f"{sign}{f(x, nd)}" + (f" [{f(lo, nd)}..{f(hi, nd)}]" if lo != hi else "")
    return txt, x


def verdict(x: float | None, limit: float) -> str:
    return "-" if x is None else ("**met**" if x <= limit else "**missed**")


def markdown(summ: dict, meta: dict, mlx: dict | None) -> str:
    L = [f"# sluice overhead ({meta['started']})", "",
         f"{meta['reps']} repetition(s), target order alternating per repetition; medians over repetitions "
         f"[min–max]; paired = sluice − direct within a repetition. Machine: {meta['cpus']} cores shared by "
         f"load generator, fake backend and sluice ({meta['platform']}, Python {meta['python']}); sluice "
         f"{meta.get('sluice_version')} with one gate of {meta['slots']} slots (nothing queues).", ""]
    L += ["| scenario | metric | direct | sluice | sluice − direct (paired) | target | |", "|---|---|---|---|---|---|---|"]
    g = summ.get

    def row(sc, label, m, nd=3, kind="diff", target=None, limit=None):
        if not g(sc):
            return
        txt, x = pair(g(sc)["sluice"], m, kind, 3 if kind == "ratio" else nd)
        if kind == "ratio":
            txt = "ratio " + txt
        L.append(f"| {sc} | {label} | {cell(g(sc)['direct'], m, nd)} | {cell(g(sc)['sluice'], m, nd)} | {txt} | "
                 f"{target or ''} | {verdict(x, limit) if limit is not None else ''} |")

    row("lat_c1", "p50 ms", "latency_ms.p50", target=f"≤ {TARGET_P50_MS} ms", limit=TARGET_P50_MS)
    row("lat_c1", "p99 ms", "latency_ms.p99", target=f"≤ {TARGET_P99_MS} ms", limit=TARGET_P99_MS)
    row("lat_c1", "req/s", "throughput_rps", 1, "ratio")
    row("thr_c16_d0", "req/s", "throughput_rps", 1, "ratio")
    row("thr_c16_d0", "p50 ms", "latency_ms.p50")
    row("thr_c16_d50", "req/s (ideal 320)", "throughput_rps", 1, "ratio")
    row("thr_c16_d50", "p50 ms", "latency_ms.p50")
    row("thr_c16_d50", "p99 ms", "latency_ms.p99")
    row("stream_c1", "TTFB p50 ms", "ttfb_ms.p50", target=f"≤ {TARGET_TTFB_MS} ms", limit=TARGET_TTFB_MS)
    row("stream_c1", "TTFC p50 ms", "ttfc_ms.p50")
    row("stream_c1", "total p50 ms (ideal ≈ 315)", "stream_total_ms.p50", 2)
    row("stream_c1", "first chunk → end p50 ms (63 gaps)", "chunk_span_ms", 2,
        target=f"≤ {TARGET_INTERCHUNK_MS} ms", limit=TARGET_INTERCHUNK_MS)
    row("stream_c16", "TTFB p50 ms", "ttfb_ms.p50")
    row("stream_c16", "TTFC p50 ms", "ttfc_ms.p50")
    row("stream_c16", "TTFC p99 ms", "ttfc_ms.p99")
    row("stream_c16", "total p50 ms", "stream_total_ms.p50", 2)
    row("stream_c16", "streams/s", "throughput_rps", 2, "ratio")
    if mlx and mlx.get("rows"):
        for label, d, s, diffs, target, limit in mlx["rows"]:
            x = med(diffs)
            L.append(f"| mlx | {label} | {f(med(d))} | {f(med(s))} | {'+' if (x or 0) >= 0 else ''}{f(x)} "
                     f"[p25 {f(q(diffs, .25))} .. p75 {f(q(diffs, .75))}] | {target or ''} | "
                     f"{verdict(x, limit) if limit is not None else ''} |")
    L.append("")
    # CPU and memory
    cpu = [f"{s} {f(g(s)['sluice'].get('sluice_cpu_ms_per_req', {}).get('median'))}" for s in summ
           if g(s)["sluice"].get("sluice_cpu_ms_per_req")]
    bcpu = [f"{s} {f(g(s)['direct'].get('backend_cpu_ms_per_req', {}).get('median'))}" for s in summ
            if g(s)["direct"].get("backend_cpu_ms_per_req")]
    rss = meta.get("rss_kb", {})
    L += ["sluice CPU ms per request (per stream for stream_*; warm-up requests included): " + ", ".join(cpu) + ".",
          "Fake backend CPU ms per request on direct runs, for scale: " + ", ".join(bcpu) + ".",
          f"sluice RSS (VmRSS, process tree): idle after start-up {rss.get('idle', 0) / 1000:.1f} MB, after warm-up "
          f"{rss.get('after_warmup', 0) / 1000:.1f} MB, after the runs {rss.get('after_runs', 0) / 1000:.1f} MB; "
          f"start-up to healthy {meta.get('sluice_startup_s', 0):.2f} s.", ""]
    if mlx and mlx.get("note"):
        L += [f"mlx: {mlx['note']}", ""]
    errs = {f"{s}/{t}": g(s)[t]["error_kinds"] for s in summ for t in ("direct", "sluice") if g(s)[t]["errors"]}
    L += [f"Errors: {json.dumps(errs) if errs else 'none'}. Connections opened per run (16 = one per client): "
          + "; ".join(f"{s} {g(s)['sluice']['connections_opened']}" for s in summ) + ".", ""]
    # peers
    s50 = pair(g("lat_c1", {}).get("sluice"), "latency_ms.p50")[1] if g("lat_c1") else None
    s99 = pair(g("lat_c1", {}).get("sluice"), "latency_ms.p99")[1] if g("lat_c1") else None
    d0 = dig(g("thr_c16_d0", {}).get("sluice"), "throughput_rps.median") if g("thr_c16_d0") else None
    r50 = pair(g("thr_c16_d50", {}).get("sluice"), "throughput_rps", "ratio")[1] if g("thr_c16_d50") else None
    ttfc = pair(g("stream_c1", {}).get("sluice"), "ttfc_ms.p50")[1] if g("stream_c1") else None
    c1 = dig(g("lat_c1", {}).get("sluice"), "sluice_cpu_ms_per_req.median") if g("lat_c1") else None
    L += ["Against the peers (anchors from `../shared/bench-peers/README.md`, run 20261122-111501, 5 reps, same "
          "harness and machine type; not re-measured in this run):", "",
          "| | C=1 p50 added ms | C=1 p99 added ms | C=16 d0 req/s | C=16 d50 ratio | stream TTFC added ms "
          "| CPU ms/req C=1 | idle RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for name, p in PEERS.items():
        L.append(f"| {name} | +{p['p50_add']} | +{p['p99_add']} | {p['d0_rps']} | {p['d50_ratio']} | "
                 f"+{p['ttfc_add']} | {p['cpu_c1']} | {p['rss_idle_mb']} |")
    def sg(x):
        return "-" if x is None else f"{'+' if x >= 0 else ''}{f(x)}"
    L.append(f"| **sluice (this run)** | {sg(s50)} | {sg(s99)} | {f(d0, 0)} | {f(r50)} | {sg(ttfc)} | {f(c1)} | "
             f"{rss.get('idle', 0) / 1000:.0f} |")
    L.append("")
    # noise
    noise = []
    for s in summ:
        for t in ("direct", "sluice"):
            oc = g(s)[t].get("other_cpu_s")
            if oc:
                noise.append(f"{s}/{t} {f(oc['median'], 2)} [{f(oc['range'][0], 2)}..{f(oc['range'][1], 2)}]")
    L += ["Noise: CPU seconds used by other processes during each run (machine busy − backend − loadgen − sluice; "
          "runs last ~0.1–15 s), median [range]: " + "; ".join(noise) + ".",
          f"Waits for quiet before scenario groups (s): {meta.get('quiet_waits')}; load average at start "
          f"{meta.get('loadavg_start')}, at end {meta.get('loadavg_end')}.", ""]
    return "\n".join(L)


def q(xs, p):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(p * len(xs)))]


# ---- mlx_lm.server ---------------------------------------------------------------------------------------------

class OwnMlxServer:
    """mlx_lm.server on the tiny model, started here (the same command and environment sluice's demo uses),
    for when sluice.demo has no start_mlx_server."""

    def __init__(self, model_dir: Path, work: Path):
        cache = work / "hf-cache"
        cache.mkdir(parents=True, exist_ok=True)      # must exist and be empty, or /v1/models breaks
        self.port = free_port()
        env = {**clean_env(), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        self.proc = Proc("mlx-server", [PY, "-m", "mlx_lm", "server", "--model", str(model_dir), "--host",
                                        "127.0.0.1", "--port", str(self.port)], work, env=env)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        wait_ready(self.proc, self.port, "/health", 120)

    def stop(self):
        self.proc.stop()


def start_mlx(model_dir: Path, work: Path):
    """-> (server with .port/.url/.stop(), its pid, how it was started)."""
    try:
        from sluice.demo import start_mlx_server          # written alongside this script by another engineer
    except ImportError:
        s = OwnMlxServer(model_dir, work)
        return s, s.proc.pid, "started by bench/overhead.py (sluice.demo.start_mlx_server not available)"
    s = start_mlx_server(model_dir, log_path=work / "mlx-server.log", ready_timeout=120)
    return s, s.proc.pid, "started with sluice.demo.start_mlx_server"


def chat(conn: http.client.HTTPConnection, model: str, stream: bool, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    ttfb = time.perf_counter() - t0
    out = {"status": r.status, "ttfb": ttfb * 1000}
    if not stream:
        data = r.read()
        out["total"] = (time.perf_counter() - t0) * 1000
        try:
            out["tokens"] = json.loads(data)["usage"]["completion_tokens"]
        except (ValueError, KeyError, TypeError):
            out["tokens"] = None
        return out
    buf, events = b"", 0
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        if "ttfc" not in out and b"data:" in buf + chunk:
            out["ttfc"] = (time.perf_counter() - t0) * 1000
        buf = (buf + chunk)[-16:]
        events += chunk.count(b"data:")
    out["total"] = (time.perf_counter() - t0) * 1000
    out["events"] = events
    return out


def mlx_bench(work: Path, n: int, slots: int) -> dict:
    if importlib.util.find_spec("mlx_lm") is None:
        note = "skipped: mlx_lm is not importable (pip install mlx-lm)"
        log(note)
        return {"note": note}
    try:
        from sluice.tinymodel import build
    except ImportError as e:
        note = f"skipped: sluice.tinymodel.build is not available yet ({e})"
        log(note)
        return {"note": note}
    import mlx.core as mx
    mdir = build(work / "tiny-model")
    t0 = time.monotonic()
    server, server_pid, how = start_mlx(mdir, work)
    log(f"mlx_lm.server on :{server.port} ({how}) in {time.monotonic() - t0:.1f} s")
    sl, sport, _ = start_sluice("sluice-mlx", work, slots, {"mlx": (server.url, str(mdir))})
    try:
        conns = {"direct": http.client.HTTPConnection("127.0.0.1", server.port, timeout=60),
                 "sluice": http.client.HTTPConnection("127.0.0.1", sport, timeout=60)}
        models = {"direct": str(mdir), "sluice": "mlx"}
        for t in conns:                                       # warm-up, unrecorded
            for stream in (False, True, False, True, False):
                chat(conns[t], models[t], stream, 16)
        res = {k: {t: [] for t in conns} for k in ("lat", "ttfb", "ttfc", "stotal", "tokens")}
        cpu0 = cpu_s(sl.pid)
        statuses = []
        for i in range(n):
            order = ["direct", "sluice"] if i % 2 == 0 else ["sluice", "direct"]
            for t in order:
                r = chat(conns[t], models[t], False, 16)
                statuses.append(r["status"])
                res["lat"][t].append(r["total"])
                res["tokens"][t].append(r["tokens"])
            for t in order[::-1]:
                r = chat(conns[t], models[t], True, 16)
                statuses.append(r["status"])
                res["ttfb"][t].append(r["ttfb"])
                res["ttfc"][t].append(r.get("ttfc"))
                res["stotal"][t].append(r["total"])
        cpu = cpu_s(sl.pid) - cpu0
        for c in conns.values():
            c.close()
    finally:
        sl.stop()
        server.stop()
    bad = [s for s in statuses if s != 200]

    def diffs(k):
        return [b - a for a, b in zip(res[k]["direct"], res[k]["sluice"]) if a is not None and b is not None]
    rows = [("C=1 16 tokens non-stream, ms", res["lat"]["direct"], res["lat"]["sluice"], diffs("lat"), None, None),
            ("stream TTFB ms", res["ttfb"]["direct"], res["ttfb"]["sluice"], diffs("ttfb"),
             f"≤ {TARGET_TTFB_MS} ms", TARGET_TTFB_MS),
            ("stream TTFC ms", res["ttfc"]["direct"], res["ttfc"]["sluice"], diffs("ttfc"), None, None),
            ("stream total ms", res["stotal"]["direct"], res["stotal"]["sluice"], diffs("stotal"), None, None)]
    toks = [x for x in res["tokens"]["direct"] if x is not None]
    note = (f"mlx_lm.server {importlib.metadata.version('mlx-lm')} on the tiny random-weights model "
            f"({mx.default_device()}), {how}; {n} pairs each of non-stream and stream requests, alternating which "
            f"target goes first, one keep-alive client connection per target (mlx_lm.server answers HTTP/1.0 and "
            f"closes, so its connection reopens every request, direct and from sluice alike); completion tokens "
            f"per request median {med(toks)}; non-200 answers: {len(bad)}; sluice CPU "
            f"{1000 * cpu / max(1, 2 * n):.3f} ms per request. Paired column: median of per-pair differences "
            f"[p25 .. p75].")
    return {"rows": rows, "note": note, "raw": res, "statuses_non200": bad, "server_pid": server_pid}


# ---- main -------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, tiny counts, under a minute")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list from: " + ", ".join(SCENARIOS))
    ap.add_argument("--peers-dir", default=str(ROOT.parent / "shared" / "bench-peers"),
                    help="where fake_backend.py and loadgen.py are (default: ../shared/bench-peers)")
    ap.add_argument("--slots", type=int, default=64, help="slots of sluice's gate (enough not to queue)")
    ap.add_argument("--no-mlx", action="store_true", help="skip the mlx_lm.server scenario")
    ap.add_argument("--mlx-n", type=int, default=50, help="request pairs in the mlx scenario")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--quiet-wait-s", type=float, default=30.0,
                    help="before each scenario group, wait up to this long for other processes to calm down")
    ap.add_argument("--quiet-cores", type=float, default=0.3, help="'quiet' = others use < this many cores")
    ap.add_argument("--pause-s", type=float, default=0.5, help="pause between runs")
    ap.add_argument("--idle-settle-s", type=float, default=5.0, help="wait after start-up before idle RSS")
    ap.add_argument("--keep-work", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()

    peers = Path(args.peers_dir).resolve()
    for need in ("fake_backend.py", "loadgen.py"):
        if not (peers / need).is_file():
            ap.error(f"{peers / need} not found (use --peers-dir)")
    names = [s for s in args.scenarios.split(",") if s]
    for s in names:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s}")
    scen = {k: dict(SCENARIOS[k]) for k in names}
    if args.quick:
        args.reps, args.mlx_n, args.quiet_wait_s, args.idle_settle_s = 1, min(args.mlx_n, 10), 3.0, 1.0
        for v in scen.values():
            v["n"] = min(v["n"], 60 if v["mode"] == "nonstream" else 4)
            v["t"] = min(v["t"], 2.0)
            v["warmup"] = min(v["warmup"], 2)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="sluice-overhead-"))
    sys.path.insert(0, str(ROOT))
    try:
        import sluice
        version = getattr(sluice, "__version__", None)
    except ImportError:
        version = None
    meta = {"started": stamp, "reps": args.reps, "quick": args.quick, "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "sluice_version": version,
            "slots": args.slots, "scenarios": scen, "peers_dir": str(peers), "work": str(work),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "quiet_waits": []}
    log(f"work dir {work}; peers {peers}")
    procs: list[Proc] = []
    rows: list[dict] = []
    mlx = None
    try:
        backends = {}
        for name, delay in (("d0", 0), ("d50", 50)):
            port = free_port()
            p = Proc(f"backend-{name}", [PY, str(peers / "fake_backend.py"), "--port", str(port), "--delay-ms",
                                         str(delay), "--stream-chunks", str(CHUNKS), "--chunk-delay-ms",
                                         str(CHUNK_MS), "--models", "fake-model"], work)
            procs.append(p)
            wait_ready(p, port, "/health", 15)
            backends[name] = {"port": port, "proc": p, "url": f"http://127.0.0.1:{port}"}
        sluice, sport, ready = start_sluice(
            "sluice", work, args.slots, {b: (f"{x['url']}/v1", "fake-model") for b, x in backends.items()})
        procs.append(sluice)
        meta["sluice_startup_s"] = round(ready, 3)
        time.sleep(args.idle_settle_s)
        meta["rss_kb"] = {"idle": rss_kb(sluice.pid)}
        meta["backend_idle_rss_kb"] = rss_kb(backends["d0"]["proc"].pid)
        log(f"sluice pid {sluice.pid} on :{sport}, healthy in {ready:.2f} s, idle RSS {meta['rss_kb']['idle']} kB")

        targets = [
            {"name": "direct", "url": lambda b: b["url"], "model": lambda bname: "fake-model"},
            {"name": "sluice", "url": lambda b: f"http://127.0.0.1:{sport}", "model": lambda bname: bname},
        ]
        # warm-up, unrecorded (lazy imports, upstream connection pools), like the shared harness
        for t in targets:
            for bname, b in backends.items():
                for mode, n in (("nonstream", 100 if not args.quick else 20), ("stream", 3)):
                    w = loadgen(peers, t["url"](b), t["model"](bname), mode, 4, n, 20, 0)
                    if w["error_count"]:
                        log(f"warm-up {t['name']} {bname} {mode} errors: {w['errors']}")
        meta["rss_kb"]["after_warmup"] = rss_kb(sluice.pid)
        log("warm-up done")

        for rep in range(1, args.reps + 1):
            order = targets if rep % 2 == 1 else targets[::-1]
            for s in names:
                waited, other = wait_quiet(procs, args.quiet_wait_s, args.quiet_cores)
                meta["quiet_waits"].append([rep, s, waited, other])
                if waited >= 2:
                    log(f"waited {waited:.0f} s for other load to drop (now {other} cores)")
                for t in order:
                    rows.append(measured_run(peers, t, s, scen[s], rep, backends, sluice))
                    time.sleep(args.pause_s)
        meta["rss_kb"]["after_runs"] = rss_kb(sluice.pid)
        meta["backend_stats"] = {}
        for bname, b in backends.items():
            try:
                meta["backend_stats"][bname] = get_json(b["port"], "/stats")[1]
            except (OSError, http.client.HTTPException, ValueError) as e:
                meta["backend_stats"][bname] = repr(e)
        for p in procs:        # free the cores before the mlx part
            p.stop()
        procs.clear()
        if args.no_mlx:
            mlx = {"note": "skipped (--no-mlx)"}
        else:
            mlx = mlx_bench(work, args.mlx_n, 4)
    finally:
        for p in reversed(procs):
            p.stop()
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    summ = summarize(rows)
    md = markdown(summ, meta, mlx)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    mdp, jsp = out / f"overhead-{stamp}.md", out / f"overhead-{stamp}.json"
    mdp.write_text(md + "\n")
    mlx_json = None
    if mlx:
        mlx_json = {k: v for k, v in mlx.items() if k != "rows"}
        mlx_json["rows"] = [{"metric": r[0], "direct_median": med(r[1]), "sluice_median": med(r[2]),
                             "paired_diff_median": med(r[3]), "target": r[4]} for r in mlx.get("rows", [])]
    jsp.write_text(json.dumps({"meta": meta, "summary": summ, "mlx": mlx_json, "runs": rows}, indent=1) + "\n")
    print(md)
    log(f"wrote {mdp} and {jsp}")
    if not args.keep_work:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
