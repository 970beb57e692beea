"""Command line: `sluice` (= `sluice serve`), `status`, `query`, `config`, `demo`, `service`.

Exit status: 0 ok, 1 a runtime failure (sluice down, request failed), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from sluice import __version__
from sluice.config import SCALARS, ConfigError, Settings, load
from sluice.daemon import serve


def _settings(args) -> Settings:
    return load(getattr(args, "config", None))


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
    from sluice.processes import ram_tier_idle_s, total_memory_bytes
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
    from sluice.client import SluiceClient
    client = SluiceClient(args.url, timeout=600)
    with client.chat_stream(args.model, [{"role": "user", "content": args.prompt}], priority=args.priority,
                            max_tokens=args.max_tokens) as stream:
        for piece in stream:
            print(piece, end="", flush=True)
    print()
    if stream.error:
        print(f"sluice: no complete answer from {client.url}: {stream.error}", file=sys.stderr)
        return 1
    return 0


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

    p = sub.add_parser("service", help="install, remove or check sluice as a systemd unit or launchd job")
    p.add_argument("action", choices=("install", "uninstall", "status", "show"), help="show: print the unit")
    p.add_argument("--user", action="store_true", help="a user unit / LaunchAgent (default: system-wide)")
    p.add_argument("--config", help="TOML file the service runs with")
    p.add_argument("--env-file", help="SLUICE_* settings for the service (default: /etc/sluice/sluice.env, "
                                      "or ~/.config/sluice/sluice.env with --user)")
    p.add_argument("--run-as", help="the account a system service runs as (default: root)")
    p.add_argument("--prefix", help="write under this directory instead of / and call no service manager")
    p.add_argument("--manager", choices=("systemd", "launchd"), help="default: launchd on macOS, else systemd")

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
        if args.cmd == "service":
            from sluice.service import main as service_main
            return service_main(args)
    except ConfigError as e:
        print(f"sluice: configuration error: {e}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2
