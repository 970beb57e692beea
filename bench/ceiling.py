#!/usr/bin/env python3
"""The ceiling one sluice holds on this machine: requests/s at C=64 and C=256 clients against a 0 ms and a
50 ms backend, and sluice's memory per open stream.

Same harness as `overhead.py` (imported from it, not copied): the shared peer harness's `fake_backend.py`
(asyncio) as the stand-in backend and `loadgen.py` (asyncio, one keep-alive connection per client) as the
load; sluice as a subprocess (`python -m sluice`) with one shared gate whose slots (--slots, 512) exceed
every C and every held stream, so the gate never queues: the figure is sluice's own limit. Each scenario
runs against the backend directly and through sluice in the same repetition (order alternating); the
direct rate is the proof that the load generator and the backend are not the limit (they carry the direct
run at a higher rate on the same cores). Medians over --reps repetitions.

Memory per open stream: N streaming requests (--streams, 256) held open through sluice, each past its first
SSE event, by a third backend that sends the second event only after 10 minutes; sluice's RSS growth / N
(VmRSS, measured at N/2 and N on a fresh sluice after a warm-up), then the clients leave and the RSS after.

    python bench/ceiling.py                  # 3 repetitions, about 2.5 minutes on 2 cores
    python bench/ceiling.py --quick          # smoke run, ~30 s
    python bench/ceiling.py --reps 5 --duration 8

Everything listens on 127.0.0.1; only processes this script started are signalled, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as oh  # noqa: E402  (the harness: processes, /proc readings, loadgen runs)

ROOT, PY = oh.ROOT, oh.PY


def log(*a) -> None:
    print(f"[ceiling {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def scenarios(duration: float) -> dict:
    return {f"c{c}_{b}": dict(mode="nonstream", c=c, n=10 ** 7, t=duration, backend=b, warmup=2)
            for b in ("d0", "d50") for c in (64, 256)}


def start_backend(peers: Path, work: Path, name: str, *extra: str) -> dict:
    port = oh.free_port()
    p = oh.Proc(f"backend-{name}", [PY, str(peers / "fake_backend.py"), "--port", str(port), *extra], work)
    oh.wait_ready(p, port, "/health", 15)
    return {"port": port, "proc": p, "url": f"http://127.0.0.1:{port}"}


def active(port: int) -> int:
    return oh.get_json(port, "/v1/queue/status")[1]["active_count"]


def wait_active(port: int, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while active(port) != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"sluice has {active(port)} requests in flight, expected {want}")
        time.sleep(0.1)


def open_streams(port: int, n: int, timeout: float = 30.0) -> list[socket.socket]:
    """n streaming chat requests, each read until its first SSE event; the sockets are left open."""
    body = json.dumps({"model": "hold", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.sendall(req)
        socks.append(s)
    for s in socks:
        got = b""
        while b"data:" not in got:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"a held stream ended early: {got[:300]!r}")
            got += chunk
        if not got.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"a held stream was refused: {got[:300]!r}")
    return socks


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def stream_memory(peers: Path, work: Path, slots: int, n: int) -> dict:
    hold = start_backend(peers, work, "hold", "--stream-chunks", "2", "--chunk-delay-ms", "600000")
    sl, port, _ = oh.start_sluice("sluice-mem", work, slots, {"hold": (hold["url"] + "/v1", "fake-model")})
    try:
        for _ in range(2):                       # warm-up: the code paths and the upstream pool, then idle
            for s in open_streams(port, 16):
                s.close()
            wait_active(port, 0, 20)
        time.sleep(0.5)
        r = {"n": n, "rss0": oh.rss_kb(sl.pid), "threads0": threads(sl.pid)}
        socks = open_streams(port, n // 2)
        wait_active(port, n // 2, 20)
        r["rss_half"] = oh.rss_kb(sl.pid)
        socks += open_streams(port, n - n // 2)
        wait_active(port, n, 20)
        r["rss_n"], r["threads_n"] = oh.rss_kb(sl.pid), threads(sl.pid)
        for s in socks:
            s.close()
        wait_active(port, 0, 30)
        time.sleep(0.5)
        r["rss_after"] = oh.rss_kb(sl.pid)
        r["kb_per_stream"] = round((r["rss_n"] - r["rss0"]) / n, 1)
        r["kb_per_stream_2nd_half"] = round((r["rss_n"] - r["rss_half"]) / (n - n // 2), 1)
        return r
    finally:
        sl.stop()
        hold["proc"].stop()


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(rows: list[dict], scen: dict, duration: float) -> list[str]:
    L = ["| backend | C | direct req/s | sluice req/s [min–max] | sluice / direct | ideal req/s | sluice p50 / p99 ms | "
         "sluice CPU (cores) | loadgen CPU % (sluice runs) | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, sc in scen.items():
        rs = [r for r in rows if r["scenario"] == name]
        d = [r for r in rs if r["target"] == "direct"]
        s = [r for r in rs if r["target"] == "sluice"]
        if not d or not s:
            continue
        drate, srate = med([r["throughput_rps"] for r in d]), med([r["throughput_rps"] for r in s])
        lo, hi = min(r["throughput_rps"] for r in s), max(r["throughput_rps"] for r in s)
        spread = f" [{lo:,.0f}–{hi:,.0f}]" if len(s) > 1 else ""
        ratio = med([a["throughput_rps"] / b["throughput_rps"] for a in s for b in d if a["rep"] == b["rep"]])
        ideal = "-" if sc["backend"] == "d0" else f"{sc['c'] * 20:,}".replace(",", " ")
        p50, p99 = med([r["latency_ms"]["p50"] for r in s]), med([r["latency_ms"]["p99"] for r in s])
        cores = med([r["sluice_cpu_s"] / duration for r in s])
        lg = med([r.get("client_cpu_pct") for r in s])
        errs = sum(r["error_count"] for r in rs)
        L.append(f"| {sc['backend'][1:]} ms | {sc['c']} | {drate:,.0f} | {srate:,.0f}{spread} | {ratio:.2f} | {ideal} | "
                 f"{p50:.1f} / {p99:.1f} | {cores:.2f} | {lg:.0f} | {errs} |".replace(",", " "))
    return L


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    ap.add_argument("--streams", type=int, default=256, help="streams held open for the memory figure")
    ap.add_argument("--slots", type=int, default=512, help="the shared gate's slots (above every C: no queueing)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repetition of 2 s, 64 streams")
    ap.add_argument("--peers-dir", default=str(ROOT.parent / "shared" / "bench-peers"),
                    help="where fake_backend.py and loadgen.py are (default: ../shared/bench-peers)")
    ap.add_argument("--quiet-wait-s", type=float, default=5.0,
                    help="before each repetition, wait up to this long for other processes to calm down")
    ap.add_argument("--json", default=None, help="also write every run and the summary here")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.duration, args.streams, args.quiet_wait_s = 1, 2.0, 64, 1.0
    peers = Path(args.peers_dir).resolve()
    for need in ("fake_backend.py", "loadgen.py"):
        if not (peers / need).is_file():
            ap.error(f"{peers / need} not found (use --peers-dir)")
    if args.slots < max(256, args.streams):
        ap.error("--slots must be at least 256 and --streams, or the gate, not sluice, is the limit")
    if args.streams > 500:
        ap.error("--streams above 500 meets sluice's max_connections (512 by default) before its memory")
    scen = scenarios(args.duration)
    work = Path(tempfile.mkdtemp(prefix="sluice-ceiling-"))
    t_start = time.monotonic()
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "reps": args.reps, "duration_s": args.duration,
            "slots": args.slots, "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    log(f"load average at start {meta['loadavg_start']}; work dir {work}")

    meta["memory"] = mem = stream_memory(peers, work, args.slots, args.streams)
    log(f"memory: {mem}")

    procs: list[oh.Proc] = []
    rows: list[dict] = []
    try:
        backends = {"d0": start_backend(peers, work, "d0", "--delay-ms", "0"),
                    "d50": start_backend(peers, work, "d50", "--delay-ms", "50")}
        procs += [b["proc"] for b in backends.values()]
        sl, sport, _ = oh.start_sluice("sluice", work, args.slots,
                                       {b: (x["url"] + "/v1", "fake-model") for b, x in backends.items()})
        procs.append(sl)
        targets = [{"name": "direct", "url": lambda b: b["url"], "model": lambda bname: "fake-model"},
                   {"name": "sluice", "url": lambda b: f"http://127.0.0.1:{sport}", "model": lambda bname: bname}]
        for t in targets:                        # warm-up, unrecorded: imports, upstream pools, 256 threads
            for bname, b in backends.items():
                oh.loadgen(peers, t["url"](b), t["model"](bname), "nonstream", 256, 2000, 10, 0)
        meta["rss_after_warmup_kb"] = oh.rss_kb(sl.pid)
        for rep in range(1, args.reps + 1):
            waited, other = oh.wait_quiet(procs, args.quiet_wait_s, 0.3)
            log(f"rep {rep}: waited {waited} s for quiet, others use {other} cores")
            order = targets if rep % 2 else targets[::-1]
            for name, sc in scen.items():
                for t in order:
                    rows.append(oh.measured_run(peers, t, name, sc, rep, backends, sl))
        meta["rss_after_runs_kb"] = oh.rss_kb(sl.pid)
    finally:
        for p in reversed(procs):
            p.stop()
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["wall_s"] = round(time.monotonic() - t_start, 1)

    L = [f"sluice ceiling, {meta['started']}, {args.reps} repetition(s) of {args.duration:g} s, medians; "
         f"{meta['cpus']} cores shared by loadgen, backend and sluice; one shared gate of {args.slots} slots; "
         f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at the end; "
         f"{meta['wall_s']:.0f} s in all.", ""]
    L += table(rows, scen, args.duration)
    others = [r["other_cpu_s"] / args.duration for r in rows]
    L += ["", f"Other processes' CPU during the runs: median {med(others):.2f} cores, max {max(others):.2f}.",
          "", f"Memory: {mem['n']} streams held open through sluice: RSS {mem['rss0'] / 1024:.1f} MiB idle -> "
          f"{mem['rss_half'] / 1024:.1f} MiB at {mem['n'] // 2} -> {mem['rss_n'] / 1024:.1f} MiB at {mem['n']} "
          f"(threads {mem['threads0']} -> {mem['threads_n']}): **{mem['kb_per_stream']:.0f} KiB per open stream** "
          f"({mem['kb_per_stream_2nd_half']:.0f} KiB over the second half); {mem['rss_after'] / 1024:.1f} MiB "
          f"after they closed."]
    print("\n".join(L))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
