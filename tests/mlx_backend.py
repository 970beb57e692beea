"""Session fixtures for a real mlx_lm.server on the tiny offline model (skipped where mlx-lm is absent).

conftest imports them: `tiny_model_dir` (the model, built once) and `mlx_server` (a ready sluice.demo.MlxServer
on it, stopped at the end of the session). `start_direct_server` starts another one for a single test.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sluice.demo import MlxServer, start_mlx_server

__all__ = ["tiny_model_dir", "mlx_server", "start_direct_server", "require_mlx"]

_logs = itertools.count()


def require_mlx() -> None:
    """Skip the calling test (or fixture) unless mlx-lm and its mlx backend can be imported."""
    reason = "needs mlx-lm: pip install -e '.[mlx]'"
    pytest.importorskip("mlx.core", reason=reason)       # Linux: the mlx[cpu] extra
    pytest.importorskip("mlx_lm", reason=reason)


def start_direct_server(model_dir: Path, workdir: Path, timeout: float = 120) -> MlxServer:
    """A ready mlx_lm.server the test started itself (not supervised by sluice); its log stays in `workdir`
    for a failed test's post-mortem. Call .stop() when done."""
    workdir = Path(workdir)
    return start_mlx_server(model_dir, log_path=workdir / f"mlx-{next(_logs)}.log", ready_timeout=timeout)



@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    require_mlx()
    from sluice.tinymodel import build
    return build(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def mlx_server(tiny_model_dir, tmp_path_factory):
    server = start_direct_server(tiny_model_dir, tmp_path_factory.mktemp("mlx"))
    yield server
    server.stop()
