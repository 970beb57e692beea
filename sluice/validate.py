"""`sluice validate MODEL [--levels 1,2]`: prove a backend can give the GPU back and come back the same.

For each sleep level: a deterministic request, sleep (timed), GPU memory, wake (timed), the same request
again, and whether the answers match. Engines without sleep mode are checked with stop + cold start.
Exit 0 only when every row passes.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import time

from sluice import errors
from sluice.backends import BackendOps, process_spec, upstream_url
from sluice.config import Settings
from sluice.monitor import Supervisor
from sluice.upstream import Upstream, json_body


def gpu_memory_mib() -> str:
    """Used GPU memory, summed over GPUs, from nvidia-smi; "n/a" where there is no way to read it."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
            values = [int(v) for v in out.stdout.split()]
            return f"{sum(values)} MiB" if out.returncode == 0 and values else "n/a"
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return "n/a"
    return "n/a"


def probe_request(up: Upstream, model_id: str, timeout: float = 300.0) -> str:
    body = {"model": model_id, "messages": [{"role": "user", "content": "Count from one to five."}],
            "max_tokens": 16, "temperature": 0, "seed": 0}
    ex = up.open("POST", "/chat/completions", json.dumps(body).encode(), time.monotonic() + timeout)
    data = ex.read(time.monotonic() + timeout)
    ex.close()
    if ex.status != 200:
        raise errors.BadGateway(f"answered {ex.status}: {data[:200]!r}")
    return json_body(data, up.name)["choices"][0]["message"]["content"]


def daemon_in_the_way(settings: Settings, managed: bool) -> str | None:
    """Why validate must not act now, when a sluice serves this configuration's port; None when free.

    validate sleeps and wakes the backend itself: beside a daemon that is routing to it, that would cut its
    requests (and on an exclusive gate, wake a model beside the resident one). So a running daemon must be
    drained and idle first, and a backend it runs (managed) cannot be validated beside it at all: a second
    copy of the process would load a second model."""
    conn = http.client.HTTPConnection(settings.host, settings.port, timeout=2)
    try:
        conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        doc = json.loads(resp.read() or b"{}")
    except (OSError, http.client.HTTPException, ValueError):
        return None                                     # nothing (or not sluice) on the port
    finally:
        conn.close()
    where = f"sluice is running on {settings.host}:{settings.port}"
    if managed:
        return f"{where} and runs this backend's process; stop sluice to validate it"
    if not isinstance(doc, dict) or doc.get("status") != "draining":
        return (f"{where}; validate puts the backend to sleep, which would cut its requests: "
                "POST /admin/drain first (POST /admin/resume after)")
    queue = doc.get("queue") or {}
    if queue.get("pending") or queue.get("active"):
        return f"{where}, drained, but requests are still queued or running; retry when they are done"
    return None


def run(settings: Settings, model_name: str, levels: list[int], out=sys.stdout) -> int:
    """Builds only the model's backend (its upstream, its process if sluice runs it): no HTTP server, so it
    runs beside a drained daemon (see daemon_in_the_way)."""
    model = next((m for m in settings.models if model_name in (m.name, *m.aliases)), None)
    if model is None:
        print(f"sluice validate: unknown model {model_name!r}; known: {', '.join(settings.model_names()[:-1])}",
              file=sys.stderr)
        return 2
    cfg = next(b for b in settings.backends if b.name == model.backends[0])
    why = daemon_in_the_way(settings, cfg.managed)
    if why is not None:
        print(f"sluice validate: {why}", file=sys.stderr)
        return 1
    spec = process_spec(cfg, settings) if cfg.managed else None
    up = Upstream(cfg.name, upstream_url(cfg, spec), cfg.api_key)
    supervisor = Supervisor([spec], settings.state_dir) if spec is not None else None
    ops = BackendOps({cfg.name: cfg}, {cfg.name: up}, supervisor)
    method = spec.sleep_method if spec is not None else cfg.switch
    rows = []
    try:
        if supervisor is not None:
            supervisor.start()
            ops.wake(cfg.name)
        baseline = probe_request(up, model.upstream_model)
        plan = [(f"L{lv}", lv) for lv in levels] if method.startswith("vllm-sleep") else [("stop", 0)]
        for label, level in plan:
            row = {"level": label, "sleep_s": None, "wake_s": None, "mem_before": gpu_memory_mib(),
                   "mem_after": "n/a", "mem_wake": "n/a", "match": "-", "pass": False, "error": ""}
            try:
                if not level and supervisor is None:
                    raise RuntimeError(f"backend {cfg.name!r} has no sleep method and is not run by sluice")
                t0 = time.monotonic()
                ops.sleep_level(cfg.name, level) if level else ops.stop(cfg.name)
                row["sleep_s"] = time.monotonic() - t0
                row["mem_after"] = gpu_memory_mib()
                t1 = time.monotonic()
                ops.wake_level(cfg.name, level) if level else ops.wake(cfg.name)
                row["wake_s"] = time.monotonic() - t1
                row["mem_wake"] = gpu_memory_mib()
                again = probe_request(up, model.upstream_model)
                row["match"] = "match" if again == baseline else "MISMATCH"
                row["pass"] = again == baseline
            except Exception as e:      # any failure is this row's FAIL, with the reason printed
                row["error"] = str(e)[:200]
            rows.append(row)
    except Exception as e:
        print(f"sluice validate: {model_name}: could not get a first answer: {e}", file=sys.stderr)
        return 1
    finally:
        if supervisor is not None:
            supervisor.stop()
        up.close()
    print(table(model_name, rows), file=out)
    return 0 if rows and all(r["pass"] for r in rows) else 1


def table(model: str, rows: list[dict]) -> str:
    fmt = "{:<7}{:>9}{:>9}{:>14}{:>14}{:>14}  {:<10}{}"
    lines = [f"validate {model}", fmt.format("Level", "Sleep s", "Wake s", "Mem before", "Mem after",
                                              "Mem wake", "Response", "Pass")]
    for r in rows:
        s = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"
        lines.append(fmt.format(r["level"], s(r["sleep_s"]), s(r["wake_s"]), r["mem_before"], r["mem_after"],
                                r["mem_wake"], r["match"], "PASS" if r["pass"] else "FAIL")
                     + (f"  ({r['error']})" if r["error"] else ""))
    return "\n".join(lines)
