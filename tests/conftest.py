"""Shared fixtures: real sluice apps on 127.0.0.1 port 0 in front of real stand-in backends."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from fakes import FakeBackend
from sluice import config
from sluice.app import App

from mlx_backend import mlx_server, tiny_model_dir  # noqa: F401  (session fixtures, skipped without mlx-lm)


def base_env(tmp_path, **extra) -> dict[str, str]:
    env = {"SLUICE_PORT": "0", "SLUICE_LOG_DIR": str(tmp_path / "logs"), "SLUICE_STATE_DIR": str(tmp_path / "run"),
           "SLUICE_HEALTH_INTERVAL_S": "0.2", "SLUICE_CLAUDE_BIN": str(tmp_path / "no-claude"),
           "SLUICE_SSE_KEEPALIVE_S": "30"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def backend():
    b = FakeBackend()
    yield b
    b.close()


@pytest.fixture
def make_backend():
    made = []

    def make(**kw) -> FakeBackend:
        b = FakeBackend(**kw)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


@pytest.fixture
def make_app(tmp_path):
    """make_app(env={...}, toml="...") -> a started App; every backend probed ready before it returns."""
    apps: list[App] = []

    def make(env: dict | None = None, toml: str | None = None, wait_ready: bool = True) -> App:
        e = base_env(tmp_path, **(env or {}))
        path = None
        if toml is not None:
            path = tmp_path / f"sluice-{len(apps)}.toml"
            path.write_text(toml)
        app = App(config.load(path, environ=e), environ=e).start()
        apps.append(app)
        if wait_ready:
            deadline = time.monotonic() + 5
            while call(app, "GET", "/v1/health")[2]["status"] != "ok":
                assert time.monotonic() < deadline, "backends never became ready"
                app.health.kick()
                time.sleep(0.02)
        return app
    yield make
    for a in apps:
        a.stop(timeout=2)


@pytest.fixture
def app(make_app, backend):
    """sluice with both default models on one stand-in backend, one gate, one slot."""
    return make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url})


def until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait for `pred()` with a deadline (a failure names what never happened)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def call(app_or_port, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 10):
    """One HTTP exchange; returns (status, headers, parsed JSON or raw bytes)."""
    port = app_or_port if isinstance(app_or_port, int) else app_or_port.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        try:
            parsed = json.loads(payload)
        except ValueError:
            parsed = payload
        return resp.status, resp.headers, parsed
    finally:
        conn.close()
