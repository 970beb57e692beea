"""`sluice demo`: a real model server behind sluice in one command, offline; and the helpers that start a
plain `mlx_lm.server` child process (the test suite's real backend, benchmarks).

Builds the tiny random-weights model (sluice/tinymodel.py), has sluice's supervisor run `mlx_lm.server` on
it for the `fast` (alias `tiny`) and `reasoning` models, and serves. Ctrl-C stops sluice and the child.

Facts about mlx_lm.server (0.32) the helpers rely on:
- `python -m mlx_lm server` is the supported spelling (`-m mlx_lm.server` prints a deprecation notice).
- `GET /health` answers {"status": "ok"} (200) once the HTTP server listens; the model itself loads on the
  generation thread meanwhile, so the first request may wait for it. If that thread dies (for example the
  model cannot be loaded) the process keeps running and /health answers 503 {"status": "unavailable"}.
- `GET /v1/models` scans the Hugging Face cache: HF_HUB_CACHE must name an existing directory (an empty one
  lists just the served model), or the endpoint fails. HF_HUB_OFFLINE=1 stops any network lookup.
- `/v1/models` lists the served directory as `str(Path(dir).resolve())`, so `--model` is given resolved:
  then that id is the `--model` string. A request's `model` must be omitted ("default_model") or be that
  string: another spelling of the path loads the model again, a bare name is looked up as a Hugging Face
  repo (404 {"error": "..."} offline).
- Requests run concurrently (continuous batching, up to --decode-concurrency 32) except those carrying a
  `seed`, which are served one at a time.
"""

from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sluice.config import BackendConfig, GateConfig, ModelConfig, Settings, load
from sluice.processes import free_port, health_status, kill_group

MLX_SERVER = (sys.executable, "-m", "mlx_lm", "server")


class MlxServerError(RuntimeError):
    """mlx_lm.server exited or never became ready; the message ends with the tail of its log."""


class MlxServer:
    """One mlx_lm.server child process in its own session (process group), logging to `log_path`."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, owned_dir: Path | None = None):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"          # OpenAI base URL
        self.log_path = log_path
        self._owned_dir = owned_dir                       # temp dir (cache, maybe log) removed by stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"

    def health(self, timeout: float = 2.0) -> int | None:
        """The status of GET /health, or None when nothing answers."""
        try:
            return health_status("127.0.0.1", self.port, "/health", timeout)
        except (OSError, http.client.HTTPException):
            return None

    def wait_ready(self, timeout: float = 120.0) -> MlxServer:
        """Poll GET /health until 200. Raises MlxServerError, with the log's tail, when the process exits,
        reports its generation thread dead (503), or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            status = self.health()
            if status == 200:
                return self
            if status == 503:
                raise MlxServerError(f"mlx_lm.server on port {self.port} is up but cannot generate (model "
                                     f"failed to load?); log {self.log_path}:\n{self.log_tail()}")
            if self.proc.poll() is not None:
                raise MlxServerError(f"mlx_lm.server exited with status {self.proc.returncode} before it was "
                                     f"ready; log {self.log_path}:\n{self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise MlxServerError(f"mlx_lm.server on port {self.port} not ready after {timeout:g} s; "
                                     f"log {self.log_path}:\n{self.log_tail()}")
            try:                                         # an interruptible sleep: returns at once on exit
                self.proc.wait(min(interval, left))
            except subprocess.TimeoutExpired:
                pass
            interval = min(interval * 2, 0.5)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `timeout` s; returns the exit status. Idempotent."""
        kill_group(self.proc, timeout, "mlx_lm.server")     # the group: also any helper processes it spawned
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None
        return self.proc.poll()

    def __enter__(self) -> MlxServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MlxServer pid={self.proc.pid} url={self.url} returncode={self.proc.poll()}>"


def start_mlx_server(model_dir, port: int | None = None, log_path=None, env: dict | None = None,
                     args: tuple[str, ...] = (), ready_timeout: float | None = 120.0) -> MlxServer:
    """Start `python -m mlx_lm server --model DIR --host 127.0.0.1 --port N` and (unless `ready_timeout` is
    None) wait until it is ready. `env` is laid over os.environ and the defaults HF_HUB_OFFLINE=1 and
    HF_HUB_CACHE=<a fresh empty directory>. Output goes to `log_path` (default: a temp file removed by
    stop()). `args` are extra server options, e.g. ("--decode-concurrency", "1")."""
    model = str(Path(model_dir).expanduser().resolve())  # = the id /v1/models reports
    owned = Path(tempfile.mkdtemp(prefix="sluice-mlx-"))
    (owned / "hf-cache").mkdir()
    log = Path(log_path) if log_path is not None else owned / "mlx_lm.server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(owned / "hf-cache"),
                 "PYTHONUNBUFFERED": "1", **(env or {})}
    # A port picked here can be taken by someone else before the child binds it: then try another.
    for attempt in range(3 if port is None else 1):
        p = port if port is not None else free_port()
        with open(log, "ab") as out:                     # the child keeps its own descriptor
            proc = subprocess.Popen([*MLX_SERVER, "--model", model, "--host", "127.0.0.1",
                                     "--port", str(p), *args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        server = MlxServer(proc, p, log, owned)
        if ready_timeout is None:
            return server
        try:
            return server.wait_ready(ready_timeout)
        except MlxServerError as e:
            server._owned_dir = None                     # keep the log for the message / the next attempt
            server.stop()
            if port is None and "Address already in use" in str(e) and attempt < 2:
                continue
            if log_path is not None:                     # else the log stays there for the post-mortem
                shutil.rmtree(owned, ignore_errors=True)
            raise
    raise AssertionError("unreachable")


# --- `sluice demo` -------------------------------------------------------------------------------------------

def mlx_backend(name: str, model_dir: Path, cache_dir: Path, **kw) -> BackendConfig:
    """A managed mlx_lm.server on `model_dir`. HF_HUB_CACHE must name an existing (empty) directory, or its
    /v1/models breaks; HF_HUB_OFFLINE keeps it from looking anything up."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = (*MLX_SERVER, "--model", "{model}", "--host", "{host}", "--port", "{port}")
    return BackendConfig(name=name, command=cmd, model_path=str(model_dir),
                         env=(("HF_HUB_CACHE", str(cache_dir)), ("HF_HUB_OFFLINE", "1")), **kw)


