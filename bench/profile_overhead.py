#!/usr/bin/env python3
"""Where sluice's per-request time goes: profile the daemon under the overhead benchmark's C=1 load.

Starts the shared fake backend (delay 0) and sluice exactly as bench/overhead.py does, warms up, then
drives N requests (1 client, keep-alive, via the shared loadgen.py) while profiling sluice, and prints the
functions by CPU microseconds per request.

Two profilers, neither part of sluice (install them outside the project, e.g. in a venv):

  yappi   deterministic, every thread, CPU clock: exact call counts; its hooks slow Python code down
          (about 2-3x here), so read the µs as relative. sluice runs under --python (which must import
          yappi; sluice itself is put on sys.path). Stats are reset after the warm-up (SIGUSR1).
  py-spy  sampling (--rate Hz, --nonblocking: the target is not paused), every thread, idle frames
          dropped: unbiased shares; µs = share of samples x sluice's measured CPU per request.

    python -m venv /tmp/prof && /tmp/prof/bin/pip install yappi py-spy
    python bench/profile_overhead.py --tool yappi --python /tmp/prof/bin/python
    python bench/profile_overhead.py --tool py-spy --py-spy /tmp/prof/bin/py-spy
    python bench/profile_overhead.py --tool py-spy --py-spy /tmp/prof/bin/py-spy --mode stream -n 60

Everything on 127.0.0.1, bounded by a request count and a duration.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as ov  # noqa: E402  (bench/overhead.py: process and /proc helpers)

ROOT = ov.ROOT


def yappi_child(out: str) -> None:
    """Run sluice's daemon in this process under yappi (CPU clock, all threads); SIGUSR1 resets the stats;
    on exit write them to `out` as JSON."""
    import runpy

    import yappi
    sys.path.insert(0, str(ROOT))
    yappi.set_clock_type("cpu")
    signal.signal(signal.SIGUSR1, lambda *a: yappi.clear_stats())
    yappi.start(builtins=True, profile_threads=True)
    sys.argv = ["sluice"]
    try:
        runpy.run_module("sluice", run_name="__main__")
    except SystemExit:
        pass
    finally:
        yappi.stop()
        rows = [{"name": s.name, "module": s.module, "line": s.lineno, "ncall": s.ncall, "tsub": s.tsub,
                 "ttot": s.ttot} for s in yappi.get_func_stats()]
        Path(out).write_text(json.dumps(rows))


PATCHES = {
    "base": "sluice as it is",
    "recorder-off": "App._record_one is a no-op: no per-request log lines, JSONL, metrics or `recent`",
    "logs-off": "logging.disable(INFO): no per-request log line nor JSONL line; metrics kept",
    "switch-1ms": "sys.setswitchinterval(0.001) instead of 5 ms (how long a thread waits for the GIL at most)",
}
FLOORS = {
    "floor-threads": "not sluice: a minimal keep-alive relay, one blocking thread per connection (sluice's "
                     "model), bytes passed through unparsed",
    "floor-threads-json": "the same relay, plus json.loads/dumps of the request and json.loads of the response "
                          "(what a router must do to rewrite `model` and read `usage`)",
    "floor-threads-timeout": "the bytes relay with Python socket timeouts set before each read and send (CPython then "
                             "polls before every recv/send and settimeout is an ioctl; sluice lets the kernel "
                             "bound its waits instead)",
    "floor-threads-threads": "the bytes relay plus two idle helper threads that wake every 0.2 s and 0.5 s "
                             "(like sluice's recorder and main loop) - GIL contention check",
    "floor-asyncio": "not sluice: a minimal keep-alive relay on asyncio streams, bytes passed through",
}


def _read_head(f) -> bytes:
    lines = []
    while True:
        line = f.readline(65537)
        if not line:
            return b""
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            return int(line[15:])
    return 0


def floor_child(kind: str, port: int, up_port: int) -> None:
    """A minimal non-stream relay (Content-Length bodies only): the floor a Python router cannot go below
    on this machine. Not a router; an experiment."""
    import json as _json
    import socket
    import threading
    if kind == "floor-asyncio":
        import asyncio

        async def conn(cr, cw):
            ur, uw = await asyncio.open_connection("127.0.0.1", up_port)
            try:
                while True:
                    head = await cr.readuntil(b"\r\n\r\n")
                    body = await cr.readexactly(_length(head))
                    uw.write(head + body)
                    rhead = await ur.readuntil(b"\r\n\r\n")
                    rbody = await ur.readexactly(_length(rhead))
                    cw.write(rhead + rbody)
            except (asyncio.IncompleteReadError, ConnectionError):
                cw.close()
                uw.close()

        async def main():
            srv = await asyncio.start_server(conn, "127.0.0.1", port)
            async with srv:
                await srv.serve_forever()
        asyncio.run(main())
        return
    parse = kind == "floor-threads-json"
    timeouts = kind == "floor-threads-timeout"
    if kind == "floor-threads-threads":
        for every in (0.2, 0.5):
            threading.Thread(target=lambda e=every: [time.sleep(e) for _ in iter(int, 1)], daemon=True).start()

    def conn(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        u = socket.create_connection(("127.0.0.1", up_port))
        u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cr, ur = c.makefile("rb"), u.makefile("rb")
        try:
            while True:
                if timeouts:
                    c.settimeout(30.0)
                head = _read_head(cr)
                if not head:
                    return
                body = cr.read(_length(head))
                if timeouts:
                    u.settimeout(30.0)
                if parse:
                    obj = _json.loads(body)
                    obj["model"] = "fake-model"
                    body = _json.dumps(obj).encode()
                    head = b"\r\n".join(x for x in head.split(b"\r\n") if x[:15].lower() != b"content-length:")
                    head = head[:-2] + b"Content-Length: %d\r\n\r\n" % len(body)
                u.sendall(head + body)
                rhead = _read_head(ur)
                rbody = ur.read(_length(rhead))
                if parse:
                    _json.loads(rbody).get("usage")
                if timeouts:
                    c.settimeout(30.0)
                c.sendall(rhead + rbody)
        except OSError:
            pass
        finally:
            c.close()
            u.close()

    srv = socket.create_server(("127.0.0.1", port))
    while True:
        c, _ = srv.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()


def patched_child(name: str) -> None:
    """Run sluice's daemon in this process with one experimental change applied in memory (nothing in
    sluice's files changes): to measure what a part costs by taking it away."""
    import runpy
    tree = name[5:] if name.startswith("tree=") else None    # sluice as it is in another checkout (A/B)
    sys.path.insert(0, tree or str(ROOT))
    if name == "recorder-off":
        import sluice.app
        sluice.app.App._record_one = lambda self, *a: None
    elif name == "logs-off":
        import logging
        logging.disable(logging.INFO)
    elif name == "switch-1ms":
        sys.setswitchinterval(0.001)
    elif name != "base" and tree is None:
        raise SystemExit(f"unknown patch {name}")
    sys.argv = ["sluice"]
    runpy.run_module("sluice", run_name="__main__")


