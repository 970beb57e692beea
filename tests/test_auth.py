"""API keys: every non-public route needs one, admin routes an admin key; per-key limits; safe defaults."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest

from conftest import base_env, call
from sluice import config
from sluice.app import App
from sluice.config import ConfigError
from test_api_native import pending, until

KEYS_TOML = """
[[keys]]
name = "alice"
key = "alice-secret-key"
max_priority = 2
models = ["fast"]
max_queued = 1

[[keys]]
name = "ops"
key_env = "OPS_KEY"
admin = true
"""


@pytest.fixture
def keyed(make_app, backend):
    return make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                     "OPS_KEY": "ops-secret-key"}, toml=KEYS_TOML, wait_ready=False)


ALICE = {"Authorization": "Bearer alice-secret-key"}
OPS = {"x-api-key": "ops-secret-key"}


def test_every_non_public_route_needs_a_key(keyed):
    for route in keyed.server.routes.routes:
        if route.public:
            continue
        path = route.path + ("fast/load" if route.prefix else "")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "alice-secret-keyX"}):
            status, _, body = call(keyed, route.method, path, {}, headers=headers)
            assert status == 401, (route.path, headers, body)
            err = body["error"]
            assert err["type"] == "authentication_error" if isinstance(err, dict) else "API key" in err


def test_admin_routes_need_an_admin_key(keyed):
    assert call(keyed, "GET", "/admin/status", headers=ALICE)[0] == 403
    assert call(keyed, "GET", "/metrics", headers=ALICE)[0] == 403
    status, _, body = call(keyed, "GET", "/admin/status", headers=OPS)
    assert status == 200
    text = str(body)
    assert "alice-secret-key" not in text and "ops-secret-key" not in text


def test_health_is_open_but_says_nothing_without_a_key(keyed, backend):
    until(lambda: call(keyed, "GET", "/v1/health", headers=OPS)[2]["status"] == "ok")
    status, _, body = call(keyed, "GET", "/v1/health")
    assert status == 200 and body == {"status": "ok"}
    assert backend.url in str(call(keyed, "GET", "/v1/health", headers=ALICE)[2])


def test_key_limits_models_and_clamps_priority(keyed, backend):
    until(lambda: call(keyed, "GET", "/v1/health", headers=OPS)[2]["status"] == "ok")
    status, _, body = call(keyed, "POST", "/v1/query", {"model": "reasoning", "prompt": "x"}, headers=ALICE)
    assert status == 403 and "may not use model" in body["error"]
    status, headers, _ = call(keyed, "POST", "/v1/query", {"model": "fast", "prompt": "x", "priority": 0},
                              headers=ALICE)
    assert status == 200 and headers["X-Sluice-Priority-Clamped"] == "0->2"
    assert call(keyed, "POST", "/v1/query", {"model": "reasoning", "prompt": "x", "priority": 0},
                headers=OPS)[0] == 200


def test_max_queued_gives_429_to_that_key_alone(keyed, backend):
    until(lambda: call(keyed, "GET", "/v1/health", headers=OPS)[2]["status"] == "ok")
    backend.holding = True
    ts = [threading.Thread(target=call, args=(keyed, "POST", "/v1/query", {"model": "fast", "prompt": p}),
                           kwargs={"headers": h}) for p, h in (("run", OPS), ("q1", ALICE))]
    ts[0].start()
    assert backend.wait_arrivals(1)
    ts[1].start()
    until(lambda: pending(keyed) == 1)
    status, headers, body = call(keyed, "POST", "/v1/query", {"model": "fast", "prompt": "q2"}, headers=ALICE)
    assert status == 429 and headers["Retry-After"] and body["status"] == "rejected"
    other = threading.Thread(target=call, args=(keyed, "POST", "/v1/query", {"model": "fast", "prompt": "q3"}),
                             kwargs={"headers": OPS})
    other.start()
    until(lambda: pending(keyed) == 2)                       # another key still gets in
    backend.release_all()
    for t in ts + [other]:
        t.join(10)


def test_keys_never_reach_the_log(keyed, backend, caplog):
    until(lambda: call(keyed, "GET", "/v1/health", headers=OPS)[2]["status"] == "ok")
    with caplog.at_level(logging.DEBUG):
        call(keyed, "POST", "/v1/query", {"model": "fast", "prompt": "x"}, headers=ALICE)
        call(keyed, "POST", "/v1/query", {"model": "fast", "prompt": "x"}, headers={"Authorization": "Bearer nope-nope"})
    assert "alice-secret-key" not in caplog.text and "nope-nope" not in caplog.text


def test_non_loopback_bind_without_keys_refuses_to_start(tmp_path):
    env = base_env(tmp_path, SLUICE_HOST="0.0.0.0")
    with pytest.raises(ConfigError) as e:
        App(config.load(environ=env), environ=env)
    assert "SLUICE_API_KEYS" in str(e.value) and "SLUICE_ALLOW_UNAUTHENTICATED" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "sluice"], env={**env, "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "SLUICE_ALLOW_UNAUTHENTICATED" in r.stderr


def test_bad_key_config_names_the_path(tmp_path):
    p = tmp_path / "k.toml"
    p.write_text('[[keys]]\nname = "x"\nkey_env = "MISSING_VAR"\n')
    with pytest.raises(ConfigError, match="keys.x.key_env: environment variable MISSING_VAR is not set"):
        config.load(p, environ={})
    p.write_text('[[keys]]\nname = "x"\nkey = "k"\nmax_priority = 7\n')
    with pytest.raises(ConfigError, match="keys.x.max_priority: must be <= 4"):
        config.load(p, environ={})