def demo_settings(base: Settings, model_dir: Path, cache_dir: Path) -> Settings:
    backend = mlx_backend("mlx", model_dir, cache_dir, start="eager", idle_unload_s=0)
    models = (ModelConfig("fast", str(model_dir), ("mlx",), ("tiny",)),
              ModelConfig("reasoning", str(model_dir), ("mlx",)))
    return dataclasses.replace(base, gates=(GateConfig("gpu"),), backends=(backend,), models=models)


def main(args) -> int:
    if importlib.util.find_spec("mlx_lm") is None:
        print("sluice demo needs mlx-lm: pip install -e '.[mlx]' (or pip install 'sluice-llm[mlx]')",
              file=sys.stderr)
        return 2
    from sluice.daemon import serve
    from sluice.tinymodel import build
    base = load(None)
    if args.port is not None:
        base = dataclasses.replace(base, port=args.port)
    home = base.state_dir.parent
    model_dir = build(home / "demo-model")
    settings = demo_settings(base, model_dir, home / "demo-hf-cache")
    url = f"http://127.0.0.1:{settings.port}"
    print(f"""
sluice demo: a tiny random-weights Llama ({model_dir}) on mlx_lm.server, behind sluice at {url}.
The answers are gibberish; the queue, the streaming and the priorities are real. Try:

  curl -s {url}/v1/query -H 'Content-Type: application/json' \\
    -d '{{"model": "fast", "prompt": "What is 2+2?", "priority": 0}}'

  curl -sN {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "tiny", "stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}'

  python -c "from sluice import sluice; print(sluice.query('fast', 'hello'))"

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='x'); \\
print(c.chat.completions.create(model='fast', messages=[{{'role': 'user', 'content': 'hi'}}]).choices[0].message.content)"

  sluice status          # or open {url}/ in a browser

Ctrl-C stops sluice and the model server.
""", file=sys.stderr, flush=True)
    os.environ.setdefault("SLUICE_URL", url)
    return serve(args, settings)
