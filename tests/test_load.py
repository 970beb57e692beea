"""1,000 concurrent clients with mixed priorities and keys, some leaving early: every job is answered
exactly once, the counters add up, threads return to baseline and memory stays bounded."""

from __future__ import annotations

import http.client
import json
import random
import resource
import statistics
import threading
import time

from conftest import call
from test_api_native import totals_add_up, until

CLIENTS = 1000
KEYS_TOML = "\n".join(f'[[keys]]\nname = "k{i}"\nkey = "key-{i}"\n' for i in range(3)) + \
    '[[gates]]\nname = "gpu"\nslots = 4\n'


def test_thousand_concurrent_clients(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_MAX_QUEUE_DEPTH": 400, "SLUICE_MAX_CONNECTIONS": 700, "SLUICE_QUEUE_TIMEOUT": 60},
                   toml=KEYS_TOML, wait_ready=False)
    until(lambda: call(app, "GET", "/v1/health", headers={"x-api-key": "key-0"})[2]["status"] == "ok")
    baseline_threads = threading.active_count()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rng = random.Random(7)
    plan = [(i, rng.randrange(5), f"key-{rng.randrange(3)}", rng.random() < 0.05) for i in range(CLIENTS)]
    results: dict[int, tuple] = {}
    start = threading.Barrier(CLIENTS + 1)

    def client(i, prio, key, leave_early):
        start.wait()
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
        try:
            body = json.dumps({"model": "fast", "prompt": f"c{i}", "priority": prio})
            conn.request("POST", "/v1/query", body, {"Content-Type": "application/json", "x-api-key": key})
            if leave_early:
                conn.sock.close()
                results[i] = ("left", prio, 0.0)
                return
            resp = conn.getresponse()
            resp.read()
            results[i] = (resp.status, prio, float(resp.getheader("X-Sluice-Queue-Wait-Ms") or 0),
                          time.monotonic() - t0)
        except OSError as e:
            results[i] = (type(e).__name__, prio, 0.0)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=p) for p in plan]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    start.wait()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    assert len(results) == CLIENTS
    statuses = [r[0] for r in results.values()]
    assert set(statuses) <= {200, 503, "left"}, sorted(set(map(str, statuses)))
    ok = statuses.count(200)
    assert ok >= CLIENTS // 2

    # Server side: every job ended exactly once and the books balance.
    key = {"x-api-key": "key-0"}
    until(lambda: totals_add_up(app, key)["pending"] == 0 and not app.scheduler.snapshot()["active"], timeout=30)
    s = totals_add_up(app, key)
    left = statuses.count("left")
    # a client that left after its answer was computed still counts as served; no one is served twice
    assert ok <= s["total_served"] <= ok + left
    assert s["total_served"] + s["total_cancelled"] - ok == left     # each early leaver: cancelled or served
    prompts = [p for p in backend.prompts() if p]   # "" = a body cut off by a cancel before it all arrived
    assert len(prompts) == len(set(prompts))                         # nothing was ever sent twice
    assert s["total_served"] <= len(prompts) <= s["total_served"] + left
    assert s["total_rejected"] == statuses.count(503) - (CLIENTS - s["total_received"])
    ids = [e["id"] for e in app.recent]
    assert len(ids) == len(set(ids))
    assert backend.violations == [] and backend.max_seen <= 4

    # sluice's handler threads all end; what may remain are the stand-in backend's threads serving
    # sluice's pooled keep-alive connections (at most 32 idle per upstream, two upstreams here).
    until(lambda: app.server.connections.count == 0, timeout=30, what="sluice's handler threads to end")
    until(lambda: threading.active_count() <= baseline_threads + 64, timeout=30, what="threads back to baseline")
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss_after - rss_before < 300_000            # KiB: bounded, not proportional to history

    waits = {p: sorted(r[2] for r in results.values() if r[0] == 200 and r[1] == p) for p in range(5)}
    print(f"\n{CLIENTS} clients: {ok} ok, {statuses.count(503)} 503, {statuses.count('left')} left early; "
          f"{ok / elapsed:.0f} req/s")
    for p, w in waits.items():
        if w:
            print(f"  P{p}: n={len(w)} wait p50={statistics.median(w):.1f} ms "
                  f"p99={w[min(len(w) - 1, int(len(w) * 0.99))]:.1f} ms")
