#!/usr/bin/env python3
"""`sluice validate` on a real NVIDIA GPU, where vLLM itself cannot be installed (no network there).

Starts a vLLM-shaped stand-in that holds its "weights" as a CUDA tensor (torch) and really frees and
restores GPU memory on /sleep (level 1: weights to CPU; level 2: discarded, reloaded by collective_rpc
reload_weights) and /wake_up, then runs `sluice validate` against it. The table's memory columns are read
by nvidia-smi, so this checks sluice's measuring path on the real device.

    python bench/gpu_validate.py [--gib 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def serve(gib: float) -> int:
    import torch
    n = int(gib * (1 << 30) / 2)
    state = {"w": torch.ones(n, dtype=torch.float16, device="cuda"), "cpu": None, "asleep": False}

    def checksum() -> str:
        return f"{float(state['w'][:1024].float().sum()):.1f}"

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _json(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._json(200, {"status": "ok"} if self.path == "/health" else {"data": [{"id": "gpu-stand-in"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/sleep"):
                level = int(self.path.rsplit("=", 1)[1])
                state["cpu"] = state["w"].cpu() if level == 1 else None
                state["w"] = None
                state["asleep"] = True
                torch.cuda.empty_cache()
            elif self.path == "/wake_up":
                state["w"] = state["cpu"].cuda() if state["cpu"] is not None else torch.empty(n, dtype=torch.float16,
                                                                                            device="cuda")
                state["asleep"] = False
            elif self.path == "/collective_rpc":
                state["w"].fill_(1.0)          # "reload_weights"
            elif self.path == "/reset_prefix_cache":
                pass
            elif self.path.endswith("/chat/completions"):
                if state["asleep"]:
                    return self._json(503, {"error": "asleep"})
                return self._json(200, {"choices": [{"message": {"content": f"weights checksum {checksum()}"}}]})
            self._json(200, {})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    args = ap.parse_args()
    port = serve(args.gib)
    from sluice import config
    from sluice.validate import run
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "v.toml"
    cfg.write_text(f'[[backends]]\nname = "v"\nurl = "http://127.0.0.1:{port}/v1"\nswitch = "vllm-sleep-1"\n'
                   f'[[models]]\nname = "gpu"\nbackends = ["v"]\n')
    settings = config.load(cfg, environ={"SLUICE_LOG_DIR": str(tmp), "SLUICE_STATE_DIR": str(tmp / "run")})
    return run(settings, "gpu", [1, 2])


if __name__ == "__main__":
    raise SystemExit(main())
