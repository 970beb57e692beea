"""What sluice shows: the JSONL request log, `sluice status`, /openapi.json, /admin/status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import call
from test_api_native import until


def read_log(app) -> list[dict]:
    path = app.settings.log_dir / "requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_request_log_lines_match_the_jobs_and_hold_no_prompt(app):
    call(app, "POST", "/v1/query", {"model": "fast", "prompt": "secret prompt text", "priority": 1})
    call(app, "POST", "/v1/chat/completions", {"model": "reasoning", "messages": [{"role": "user", "content": "x"}]})
    call(app, "POST", "/v1/query", {"model": "fast", "prompt": "!error500"})
    until(lambda: len(read_log(app)) == 3, what="three log lines")
    lines = read_log(app)
    assert [(l["route"], l["model"], l["priority"], l["outcome"], l["status"]) for l in lines] == [
        ("/v1/query", "fast", 1, "ok", 200), ("/v1/chat/completions", "reasoning", 2, "ok", 200),
        ("/v1/query", "fast", 2, "error", 502)]
    for l in lines:
        assert {"time", "id", "wait_ms", "service_ms", "ttfb_ms", "usage", "client"} <= set(l)
    assert lines[1]["usage"]["total_tokens"] == 12
    assert "secret prompt" not in (app.settings.log_dir / "requests.jsonl").read_text()


def test_prompts_logged_only_when_asked(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, "SLUICE_LOG_PROMPTS": 1})
    call(app, "POST", "/v1/query", {"model": "fast", "prompt": "log me"})
    until(lambda: (app.settings.log_dir / "requests.jsonl").exists() and read_log(app))
    assert read_log(app)[0]["prompt"] == "log me"


def test_status_cli_shows_the_running_sluice_and_exits_1_when_down(app):
    call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x"})
    env = {**os.environ, "SLUICE_URL": app.url}
    r = subprocess.run([sys.executable, "-m", "sluice", "status"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert "served 1" in r.stdout and "gpu" in r.stdout and "shared" in r.stdout and "fast" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sluice", "status", "--url", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "down" in r.stderr


def test_openapi_describes_exactly_the_route_table(app):
    spec = call(app, "GET", "/openapi.json")[2]
    described = {(m.upper(), p.split("{")[0]) for p, ops in spec["paths"].items() for m in ops}
    served = {(r.method, r.path) for r in app.server.routes.routes}
    assert described == served            # a prefix route is documented as its prefix + {parameters}
    assert "/v1/models/{model}" in spec["paths"] and "/admin/models/{name}/{action}" in spec["paths"]
    assert spec["paths"]["/v1/query"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]


def test_admin_status_shape(app, backend):
    call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x"})
    doc = call(app, "GET", "/admin/status")[2]
    assert doc["status"] == "ok" and doc["totals"]["served"] == 1
    assert doc["gates"][0]["name"] == "gpu" and doc["gates"][0]["slots"] == 1
    assert {b["name"] for b in doc["backends"]} == {"fast", "reasoning"}
    assert doc["backends"][0]["url"] == backend.url
    assert doc["queue"]["by_priority"] == {str(p): 0 for p in range(5)}
    assert doc["recent"][-1]["model"] == "fast"
    assert {m["name"]: m["aliases"] for m in doc["models"]} == {"reasoning": [], "fast": ["tiny"]}


def test_query_cli_prints_the_answer_and_streams(app):
    env = {**os.environ, "SLUICE_URL": app.url}
    r = subprocess.run([sys.executable, "-m", "sluice", "query", "fast", "hello there", "--priority", "1"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "echo: hello there"
    r = subprocess.run([sys.executable, "-m", "sluice", "query", "fast", "hi", "--stream", "--url", app.url],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "t0 t1 t2"
    r = subprocess.run([sys.executable, "-m", "sluice", "query", "fast", "x", "--url", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "sluice status" in r.stderr


def test_one_request_id_in_the_answer_and_the_log_even_when_clients_repeat_it(app):
    """The X-Request-Id a client sees is the id of its log entry (it used to be a second, unrelated id), and
    two requests carrying the same client id are still two jobs, each finished once."""
    status, headers, body = call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x"})
    mine = headers["X-Request-Id"]
    assert status == 200 and body["id"] == mine
    call(app, "POST", "/v1/chat/completions", {"model": "fast", "messages": [{"role": "user", "content": "y"}]},
         headers={"X-Request-Id": "same-1"})
    call(app, "POST", "/v1/query", {"model": "fast", "prompt": "!error500"}, headers={"X-Request-Id": "same-1"})
    until(lambda: len(read_log(app)) == 3, what="three log lines")
    assert [(l["id"], l["outcome"]) for l in read_log(app)] == [(mine, "ok"), ("same-1", "ok"), ("same-1", "error")]
    snap = app.scheduler.snapshot()
    assert snap["active"] == 0 and snap["totals"]["served"] == 2 and snap["totals"]["failed"] == 1
