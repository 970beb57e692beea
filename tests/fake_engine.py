#!/usr/bin/env python3
"""An executable stand-in for an inference engine (mlx-lm / llama.cpp / vLLM server), for supervisor tests.

A real process with a real HTTP server on 127.0.0.1:--port. Every notable thing it does is appended as one
JSON line to --events (if given), so a test can count spawns and check the order of control calls even
across restarts: {"event": "start"|"listening"|"sleep"|"wake_up"|"collective_rpc"|"reset_prefix_cache"|
"chat"|"wedged", "pid": ..., ...}.

Flags:
  --start-delay S         sleep S seconds before listening (a model load); connections are refused meanwhile
  --exit-during-start     exit with code 3 instead of ever listening
  --fail-start-file PATH  the same, but only when PATH exists at start (to make later restarts fail)
  --ignore-sigterm        ignore SIGTERM (only SIGKILL stops it)
  --wedge-after N         /health answers 503 once N chat completions were served (mlx-lm after its
                          generation thread died)
  --wedge-file PATH       the same once PATH appears; the file is consumed, so a restarted engine is healthy
  --fail-sleep            POST /sleep answers 500
  --hold-start-file PATH  when PATH exists at start, consume it, log "held" (phase "start") and never listen:
                          the process blocks there until killed (a model load a test can kill mid-way)
  --hold-sleep-file PATH  the same for one POST /sleep (phase "sleep"): the call blocks until the process dies
  --hold-wake-file PATH   the same for one POST /wake_up (phase "wake_up")
  --hold-chat-file PATH   the same for one chat completion (phase "chat"): a generation in flight
Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (fixed answer; 503 while asleep or wedged),
POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping, POST /collective_rpc, POST /reset_prefix_cache.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from fakes import QuietServer   # this file's directory is on sys.path when it runs as a script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--events")
    p.add_argument("--start-delay", type=float, default=0.0)
    p.add_argument("--exit-during-start", action="store_true")
    p.add_argument("--fail-start-file")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--wedge-after", type=int)
    p.add_argument("--wedge-file")
    p.add_argument("--fail-sleep", action="store_true")
    p.add_argument("--hold-start-file")
    p.add_argument("--hold-sleep-file")
    p.add_argument("--hold-wake-file")
    p.add_argument("--hold-chat-file")
    args = p.parse_args(argv)

    lock = threading.Lock()
    st = {"sleeping": False, "level": 0, "served": 0, "wedged": False}

    def event(name: str, **fields) -> None:
        if args.events:
            line = json.dumps({"event": name, "pid": os.getpid(), "time": time.time(), **fields}) + "\n"
            fd = os.open(args.events, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def hold(path: str | None, phase: str) -> None:
        """Block forever (until the test kills this process) when `path` exists; consumed, so a restarted
        engine goes through. The "held" event is written only once the block is certain."""
        if not path:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        event("held", phase=phase)
        threading.Event().wait()

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    event("start", argv=sys.argv[1:])
    print(f"fake engine {os.getpid()} starting on port {args.port}", flush=True)
    if args.start_delay:
        time.sleep(args.start_delay)
    hold(args.hold_start_file, "start")
    if args.exit_during_start or (args.fail_start_file and os.path.exists(args.fail_start_file)):
        print("fake engine: failing during start", file=sys.stderr, flush=True)
        event("exit", code=3)
        return 3

    def wedged() -> bool:
        with lock:
            if not st["wedged"] and args.wedge_file and os.path.exists(args.wedge_file):
                try:
                    os.unlink(args.wedge_file)
                except FileNotFoundError:
                    pass
                st["wedged"] = True
                event("wedged")
            return st["wedged"]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _json(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = urlsplit(self.path).path
            if path == "/health":
                if wedged():
                    return self._json(503, {"status": "error", "error": "generation thread died"})
                return self._json(200, {"status": "ok"})
            if path == "/is_sleeping":
                return self._json(200, {"is_sleeping": st["sleeping"]})
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": [{"id": args.model, "object": "model"}]})
            self._json(404, {"error": "not found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                return self._json(400, {"error": "bad json"})
            url = urlsplit(self.path)
            if url.path == "/sleep":
                level = int(parse_qs(url.query).get("level", ["1"])[0])
                event("sleep", level=level)
                hold(args.hold_sleep_file, "sleep")
                if args.fail_sleep:
                    return self._json(500, {"error": "sleep failed"})
                with lock:
                    st["sleeping"], st["level"] = True, level
                return self._json(200, {})
            if url.path == "/wake_up":
                event("wake_up")
                hold(args.hold_wake_file, "wake_up")
                with lock:
                    st["sleeping"] = False
                return self._json(200, {})
            if url.path == "/collective_rpc":
                event("collective_rpc", method=body.get("method"))
                return self._json(200, {"results": [None]})
            if url.path == "/reset_prefix_cache":
                event("reset_prefix_cache")
                return self._json(200, {})
            if url.path == "/v1/chat/completions":
                hold(args.hold_chat_file, "chat")
                if st["sleeping"]:
                    return self._json(503, {"error": {"message": "engine is sleeping"}})
                if wedged():
                    return self._json(503, {"error": {"message": "generation thread died"}})
                with lock:
                    st["served"] += 1
                    if args.wedge_after is not None and st["served"] >= args.wedge_after and not st["wedged"]:
                        st["wedged"] = True
                        event("wedged")
                event("chat")
                return self._json(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", args.model),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake answer"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
            self._json(404, {"error": "not found"})

    server = QuietServer((args.host, args.port), Handler)
    event("listening", port=args.port)
    print(f"fake engine {os.getpid()} listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
