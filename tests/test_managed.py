"""sluice running its own backends (real processes): lazy start, one spawn for many first requests, idle
unload, crash -> 502 then restart, FAILED -> 503 fast, admin load/unload, status."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from conftest import call
from test_api_native import until

ENGINE = Path(__file__).with_name("fake_engine.py")


def managed_toml(events: Path, extra_args: str = "", **backend) -> str:
    cmd = [sys.executable, str(ENGINE), "--port", "{port}", "--model", "{model}", "--events", str(events)]
    cmd += extra_args.split()
    opts = "\n".join(f"{k} = {json.dumps(v)}" for k, v in backend.items())
    return f"""
[[backends]]
name = "eng"
command = {json.dumps(cmd)}
model_path = "tiny"
{opts}

[[models]]
name = "fast"
backends = ["eng"]
"""


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def chat(app, text="hi", timeout=30):
    return call(app, "POST", "/v1/chat/completions",
                {"model": "fast", "messages": [{"role": "user", "content": text}]}, timeout=timeout)


def backend_info(app) -> dict:
    return call(app, "GET", "/admin/status")[2]["backends"][0]


def test_lazy_start_on_first_requests_spawns_once(make_app, tmp_path):
    ev = tmp_path / "events.jsonl"
    app = make_app(toml=managed_toml(ev, "--start-delay 0.3", idle_unload_s=0))
    assert events(ev) == [] and backend_info(app)["state"] == "stopped"
    results = []
    threads = [threading.Thread(target=lambda: results.append(chat(app)[0])) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 6
    assert [e["event"] for e in events(ev)].count("start") == 1
    info = backend_info(app)
    assert info["state"] == "ready" and info["pid"] and info["managed"]


def test_idle_unload_then_the_next_request_starts_it_again(make_app, tmp_path):
    ev = tmp_path / "events.jsonl"
    app = make_app(toml=managed_toml(ev, idle_unload_s=0.5))
    assert chat(app)[0] == 200
    until(lambda: backend_info(app)["state"] == "stopped", timeout=10, what="idle unload")
    assert chat(app)[0] == 200
    assert [e["event"] for e in events(ev)].count("start") == 2


def test_killed_mid_request_gives_502_then_it_restarts(make_app, tmp_path):
    ev = tmp_path / "events.jsonl"
    app = make_app(toml=managed_toml(ev, "--start-delay 0", idle_unload_s=0))
    assert chat(app)[0] == 200
    pid = backend_info(app)["pid"]
    os.kill(pid, signal.SIGKILL)
    status, _, body = chat(app)
    if status == 200:                                  # the restart may already have happened
        assert backend_info(app)["pid"] != pid
    else:
        assert status == 502, body
    until(lambda: chat(app)[0] == 200, timeout=20, what="served after restart")
    info = backend_info(app)
    assert info["pid"] != pid and info["restarts"] >= 1


def test_exit_during_start_fails_fast_with_503_and_the_reason(make_app, tmp_path):
    ev = tmp_path / "events.jsonl"
    app = make_app(toml=managed_toml(ev, "--exit-during-start", start_retries=0, idle_unload_s=0))
    status, _, body = chat(app, timeout=20)
    assert status == 503, body
    until(lambda: backend_info(app)["state"] == "failed", what="FAILED")
    assert "exit" in (backend_info(app)["last_error"] or "")
    status, _, body = chat(app, timeout=5)
    assert status == 503


def test_admin_load_and_unload(make_app, tmp_path):
    ev = tmp_path / "events.jsonl"
    app = make_app(toml=managed_toml(ev, idle_unload_s=0))
    status, _, body = call(app, "POST", "/admin/models/fast/load")
    assert status == 200 and body["backends"] == ["eng"] and backend_info(app)["state"] == "ready"
    status, _, _ = call(app, "POST", "/admin/models/fast/unload")
    assert status == 200 and backend_info(app)["state"] == "stopped"
    assert call(app, "POST", "/admin/models/nope/load")[0] == 404
    assert call(app, "POST", "/admin/models/fast/explode")[0] == 404


def test_stopping_sluice_stops_its_children(make_app, tmp_path):
    ev = tmp_path / "events.jsonl"
    app = make_app(toml=managed_toml(ev, idle_unload_s=0))
    assert chat(app)[0] == 200
    pid = backend_info(app)["pid"]
    app.stop(timeout=5)
    try:
        os.kill(pid, 0)
        alive = Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except ProcessLookupError:
        alive = False
    assert not alive