def ab(args, peers: Path, work: Path, procs: list) -> str:
    """lat_c1 (and with --mode stream, stream_c1) against direct and every variant, interleaved, `--reps`
    repetitions; medians over repetitions of each run's p50/p99 and sluice's CPU per request."""
    port = ov.free_port()
    be = ov.Proc("backend-d0", [ov.PY, str(peers / "fake_backend.py"), "--port", str(port), "--delay-ms", "0",
                                "--stream-chunks", "64", "--chunk-delay-ms", "5"], work)
    procs.append(be)
    ov.wait_ready(be, port, "/health", 15)
    variants = [v for v in args.variants.split(",") if v]
    targets = [("direct", None, f"http://127.0.0.1:{port}", "fake-model")]
    for v in variants:
        if v in FLOORS:
            fport = ov.free_port()
            p = ov.Proc(v, [sys.executable, str(Path(__file__).resolve()), "--child-floor", v, "--floor-ports",
                            f"{fport},{port}"], work)
            procs.append(p)
            _wait_tcp(p, fport)
            targets.append((v, p, f"http://127.0.0.1:{fport}", "fake-model"))
            continue
        safe = v.replace("/", "_")
        p, sport = _start_sluice_child(work / safe, port, sys.executable, ["--child-patch", v], safe)
        procs.append(p)
        targets.append((v, p, f"http://127.0.0.1:{sport}", "d0"))
    for name, p, url, model in targets:                       # warm-up, unrecorded
        ov.loadgen(peers, url, model, args.mode, 1, 300 if args.mode == "nonstream" else 3, 20, 0)
    res: dict = {t[0]: [] for t in targets}
    for rep in range(args.reps):
        order = targets if rep % 2 == 0 else targets[::-1]
        for name, p, url, model in order:
            c0 = ov.cpu_s(p.pid) if p else 0.0
            r = ov.loadgen(peers, url, model, args.mode, 1, args.requests, args.duration, 20 if args.mode ==
                           "nonstream" else 2)
            r["cpu_ms"] = 1000 * (ov.cpu_s(p.pid) - c0) / (r["ok"] + 20) if p else None
            res[name].append(r)
            ov.log(f"ab r{rep + 1} {name:<13} p50={r['latency_ms']['p50']} p99={r['latency_ms']['p99']} "
                   f"ttfb={(r.get('ttfb_ms') or {}).get('p50')} cpu/req={r['cpu_ms'] and round(r['cpu_ms'], 3)}")
    key = "latency_ms" if args.mode == "nonstream" else "ttfb_ms"
    L = [f"A/B: {args.mode}, C=1, {args.requests} requests per run, {args.reps} repetitions interleaved "
         f"(order alternating); medians over repetitions; added = variant - direct in the same repetition.", "",
         f"| variant | what | {key} p50 | added p50 | {key} p99 | added p99 | sluice CPU ms/req |",
         "|---|---|---|---|---|---|---|"]
    d50 = [r[key]["p50"] for r in res["direct"]]
    d99 = [r[key]["p99"] for r in res["direct"]]
    for name, *_ in targets:
        rs = res[name]
        p50, p99 = [r[key]["p50"] for r in rs], [r[key]["p99"] for r in rs]
        a50 = ov.med([b - a for a, b in zip(d50, p50)])
        a99 = ov.med([b - a for a, b in zip(d99, p99)])
        cpu = ov.med([r["cpu_ms"] for r in rs])
        what = PATCHES.get(name) or FLOORS.get(name) or (f"sluice from {name[5:]}" if name.startswith("tree=")
                                                          else "no router")
        L.append(f"| {name} | {what} | {ov.med(p50):.3f} | "
                 f"{'-' if name == 'direct' else f'{a50:+.3f}'} | {ov.med(p99):.3f} | "
                 f"{'-' if name == 'direct' else f'{a99:+.3f}'} | {'-' if cpu is None else f'{cpu:.3f}'} |")
    return "\n".join(L)


