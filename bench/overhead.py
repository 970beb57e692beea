#!/usr/bin/env python3
"""What sluice adds in front of a backend: latency, throughput, time to first byte, inter-chunk delay.

Runs the shared harness's pieces (../shared/bench-peers: fake_backend.py, loadgen.py) side by side in one
run: every scenario against the backend directly and through sluice, target order alternating per
repetition, paired overhead = sluice - direct within a repetition, medians over repetitions. With mlx-lm
installed it also times a real mlx_lm.server (tiny model) direct vs through sluice.

    python bench/overhead.py              # 3 repetitions, ~4 minutes on 2 cores
    python bench/overhead.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered on :{port}{path}")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def loadgen(peers: Path, url: str, mode: str, c: int, n: int, t: float, model: str, warmup: int = 2) -> dict:
    out = subprocess.run([sys.executable, str(peers / "loadgen.py"), "--url", url, "--mode", mode, "-c", str(c),
                          "-n", str(n), "-t", str(t), "--model", model, "--warmup", str(warmup),
                          "--max-tokens", "8"], capture_output=True, text=True, timeout=t + 120)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen printed nothing: {out.stderr[-500:]}")
    return json.loads(lines[-1])


def start_sluice(backends: dict[str, str], workdir: Path, slots: int = 64,
                 models: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    models = models or {}
    port = free_port()
    toml = f'[[gates]]\nname = "gpu"\nslots = {slots}\n'
    for name, url in backends.items():
        toml += f'[[backends]]\nname = "{name}"\nurl = "{url}"\n[[models]]\nname = "{name}"\n' \
                f'upstream_model = "{models.get(name, "fake-model")}"\nbackends = ["{name}"]\n'
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "sluice.toml"
    cfg.write_text(toml)
    env = {**os.environ, "SLUICE_CONFIG": str(cfg), "SLUICE_PORT": str(port), "SLUICE_LOG_DIR": str(workdir / "logs"),
           "SLUICE_STATE_DIR": str(workdir / "run"), "SLUICE_MAX_QUEUE_DEPTH": "1000", "SLUICE_HEALTH_INTERVAL_S": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "sluice"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_http(port, "/v1/health")
    return proc, port


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peers-dir", default=str(ROOT.parent / "shared" / "bench-peers"))
    ap.add_argument("--no-mlx", action="store_true")
    args = ap.parse_args()
    peers = Path(args.peers_dir)
    reps = 1 if args.quick else args.reps
    scale = 0.2 if args.quick else 1.0
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))

    procs = []
    ports = {}
    for name, delay in (("d0", 0), ("d50", 50)):
        ports[name] = free_port()
        procs.append(subprocess.Popen([sys.executable, str(peers / "fake_backend.py"), "--port", str(ports[name]),
                                       "--delay-ms", str(delay), "--stream-chunks", "64", "--chunk-delay-ms", "5"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(ports[name], "/health")
    sluice, sport = start_sluice({n: f"http://127.0.0.1:{p}/v1" for n, p in ports.items()}, work)
    idle_rss = None
    time.sleep(2)
    idle_rss = rss_mb(sluice.pid)
    scenarios = [  # name, backend, mode, clients, requests, seconds
        ("lat_c1", "d0", "nonstream", 1, int(500 * scale), 20),
        ("thr_c16_d0", "d0", "nonstream", 16, 200000, 10 * scale),
        ("thr_c16_d50", "d50", "nonstream", 16, 200000, 10 * scale),
        ("stream_c1", "d0", "stream", 1, int(30 * scale) or 5, 15),
    ]
    # warm sluice's upstream pools and lazy paths, unrecorded
    for name in ("d0", "d50"):
        loadgen(peers, f"http://127.0.0.1:{sport}", "nonstream", 1, 100, 10, name)
    results: dict = {}
    hz = os.sysconf("SC_CLK_TCK")
    for rep in range(reps):
        for sc, backend, mode, c, n, t in scenarios:
            order = [("direct", ports[backend], "fake-model"), ("sluice", sport, backend)]
            if rep % 2:
                order.reverse()
            for target, port, model in order:
                before = cpu_ticks(sluice.pid)
                r = loadgen(peers, f"http://127.0.0.1:{port}", mode, c, n, t, model)
                if target == "sluice":
                    reqs = r["latency_ms"]["n"]
                    r["cpu_ms_per_req"] = (cpu_ticks(sluice.pid) - before) * 1000 / hz / max(1, reqs)
                results.setdefault((sc, target), []).append(r)
    busy_rss = rss_mb(sluice.pid)

    def metric(sc, target, path):
        vals = []
        for r in results[(sc, target)]:
            v = r
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(v)
        return vals

    def paired(sc, path):
        d = metric(sc, "direct", path)
        s = metric(sc, "sluice", path)
        return [b - a for a, b in zip(d, s)]

    rows = []
    lat = ("latency_ms", "p50")
    rows.append(("C=1 non-stream p50 ms", med(metric("lat_c1", "direct", lat)), med(metric("lat_c1", "sluice", lat)),
                 f"+{med(paired('lat_c1', lat)):.3f} ms"))
    p99 = ("latency_ms", "p99")
    rows.append(("C=1 non-stream p99 ms", med(metric("lat_c1", "direct", p99)), med(metric("lat_c1", "sluice", p99)),
                 f"+{med(paired('lat_c1', p99)):.3f} ms"))
    for sc in ("thr_c16_d0", "thr_c16_d50"):
        d, s = med(metric(sc, "direct", ("throughput_rps",))), med(metric(sc, "sluice", ("throughput_rps",)))
        rows.append((f"C=16 {sc[-3:]} req/s", d, s, f"ratio {s / d:.3f}"))
    for key, label in ((("ttfb_ms", "p50"), "stream C=1 TTFB p50 ms"), (("ttfc_ms", "p50"), "stream C=1 TTFC p50 ms"),
                       (("stream_total_ms", "p50"), "stream C=1 total p50 ms")):
        rows.append((label, med(metric("stream_c1", "direct", key)), med(metric("stream_c1", "sluice", key)),
                     f"+{med(paired('stream_c1', key)):.3f} ms"))
    cpu = {sc: med(metric(sc, "sluice", ("cpu_ms_per_req",))) for sc, *_ in scenarios}

    mlx_rows = [] if args.no_mlx else mlx_bench(work, reps)
    for p in procs + [sluice]:
        p.terminate()
    for p in procs + [sluice]:
        p.wait(10)

    lines = [f"sluice overhead, {reps} repetition(s), medians; {os.cpu_count()} cores shared by load generator, "
             "backend and sluice", "", "| metric | direct | sluice | sluice - direct (paired) |", "|---|---|---|---|"]
    lines += [f"| {m} | {d:.3f} | {s:.3f} | {o} |" for m, d, s, o in rows + mlx_rows]
    lines += ["", "sluice CPU per request: " + ", ".join(f"{k} {v:.3f} ms" for k, v in cpu.items()),
              f"sluice RSS: idle {idle_rss:.1f} MB, after the runs {busy_rss:.1f} MB"]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text + "\n")
    return 0


def mlx_bench(work: Path, reps: int) -> list:
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from mlx_backend import DirectServer
        from sluice.tinymodel import build
    except ImportError:
        return []
    server = DirectServer(build(work / "tiny"), work)
    model = str(work / "tiny")
    sluice, sport = start_sluice({"mlx": server.url}, work / "s2", slots=4, models={"mlx": model})

    def one(port, stream):
        body = json.dumps({"model": model if port == server.port else "mlx", "max_tokens": 16, "temperature": 0,
                           "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        first = None
        while True:
            chunk = r.read1(65536) if stream else r.read()
            if first is None:
                first = time.perf_counter() - t0
            if not chunk or not stream:
                break
        total = time.perf_counter() - t0
        c.close()
        return total * 1000, first * 1000

    try:
        for port in (server.port, sport):
            for _ in range(5):
                one(port, False)
        lat = {"direct": [], "sluice": []}
        ttfb = {"direct": [], "sluice": []}
        for i in range(50 * reps):
            for target, port in ((("direct", server.port), ("sluice", sport))[::1 if i % 2 else -1]):
                lat[target].append(one(port, False)[0])
                ttfb[target].append(one(port, True)[1])
        d, s = med(lat["direct"]), med(lat["sluice"])
        dt, st = med(ttfb["direct"]), med(ttfb["sluice"])
        return [("mlx_lm.server C=1 16 tokens, ms", d, s, f"+{s - d:.3f} ms (ratio {s / d:.3f})"),
                ("mlx_lm.server stream TTFB ms", dt, st, f"+{st - dt:.3f} ms")]
    finally:
        sluice.terminate()
        sluice.wait(10)
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
