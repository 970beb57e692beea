"""Command line: `sluice` (= `sluice serve`), `status`, `query`, `config`, `demo`.

Exit status: 0 ok, 1 a runtime failure (sluice down, request failed), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from sluice import __version__, logfile
from sluice.config import SCALARS, ConfigError, Settings, load


def setup_logging(log_dir: Path, verbose: bool = False) -> None:
    # The daemon's formats use neither the caller's file and line nor thread or process names; not
    # computing them saves a stack walk per record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logfile.OnceFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    err = logfile.BatchHandler(sys.stderr)
    err.setFormatter(fmt)
    root.addHandler(err)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logfile.file_handler(log_dir / "sluice.log", 10 << 20, 3)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    except OSError as e:
        logging.getLogger("sluice").warning("cannot write logs to %s (%s); logging to stderr only", log_dir, e)


def _settings(args) -> Settings:
    return load(getattr(args, "config", None))


def serve(args, settings: Settings | None = None, ready: threading.Event | None = None) -> int:
    from sluice.app import App
    settings = settings or _settings(args)
    setup_logging(settings.log_dir, getattr(args, "verbose", False))
    try:
        app = App(settings)
    except OSError as e:
        print(f"sluice: cannot listen on {settings.host}:{settings.port}: {e.strerror}; "
              "is another sluice running? (SLUICE_PORT picks another port)", file=sys.stderr)
        return 1
    wake = threading.Event()
    pending: list[int] = []

    def on_signal(signum, frame):  # only records the signal; the main thread acts on it
        pending.append(signum)
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    app.start()
    # Everything built so far lives as long as the daemon: move it out of the collector's sight, so a
    # full collection (a pause every request in flight pays) walks only what requests create.
    gc.freeze()
    print(f"sluice {__version__} listening on {app.url}", file=sys.stderr, flush=True)
    if ready is not None:
        ready.set()
    log = logging.getLogger("sluice")
    while True:
        # A timeout, not a bare wait: the kernel may deliver a signal to another thread, and Python runs
        # the handler only when the main thread next executes, so the main thread must wake up now and then.
        if not wake.wait(0.5):
            continue
        wake.clear()
        signums = []
        while pending:                      # pop one by one: a signal may land while we read
            signums.append(pending.pop(0))
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            break
        try:
            app.reload(load(getattr(args, "config", None)))
        except ConfigError as e:
            log.error("reload rejected, keeping the running configuration: %s", e)
    log.info("stopping: queued requests get 503, in-flight ones have up to %.0fs", settings.shutdown_timeout_s)
    app.stop()
    return 0


def show_config(args) -> int:
    s = _settings(args)
    out = {}
    for f in dataclasses.fields(s):
        if f.name in ("sources", "gates", "backends", "models", "keys"):
            continue
        v = getattr(s, f.name)
        if f.name == "api_keys":
            v = [k[:3] + "…" for k in v]
        out[f.name] = {"value": str(v) if isinstance(v, Path) else v,
                       "source": s.sources.get(f.name, "default"),
                       **({"env": SCALARS[f.name][0]} if f.name in SCALARS else {})}
    from sluice.supervisor import ram_tier_idle_s, total_memory_bytes
    mem = total_memory_bytes()
    out["ram_tier"] = {"total_memory_gb": round(mem / 1e9, 1) if mem else None,
                       "idle_unload_default_s": ram_tier_idle_s(mem),
                       "note": ">= 64 GB: 600 s; 24-63 GB: 300 s; < 24 GB: 180 s (backends.*.idle_unload_s overrides)"}
    out["keys"] = [{"name": k.name, "key": "***", "admin": k.admin, "max_priority": k.max_priority,
                    "models": list(k.models), "max_queued": k.max_queued} for k in s.keys]
    for key in ("gates", "backends", "models"):
        out[key] = [{k: ("***" if k == "api_key" and v else v) for k, v in dataclasses.asdict(x).items()}
                    for x in getattr(s, key)]
    print(json.dumps(out, indent=2, default=str))
    return 0


def query(args) -> int:
    from sluice.client import SluiceClient
    client = SluiceClient(args.url)
    if args.stream:
        return _stream(args)
    text = client.query(args.model, args.prompt, priority=args.priority, max_tokens=args.max_tokens)
    if not text:
        print("sluice: no answer (is sluice running? see `sluice status`)", file=sys.stderr)
        return 1
    print(text)
    return 0


def _stream(args) -> int:
    import http.client
    from urllib.parse import urlsplit
    base = urlsplit(args.url or os.environ.get("SLUICE_URL") or
                    f"http://127.0.0.1:{os.environ.get('SLUICE_PORT', '5590')}")
    body = json.dumps({"model": args.model, "stream": True, "priority": args.priority,
                       "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": args.prompt}]})
    try:
        conn = http.client.HTTPConnection(base.hostname, base.port or 80, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            print(f"sluice: {resp.status} {resp.read()[:500].decode('utf-8', 'replace')}", file=sys.stderr)
            return 1
        for line in resp:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                try:
                    delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content") or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    delta = ""
                print(delta, end="", flush=True)
        print()
        return 0
    except OSError as e:
        print(f"sluice: cannot reach {base.geturl()}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice", description="Priority-queue LLM request router for local GPUs.")
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    sub = parser.add_subparsers(dest="cmd")

    p = sub.add_parser("serve", help="run the router (the default)")
    p.add_argument("--config", help="TOML file (default: $SLUICE_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("config", help="print the resolved configuration with where each value came from")
    p.add_argument("--config")

    p = sub.add_parser("query", help="send one prompt through sluice and print the answer")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--priority", type=int, default=2, choices=range(5))
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--url", help="sluice base URL (default: $SLUICE_URL or http://127.0.0.1:$SLUICE_PORT)")

    p = sub.add_parser("status", help="show queue, gates and backends of a running sluice")
    p.add_argument("--url")
    p.add_argument("--watch", action="store_true", help="refresh every second, like top")

    p = sub.add_parser("validate", help="check that a model's backend sleeps and wakes (or restarts) cleanly")
    p.add_argument("model")
    p.add_argument("--levels", default="1,2", help="vLLM sleep levels to test (default 1,2)")
    p.add_argument("--config")

    p = sub.add_parser("demo", help="run a real tiny model on mlx_lm.server behind sluice (needs the mlx extra)")
    p.add_argument("--port", type=int, default=None)

    args = parser.parse_args(argv)
    try:
        if args.cmd in (None, "serve"):
            return serve(args)
        if args.cmd == "config":
            return show_config(args)
        if args.cmd == "query":
            return query(args)
        if args.cmd == "status":
            from sluice.status import main as status_main
            return status_main(args)
        if args.cmd == "validate":
            from sluice.validate import run
            levels = [int(x) for x in args.levels.split(",") if x.strip() in ("1", "2")]
            return run(_settings(args), args.model, levels or [1])
        if args.cmd == "demo":
            from sluice.demo import main as demo_main
            return demo_main(args)
    except ConfigError as e:
        print(f"sluice: configuration error: {e}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2