def micro(work: Path, n: int = 2000, repeat: int = 7) -> str:
    """Time pieces of sluice's per-request work in this process, with sluice's own objects (an App built
    from the same config as bench/overhead.py, logging set up as the daemon does, files in a temp dir).
    Each piece: `repeat` rounds of `n` calls; µs per call, median [min] of the rounds."""
    import json as _json
    import logging
    import socket
    import statistics
    import timeit
    sys.path.insert(0, str(ROOT))
    from sluice import app as app_mod
    from sluice import api, config, daemon, scheduler, server, upstream
    d = work / "micro"
    d.mkdir(parents=True, exist_ok=True)
    lsock = socket.create_server(("127.0.0.1", 0))            # a backend URL that accepts connections
    bport = lsock.getsockname()[1]
    cfg = d / "sluice.toml"
    cfg.write_text(f'[server]\nport = 0\nlog_dir = "{d / "logs"}"\nstate_dir = "{d / "state"}"\n\n'
                   f'[[gates]]\nname = "bench"\nslots = 64\n\n[[backends]]\nname = "d0"\n'
                   f'url = "http://127.0.0.1:{bport}/v1"\ngate = "bench"\n\n[[models]]\nname = "d0"\n'
                   f'upstream_model = "fake-model"\nbackends = ["d0"]\n')
    settings = config.load(cfg, environ={})
    saved_err = sys.stderr
    sys.stderr = open(d / "stderr.log", "w")                  # the daemon's stderr handler, to a file
    try:
        daemon.setup_logging(settings.log_dir)
        app = app_mod.App(settings)
    finally:
        err_file, sys.stderr = sys.stderr, saved_err
    req = _json.dumps({"model": "d0", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16,
                       "stream": False}).encode()
    resp = _json.dumps({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": "fake-model",
                        "system_fingerprint": "fp_fake", "choices": [{"index": 0, "message": {
                            "role": "assistant", "content": "Hello from the fake backend."}, "finish_reason":
                            "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 7,
                                                "total_tokens": 16}}).encode()
    entry = {"time": 1.0, "id": "abcdef012345", "route": "/v1/chat/completions", "model": "d0", "priority": 2,
             "outcome": "ok", "status": 200, "backend": "d0", "client": None, "wait_ms": 0.01, "service_ms": 0.3,
             "ttfb_ms": 0.25, "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}
    sched = app.scheduler
    sched._on_finish = None                                   # the cycle below, without the recorder
    sched.set_health("d0", scheduler.Health.READY)            # as the first probe would

    def cycle():
        job = scheduler.Job("d0", 2, "/v1/chat/completions", timeout_s=300.0)
        sched.submit(job)
        sched.wait(job, None, 10.0, 5.0)
        sched.finish(job, scheduler.Outcome.OK)
    a, b = socket.socketpair()
    watcher = app.server.watcher
    up = app.upstreams["d0"]
    conn = upstream.Conn("127.0.0.1", bport, False, 5.0)
    up._checkin(conn)
    job_done = scheduler.Job("d0", 2, "/v1/chat/completions")
    job_done.granted_at = job_done.first_byte_at = job_done.enqueued_at = 1.0
    job_done.outcome, job_done.status = scheduler.Outcome.OK, 200

    def checkout():
        c = up._checkout()
        up._checkin(c)

    def watch():
        with watcher.watch(a, lambda: None):
            pass

    human = app_mod.log
    pieces = [
        ("recorder: App._record_one (metrics + JSONL line + log line, off the request path)",
         lambda: app._record_one(job_done, 2.0, 1.0)),
        ("  metrics.record", lambda: app.metrics.record(entry, True)),
        ("  JSONL line (requests.jsonl)", lambda: app._requests_log.write_line(server.compact_json(entry))),
        ("  human log line (stderr + sluice.log)",
         lambda: human.info("req=%s route=%s model=%s prio=%d wait_ms=%.1f service_ms=%.1f outcome=%s status=%s%s",
                            "abcdef012345", "/v1/chat/completions", "d0", 2, 0.0, 0.3, "ok", 200, "")),
        ("App._record (entry built on the request thread)", lambda: app._record(job_done)),
        ("Scheduler submit + wait + finish (fast grant)", cycle),
        ("  Job() (dataclass + new_id)",
         lambda: scheduler.Job("d0", 2, "/v1/chat/completions", timeout_s=300.0)),
        ("  new_id", scheduler.new_id),
        ("DisconnectWatcher.watch enter + exit (a note in a dict)", watch),
        ("Upstream._checkout + _checkin (poll() on the idle socket)", checkout),
        ("socket.settimeout (an ioctl; sluice's BoundedSocket.limit mostly skips it)", lambda: a.settimeout(30.0)),
        ("json.loads(request body)", lambda: _json.loads(req)),
        ("with_model: the client's bytes with the model swapped", lambda: api.with_model(req, "d0", "fake-model")),
        ("  (json.dumps of the parsed body, what it replaces)", lambda: _json.dumps(_json.loads(req)).encode()),
        ("upstream.json_body(response) (for usage)", lambda: upstream.json_body(resp, "d0")),
    ]
    L = [f"In-process timings of sluice's per-request pieces ({n} calls x {repeat} rounds; µs per call, median "
         f"[min] of the rounds; this machine, 2 shared cores)", "", "| piece | µs per call |", "|---|---|"]
    for name, fn in pieces:
        try:
            rounds = [t * 1e6 / n for t in timeit.repeat(fn, number=n, repeat=repeat)]
            L.append(f"| {name} | {statistics.median(rounds):.1f} [{min(rounds):.1f}] |")
        except Exception as e:                                 # sluice is edited meanwhile: say so, go on
            L.append(f"| {name} | failed: {type(e).__name__}: {e} |")
        app._records.clear()
    app.server.server_close()
    err_file.close()
    lsock.close()
    for h in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(h)
    return "\n".join(L)


def _wait_tcp(p, port: int, timeout: float = 15.0) -> None:
    import socket
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not p.alive():
            raise RuntimeError(f"{p.name} exited; see {p.logpath}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{p.name} not listening on :{port}")


def short(module: str, name: str, line) -> str:
    m = module.replace(str(ROOT) + "/", "")
    for marker in ("/lib/python3", "/site-packages/"):
        if marker in m:
            m = m.split(marker, 1)[1].split("/", 1)[-1]
    return f"{name} ({Path(m).name}:{line})" if m else name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", choices=("yappi", "py-spy", "strace", "perf"), default="py-spy",
                    help="strace: syscalls per request (strace -c -f; slows the target a lot, counts exact); "
                    "perf: `perf stat` syscall tracepoints and context switches per request (cheap; needs root "
                    "or perf_event_paranoid <= 1)")
    ap.add_argument("--variant", default="base", help="for py-spy/strace: what to profile, one of the --ab "
                    "variants (a floor relay too)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for sluice under yappi (has yappi)")
    ap.add_argument("--py-spy", default="py-spy", help="the py-spy binary")
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--mode", choices=("nonstream", "stream"), default="nonstream")
    ap.add_argument("-n", "--requests", type=int, default=3000)
    ap.add_argument("-t", "--duration", type=float, default=30.0)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--peers-dir", default=str(ROOT.parent / "shared" / "bench-peers"))
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--ab", action="store_true", help="instead of profiling: A/B the variants below against "
                    "direct, interleaved (C=1 latency / stream TTFB and sluice CPU per request)")
    ap.add_argument("--variants", default=",".join(PATCHES), help="for --ab, a comma list from: " + "; ".join(
        f"{k}: {v}" for k, v in {**PATCHES, **FLOORS}.items()) + "; tree=DIR: sluice from another checkout "
        "(e.g. `git worktree add DIR HEAD`, to A/B an uncommitted change against the last commit)")
    ap.add_argument("--reps", type=int, default=5, help="for --ab")
    ap.add_argument("--micro", action="store_true", help="instead of profiling: time sluice's per-request "
                    "pieces in-process (recorder, scheduler cycle, watcher, JSON, ...)")
    ap.add_argument("--yappi-child", help=argparse.SUPPRESS)
    ap.add_argument("--child-patch", help=argparse.SUPPRESS)
    ap.add_argument("--child-floor", help=argparse.SUPPRESS)
    ap.add_argument("--floor-ports", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.yappi_child:
        yappi_child(args.yappi_child)
        return 0
    if args.child_patch:
        patched_child(args.child_patch)
        return 0
    if args.child_floor:
        port, up = (int(x) for x in args.floor_ports.split(","))
        floor_child(args.child_floor, port, up)
        return 0

    peers = Path(args.peers_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix="sluice-profile-"))
    procs: list[ov.Proc] = []
    if args.micro:
        text = micro(work)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    if args.ab:
        try:
            text = ab(args, peers, work, procs)
        finally:
            for p in reversed(procs):
                p.stop()
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    try:
        port = ov.free_port()
        be = ov.Proc("backend-d0", [ov.PY, str(peers / "fake_backend.py"), "--port", str(port), "--delay-ms", "0",
                                    "--stream-chunks", "64", "--chunk-delay-ms", "5"], work)
        procs.append(be)
        ov.wait_ready(be, port, "/health", 15)
        stats_path = work / "yappi.json"
        model = "d0"
        if args.tool == "yappi":
            sl, sport = _start_sluice_yappi(work, port, args.python, stats_path)
        elif args.variant in FLOORS:
            sport, model = ov.free_port(), "fake-model"
            sl = ov.Proc(args.variant, [sys.executable, str(Path(__file__).resolve()), "--child-floor", args.variant,
                                        "--floor-ports", f"{sport},{port}"], work)
            _wait_tcp(sl, sport)
        else:
            sl, sport = _start_sluice_child(work / args.variant, port, sys.executable,
                                            ["--child-patch", args.variant], args.variant)
        procs.append(sl)
        url = f"http://127.0.0.1:{sport}"
        ov.loadgen(peers, url, model, args.mode, 1, 300 if args.mode == "nonstream" else 5, 20, 0)   # warm-up
        if args.tool == "yappi":
            os.kill(sl.pid, signal.SIGUSR1)
            time.sleep(1.0)                 # the main thread runs Python signal handlers twice a second
        spy = None
        if args.tool == "py-spy":
            raw = work / "pyspy.txt"
            spy = subprocess.Popen([args.py_spy, "record", "--pid", str(sl.pid), "--rate", str(args.rate),
                                    "--nonblocking", "--format", "raw", "--output", str(raw),
                                    "--duration", str(int(args.duration) + 30)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
        if args.tool == "perf":
            raw = work / "perf.txt"
            spy = subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(raw), "-p", str(sl.pid), "-e",
                                    ",".join(PERF_EVENTS)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        if args.tool == "strace":
            raw = work / "strace.txt"
            spy = subprocess.Popen(["strace", "-c", "-f", "-p", str(sl.pid), "-o", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        cpu0 = ov.cpu_s(sl.pid)
        r = ov.loadgen(peers, url, model, args.mode, 1, args.requests, args.duration, 2)
        cpu = ov.cpu_s(sl.pid) - cpu0
        nreq = r["ok"] + 2
        if spy is not None:
            time.sleep(0.5)
            spy.send_signal(signal.SIGINT)           # py-spy and strace write their output on Ctrl-C
            spy.wait(30)
        lat = r["latency_ms"]
        head = (f"{args.variant} under {args.tool}, {args.mode}, C=1, {r['ok']} requests, p50 {lat['p50']} ms p99 "
                f"{lat['p99']} ms; sluice CPU {1000 * cpu / nreq:.3f} ms per request")
        if args.tool == "yappi":
            sl.stop()
            procs.remove(sl)
            table = yappi_table(json.loads(stats_path.read_text()), nreq, args.top)
        elif args.tool == "strace":
            table = strace_table(raw.read_text(), nreq)
        elif args.tool == "perf":
            table = perf_table(raw.read_text(), nreq)
        else:
            table = pyspy_table(raw.read_text(), 1e6 * cpu / nreq, args.top)
        text = head + "\n\n" + table
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


def _start_sluice_yappi(work: Path, backend_port: int, python: str, stats: Path):
    return _start_sluice_child(work / "sluice", backend_port, python, ["--yappi-child", str(stats)], "sluice-yappi")


def _start_sluice_child(d: Path, backend_port: int, python: str, child_args: list[str], name: str):
    """sluice's daemon run by this script in a child (`python bench/profile_overhead.py --...-child`), with
    the same config as bench/overhead.py."""
    d.mkdir(parents=True, exist_ok=True)
    port = ov.free_port()
    cfg = d / "sluice.toml"
    cfg.write_text(f'[server]\nmax_queue_depth = 1000\n\n[[gates]]\nname = "bench"\nslots = 64\n\n'
                   f'[[backends]]\nname = "d0"\nurl = "http://127.0.0.1:{backend_port}/v1"\ngate = "bench"\n\n'
                   f'[[models]]\nname = "d0"\nupstream_model = "fake-model"\nbackends = ["d0"]\n')
    env = {**ov.clean_env(), "SLUICE_CONFIG": str(cfg), "SLUICE_HOST": "127.0.0.1", "SLUICE_PORT": str(port),
           "SLUICE_LOG_DIR": str(d / "logs"), "SLUICE_STATE_DIR": str(d / "state")}
    p = ov.Proc(name, [python, str(Path(__file__).resolve()), *child_args], d.parent, env=env, cwd=ROOT)
    ov.wait_ready(p, port, "/v1/health", 60, want_ok=True)
    return p, port


def yappi_table(rows: list[dict], nreq: int, top: int) -> str:
    total = sum(r["tsub"] for r in rows)
    L = [f"yappi (CPU clock, all threads; times inflated by the profiler, total self time "
         f"{1e6 * total / nreq:.0f} µs/request)", "",
         "| function | calls/req | self µs/req | incl. µs/req | self % |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["tsub"])[:top]:
        L.append(f"| {short(r['module'], r['name'], r['line'])} | {r['ncall'] / nreq:.2f} | "
                 f"{1e6 * r['tsub'] / nreq:.1f} | {1e6 * r['ttot'] / nreq:.1f} | {100 * r['tsub'] / total:.1f} |")
    L += ["", "By inclusive time (sluice and stdlib entry points):", "",
          "| function | calls/req | incl. µs/req |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["ttot"])[:top]:
        L.append(f"| {short(r['module'], r['name'], r['line'])} | {r['ncall'] / nreq:.2f} | "
                 f"{1e6 * r['ttot'] / nreq:.1f} |")
    return "\n".join(L)


ROLES = (("process_request_thread", "request threads"), ("App._recorder", "recorder (log lines, JSONL, metrics)"),
         ("DisconnectWatcher._loop", "disconnect watcher"), ("serve_forever", "accept loop"),
         ("probe_all", "health probes"), ("_dispatch_loop", "scheduler dispatcher"))


PERF_EVENTS = ["task-clock", "context-switches", "cpu-migrations", "raw_syscalls:sys_enter"] + [
    f"syscalls:sys_enter_{n}" for n in ("futex", "poll", "ppoll", "epoll_wait", "epoll_ctl", "sendto", "recvfrom",
                                        "newfstatat", "lseek", "write", "ioctl", "getrandom", "getpid", "pselect6")]


def perf_table(raw: str, nreq: int) -> str:
    """perf stat's CSV as counts per request (timers, health probes over the run included)."""
    L = ["| event | per request |", "|---|---|"]
    for line in raw.splitlines():
        f = line.split(",")
        if len(f) >= 3 and f[0].replace(".", "").isdigit():
            v = float(f[0])
            name = f[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "all syscalls")
            L.append(f"| {name} | {v / nreq / 1000:.1f} µs |" if f[1] == "msec" and False else
                     f"| {name} | {(v * 1000 if f[1] == 'msec' else v) / nreq:.2f}{' µs CPU' if f[1] == 'msec' else ''} |")
    return "\n".join(L)


def strace_table(raw: str, nreq: int) -> str:
    """strace -c's summary as calls per request (health probes and timers over the run included)."""
    L = ["| syscall | calls/req | errors/req |", "|---|---|---|"]
    total = 0
    for line in raw.splitlines():
        f = line.split()
        if len(f) >= 5 and f[0].replace(".", "").isdigit() and f[-1] != "total":
            calls = int(f[3])
            errs = int(f[4]) if len(f) == 6 else 0
            total += calls
            L.append(f"| {f[-1]} | {calls / nreq:.2f} | {errs / nreq:.2f} |")
    L.insert(0, f"strace -c -f: {total / nreq:.1f} syscalls per request\n")
    return "\n".join(L)


def pyspy_table(raw: str, us_per_req: float, top: int) -> str:
    self_c: collections.Counter = collections.Counter()
    incl_c: collections.Counter = collections.Counter()
    roles: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or not stack:
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        roles[next((role for key, role in ROLES if any(key in fr for fr in frames)), "other")] += n
        self_c[frames[-1]] += n
        for fr in set(frames):
            incl_c[fr] += n
    if not total:
        return "py-spy recorded no samples"
    L = [f"py-spy ({total} samples of busy threads; µs = share x {us_per_req:.0f} µs CPU per request)", "",
         "| function (self) | share | µs/req |", "|---|---|---|"]
    for fr, n in self_c.most_common(top):
        L.append(f"| {fr} | {100 * n / total:.1f}% | {us_per_req * n / total:.1f} |")
    L += ["", "| function (inclusive) | share | µs/req |", "|---|---|---|"]
    for fr, n in incl_c.most_common(top):
        L.append(f"| {fr} | {100 * n / total:.1f}% | {us_per_req * n / total:.1f} |")
    L += ["", "By thread role: " + "; ".join(f"{t} {100 * n / total:.1f}% ({us_per_req * n / total:.0f} µs/req)"
                                         for t, n in roles.most_common())]
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
