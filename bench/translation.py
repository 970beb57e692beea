"""What translation costs: the same chat request through sluice as OpenAI chat completions (forwarded as the
client's bytes), as Anthropic Messages, as OpenAI Responses and as Ollama chat (each translated to and from
chat completions), against the shared fake backend (delay 0), one client, keep-alive.

    python bench/translation.py [--n 2000] [--reps 5]

Routes are interleaved within each repetition, their order alternating; the figure is each route's p50 minus
the chat route's p50 in the same repetition (paired), medians over repetitions. Everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as ov  # noqa: E402  (the shared harness: processes, the fake backend, sluice's config)

MSG = [{"role": "user", "content": "Say hello."}]
ROUTES = {
    "chat (pass-through)": ("/v1/chat/completions", {"model": "m", "messages": MSG, "max_tokens": 16}),
    "messages (translated)": ("/v1/messages", {"model": "m", "messages": MSG, "max_tokens": 16}),
    "responses (translated)": ("/v1/responses", {"model": "m", "input": "Say hello.", "max_output_tokens": 16}),
    "ollama chat (translated)": ("/api/chat", {"model": "m", "messages": MSG, "stream": False}),
}


def run(port: int, path: str, body: dict, n: int) -> list[float]:
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            out.append((time.perf_counter() - t0) * 1000)
            if r.status != 200:
                raise RuntimeError(f"{path} answered {r.status}")
    finally:
        conn.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peers-dir", default=str(ov.ROOT.parent / "shared" / "bench-peers"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sluice-translation-"))
    peers = Path(args.peers_dir).resolve()
    bport = ov.free_port()
    backend = ov.Proc("backend", [ov.PY, str(peers / "fake_backend.py"), "--port", str(bport), "--delay-ms", "0"],
                      work)
    procs = [backend]
    try:
        ov.wait_ready(backend, bport, "/health", 15)
        sluice, port, _ = ov.start_sluice("sluice", work, 4, {"m": (f"http://127.0.0.1:{bport}/v1", "fake-model")})
        procs.append(sluice)
        names = list(ROUTES)
        for path, body in ROUTES.values():
            run(port, path, body, 200)                      # warm up every route
        added: dict[str, list[float]] = {k: [] for k in names}
        p50s: dict[str, list[float]] = {k: [] for k in names}
        for rep in range(args.reps):
            order = names if rep % 2 == 0 else names[::-1]
            got = {k: statistics.median(run(port, *ROUTES[k], args.n)) for k in order}
            for k in names:
                p50s[k].append(got[k])
                added[k].append(got[k] - got[names[0]])
        print(f"translation: C=1, {args.n} requests x {args.reps} repetitions, medians; "
              "added = route p50 - chat p50 in the same repetition\n")
        print("| route | p50 ms | added p50 ms (paired) |")
        print("|---|---|---|")
        for k in names:
            print(f"| {k} | {statistics.median(p50s[k]):.3f} | "
                  f"{'-' if k == names[0] else f'{statistics.median(added[k]):+.3f}'} |")
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
