"""Memory per in-flight request with large bodies (images): N concurrent chat requests of M MiB each through
sluice, all held in flight at the backend at once; sluice's RSS (VmRSS) before, at the peak (VmHWM) and
after, against the bodies' total.

    python bench/body_memory.py [--n 8] [--mib 16]

sluice runs as a subprocess (`python -m sluice`, one gate of N slots); the stand-in backend runs here and
answers once all N requests have arrived, so all N bodies are in sluice at the same time.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def backend(n: int):
    arrived = threading.Barrier(n + 1)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self._send(b'{"object":"list","data":[{"id":"m"}]}')

        def do_POST(self):
            left = int(self.headers["Content-Length"])
            while left:
                left -= len(self.rfile.read(min(left, 1 << 20)))      # read and drop: no copy kept here
            try:
                arrived.wait(60)
            except threading.BrokenBarrierError:
                pass
            self._send(b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
                       b'"content":"seen"},"finish_reason":"stop"}]}')

        def _send(self, data: bytes):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, arrived


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--mib", type=int, default=16)
    args = ap.parse_args()
    r = measure(args.n, args.mib)
    print(f"{args.n} x {r['body'] / 2**20:.1f} MiB bodies = {r['total'] / 2**20:.0f} MiB; statuses {r['statuses']}")
    print(f"sluice RSS before {r['before'] / 2**20:.0f} MiB, peak {r['peak'] / 2**20:.0f} MiB (growth "
          f"{(r['peak'] - r['before']) / 2**20:.0f} MiB = {r['growth']:.2f} x the bodies), after {r['after'] / 2**20:.0f} MiB")
    return 0


def measure(n: int, mib: int) -> dict:
    """Run the measurement; sluice's RSS figures, in bytes, and growth as a multiple of the bodies' total."""
    args = argparse.Namespace(n=n, mib=mib)
    srv, arrived = backend(args.n)
    work = Path(tempfile.mkdtemp(prefix="sluice-bodymem-"))
    (work / "sluice.toml").write_text(f"""
[server]
port = 0
max_body_bytes = {(args.mib + 4) << 20}
[[gates]]
name = "gpu"
slots = {args.n}
[[backends]]
name = "b"
url = "http://127.0.0.1:{srv.server_address[1]}/v1"
[[models]]
name = "m"
upstream_model = "m"
backends = ["b"]
""")
    with socket_port() as port:
        env = {**os.environ, "SLUICE_CONFIG": str(work / "sluice.toml"), "SLUICE_PORT": str(port),
               "SLUICE_LOG_DIR": str(work / "logs"), "SLUICE_STATE_DIR": str(work / "run")}
    proc = subprocess.Popen([sys.executable, "-m", "sluice"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/v1/health")
                if json.loads(c.getresponse().read())["status"] == "ok":
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("sluice did not become ready")
            time.sleep(0.1)
        image = base64.b64encode(os.urandom(args.mib * 3 << 18)).decode()          # ~mib MiB of base64
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]}).encode()
        before = vm(proc.pid, "VmRSS")
        statuses = []

        def send():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            statuses.append(c.getresponse().status)
        threads = [threading.Thread(target=send) for _ in range(args.n)]
        for t in threads:
            t.start()
        arrived.wait(120)
        for t in threads:
            t.join(120)
        peak, after = vm(proc.pid, "VmHWM"), vm(proc.pid, "VmRSS")
        total = len(body) * args.n
        return {"body": len(body), "total": total, "statuses": sorted(set(statuses)), "before": before,
                "peak": peak, "after": after, "growth": (peak - before) / total}
    finally:
        proc.terminate()
        proc.wait(10)
        srv.shutdown()


class socket_port:
    """A free port for sluice (closed again before sluice binds it)."""

    def __enter__(self) -> int:
        import socket
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.s.close()


if __name__ == "__main__":
    sys.exit(main())
