"""`sluice demo`: a real model server behind sluice in one command, offline.

Builds the tiny random-weights model (sluice/tinymodel.py), has sluice's supervisor run `mlx_lm.server` on
it for the `fast` (alias `tiny`) and `reasoning` models, and serves. Ctrl-C stops sluice and the child.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

from sluice.config import BackendConfig, GateConfig, ModelConfig, Settings, load


def mlx_backend(name: str, model_dir: Path, cache_dir: Path, **kw) -> BackendConfig:
    """A managed mlx_lm.server on `model_dir`. HF_HUB_CACHE must name an existing (empty) directory, or its
    /v1/models breaks; HF_HUB_OFFLINE keeps it from looking anything up."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = (sys.executable, "-m", "mlx_lm", "server", "--model", "{model}", "--host", "{host}", "--port", "{port}")
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
    from sluice.cli import serve
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
