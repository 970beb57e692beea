#!/usr/bin/env python3
"""Soak: sluice (a real daemon process) under mixed load with faults, sampling its memory and threads.

    python bench/soak.py --minutes 30          # the full run (prints a curve every --sample-s)
    python bench/soak.py --minutes 1 --clients 8

Load: --clients closed-loop clients on 127.0.0.1 with random priorities, streamed and not, native and
OpenAI routes; ~10 % of requests inject a fault at the stand-in backend (500, reset, invalid JSON, a stream
that dies, a hang past the caller's timeout) and ~5 % of clients hang up early. Every loop is bounded by
the duration. At the end: counters must add up, a normal request must succeed, RSS and thread count
should be flat after warm-up.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fakes import FakeBackend  # noqa: E402  (the same real HTTP stand-in the tests use)

FAULTS = ["!error500", "!reset", "!garbage", "!stream_die", "!hang"]


def proc_stat(pid: int) -> tuple[int, int]:
    """(RSS KiB, threads) of a process, from /proc."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def one_request(port: int, rng: random.Random, counts: dict, lock: threading.Lock) -> None:
    fault = rng.random() < 0.10
    prompt = rng.choice(FAULTS) if fault else f"hello {rng.randrange(10 ** 6)}"
    stream = rng.random() < 0.3
    native = not stream and rng.random() < 0.5
    body = ({"model": "fast", "prompt": prompt, "priority": rng.randrange(5), "timeout": 2} if native else
            {"model": rng.choice(["fast", "reasoning"]), "stream": stream, "priority": rng.randrange(5),
             "messages": [{"role": "user", "content": prompt}]})
    path = "/v1/query" if native else "/v1/chat/completions"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        if rng.random() < 0.05:
            conn.sock.close()
            key = "hung_up"
        else:
            resp = conn.getresponse()
            resp.read()
            key = str(resp.status)
    except (OSError, http.client.HTTPException) as e:
        key = type(e).__name__
    finally:
        conn.close()
    with lock:
        counts[key] = counts.get(key, 0) + 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--sample-s", type=float, default=10.0)
    args = ap.parse_args()

    backend = FakeBackend(chunks=8, chunk_delay=0.01)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    env = {**os.environ, "SLUICE_PORT": "0", "SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
           "SLUICE_LOG_DIR": str(tmp), "SLUICE_STATE_DIR": str(tmp / "run"), "SLUICE_MAX_QUEUE_DEPTH": "200",
           "SLUICE_QUEUE_TIMEOUT": "5"}
    daemon = subprocess.Popen([sys.executable, "-m", "sluice"], env=env, cwd=ROOT, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True)
    port = 0
    for line in daemon.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    threading.Thread(target=lambda: [None for _ in daemon.stderr], daemon=True).start()  # keep the pipe drained

    counts: dict = {}
    lock = threading.Lock()
    end = time.monotonic() + args.minutes * 60

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            one_request(port, rng, counts, lock)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for w in workers:
        w.start()
    print("| t (s) | RSS (MB) | threads | requests so far |")
    print("|---:|---:|---:|---:|")
    samples = []
    start = time.monotonic()
    while time.monotonic() < end:
        time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
        rss, threads = proc_stat(daemon.pid)
        samples.append((rss, threads))
        print(f"| {time.monotonic() - start:.0f} | {rss / 1024:.1f} | {threads} | {sum(counts.values())} |",
              flush=True)
    for w in workers:
        w.join(30)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/query", json.dumps({"model": "fast", "prompt": "still there?"}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    final = resp.status
    conn.request("GET", "/v1/queue/status")
    q = json.loads(conn.getresponse().read())
    balanced = q["total_received"] == (q["total_served"] + q["total_rejected"] + q["total_timeouts"]
                                       + q["total_cancelled"] + q["total_errors"] + q["pending"] + q["active_count"])
    daemon.send_signal(signal.SIGTERM)
    rc = daemon.wait(30)
    backend.close()
    print(f"\nclient-side outcomes: {dict(sorted(counts.items()))}")
    print(f"sluice counters: received {q['total_received']}, served {q['total_served']}, errors "
          f"{q['total_errors']}, timeouts {q['total_timeouts']}, cancelled {q['total_cancelled']}, "
          f"rejected {q['total_rejected']}; add up: {balanced}")
    third = max(1, len(samples) // 3)
    print(f"RSS after warm-up {samples[third - 1][0] / 1024:.1f} MB -> end {samples[-1][0] / 1024:.1f} MB; "
          f"threads {samples[third - 1][1]} -> {samples[-1][1]}; final request {final}; exit code {rc}")
    return 0 if balanced and final == 200 and rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
