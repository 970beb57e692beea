"""Hostile input: generated methods, paths, headers and bodies for every route. No 500, no hang, and the
counters still add up and a normal request still works afterwards."""

from __future__ import annotations

import http.client
import json
import os
import socket
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import call
from test_api_native import totals_add_up

# Total generated requests across this file's hypothesis tests (the issue asks for >= 10,000).
FUZZ_EXAMPLES = int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "4000"))   # 4000 + 4000 + 2000 requests
ALLOWED_5XX = {502, 503, 504}     # backend failure / unavailable / timeout are answers, not crashes

# /admin/drain is left out on purpose: it works, and then every later request is (rightly) refused.
PATHS = ["/v1/query", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/health",
         "/v1/queue/status", "/admin/status", "/admin/models/fast/wake", "/metrics", "/", "/ui", "/openapi.json",
         "/../../etc/passwd", "/static/../../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd", "/v1/query?x=1",
         "//v1//query", "/v1/query/"]
FIELDS = ["model", "prompt", "system", "max_tokens", "temperature", "priority", "timeout", "messages", "stream",
          "stream_options", "input", "max_completion_tokens", "tools"]
MODELS = ["fast", "tiny", "reasoning", "cloud", "", "nope"]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
                      st.sampled_from(MODELS))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                           "content": st.one_of(st.text(max_size=30), json_leaf)}), max_size=3)
body_dict = st.dictionaries(st.sampled_from(FIELDS), st.one_of(json_value, messages, st.sampled_from(MODELS)),
                            max_size=7)
bodies = st.one_of(body_dict.map(lambda d: json.dumps(d).encode()), json_value.map(lambda v: json.dumps(v).encode()),
                   st.binary(max_size=200))
header_text = st.text(alphabet=string.ascii_letters + string.digits + " -_.:/;=,", max_size=30)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    from conftest import base_env
    from fakes import FakeBackend
    from sluice import config
    from sluice.app import App
    backend = FakeBackend()
    tmp = tmp_path_factory.mktemp("fuzz")
    env = base_env(tmp, SLUICE_FAST_URL=backend.url, SLUICE_REASONING_URL=backend.url,
                   SLUICE_QUEUE_TIMEOUT=3, SLUICE_MAX_BODY_BYTES=4096)
    app = App(config.load(environ=env), environ=env).start()
    app.health.probe_all()
    yield app
    app.stop(timeout=2)
    backend.close()


def send(app, method: str, path: str, headers: dict, body: bytes | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if method != "HEAD" and resp.getheader("Content-Type", "").startswith("application/json"):
            json.loads(data)              # every JSON answer parses, errors included
        return resp.status
    finally:
        conn.close()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
       path=st.sampled_from(PATHS), body=bodies,
       headers=st.dictionaries(st.sampled_from(["X-Sluice-Priority", "X-Request-Id", "Content-Type",
                                                "Authorization", "x-api-key", "Accept"]), header_text, max_size=3))
def test_generated_requests_never_500(fuzz_app, method, path, body, headers):
    status = send(fuzz_app, method, path, headers, body if method != "GET" else None)
    assert status < 500 or status in ALLOWED_5XX, (method, path, body[:80], status)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=body_dict, stream=st.booleans(), path=st.sampled_from(["/v1/query", "/v1/chat/completions",
                                                                  "/v1/completions", "/v1/embeddings"]))
def test_generated_bodies_on_the_json_routes(fuzz_app, body, stream, path):
    body.setdefault("model", "fast")
    if path == "/v1/chat/completions":
        body["stream"] = stream
    status = send(fuzz_app, "POST", path, {"Content-Type": "application/json"}, json.dumps(body).encode())
    assert status < 500 or status in ALLOWED_5XX, (path, body, status)


@settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=st.one_of(st.binary(max_size=300),
                     st.builds(lambda m, p, h: m + b" " + p + b" HTTP/1.1\r\n" + h + b"\r\n",
                               st.sampled_from([b"GET", b"POST", b"G\x00T", b""]),
                               st.binary(max_size=40), st.binary(max_size=120))))
def test_raw_garbage_on_the_socket(fuzz_app, raw):
    with socket.create_connection(("127.0.0.1", fuzz_app.port), timeout=10) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if data:
        assert not data.startswith(b"HTTP/1.1 500") and not data.startswith(b"HTTP/1.0 500"), data[:200]


def test_after_the_fuzzing_everything_still_works(fuzz_app):
    status, _, body = call(fuzz_app, "POST", "/v1/query", {"model": "fast", "prompt": "still alive?"})
    assert status == 200 and body["result"] == "echo: still alive?"
    s = totals_add_up(fuzz_app)
    assert s["pending"] == 0 and s["active"] is False


def test_path_traversal_on_the_dashboard_is_404(fuzz_app):
    for path in ("/../pyproject.toml", "/static/../../README.md", "/%2e%2e/sluice/app.py", "/ui/../../etc/passwd"):
        assert call(fuzz_app, "GET", path)[0] == 404
