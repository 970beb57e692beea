"""Session fixtures for a real mlx_lm.server on the tiny offline model (skipped where mlx-lm is absent)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


class DirectServer:
    """An mlx_lm.server process the test suite started itself (not supervised by sluice)."""

    def __init__(self, model_dir: Path, workdir: Path, timeout: float = 90):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cache = workdir / "hf-cache"
        cache.mkdir(parents=True, exist_ok=True)     # must exist (and be empty), or /v1/models breaks
        self.log = workdir / f"mlx-{self.port}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
                                          "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlx_lm.server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_direct_server(model_dir: Path, workdir: Path) -> DirectServer:
    return DirectServer(model_dir, workdir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("mlx_lm", reason="needs mlx-lm: pip install -e '.[mlx]'")
    from sluice.tinymodel import build
    return build(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def mlx_server(tiny_model_dir, tmp_path_factory):
    server = DirectServer(tiny_model_dir, tmp_path_factory.mktemp("mlx"))
    yield server
    server.stop()
