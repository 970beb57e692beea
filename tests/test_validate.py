"""`sluice validate` against a vLLM-style stand-in: match, mismatch -> exit 1, wake failure -> FAIL row."""

from __future__ import annotations

import contextlib
import io

from conftest import base_env, call
from sluice import config
from sluice.validate import run


def settings_for(tmp_path, backend):
    p = tmp_path / "v.toml"
    p.write_text(f'[[backends]]\nname = "v"\nurl = "{backend.url}"\nswitch = "vllm-sleep-1"\n'
                 f'[[models]]\nname = "m"\nbackends = ["v"]\n')
    return config.load(p, environ=base_env(tmp_path))


def test_all_levels_pass(tmp_path, backend):
    out = io.StringIO()
    assert run(settings_for(tmp_path, backend), "m", [1, 2], out) == 0
    text = out.getvalue()
    assert "Level" in text and "Mem before" in text and text.count("PASS") == 2 and "match" in text
    assert [c for _, c in backend.control_calls] == [
        "POST /sleep?level=1", "POST /wake_up",
        "POST /sleep?level=2", "POST /wake_up", "POST /collective_rpc reload_weights", "POST /reset_prefix_cache"]


def test_mismatch_after_wake_exits_1(tmp_path, backend):
    backend.reply_after_wake = "something else"
    out = io.StringIO()
    assert run(settings_for(tmp_path, backend), "m", [1], out) == 1
    assert "MISMATCH" in out.getvalue() and "FAIL" in out.getvalue()


def test_wake_failure_is_a_fail_row(tmp_path, backend):
    backend.fail_control.add("/wake_up")
    out = io.StringIO()
    assert run(settings_for(tmp_path, backend), "m", [1], out) == 1
    assert "FAIL" in out.getvalue() and "wake_up" in out.getvalue()


def test_unknown_model_is_usage_error(tmp_path, backend):
    assert run(settings_for(tmp_path, backend), "nope", [1], io.StringIO()) == 2


def test_runs_beside_the_daemon_it_validates_once_it_is_drained(tmp_path, backend, make_app):
    """validate builds only the model's backend, no HTTP server: the daemon holding the port is no obstacle,
    but a daemon still taking work is: validate refuses until it is drained."""
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url})
    p = tmp_path / "v.toml"
    p.write_text(f'[server]\nport = {app.port}\n[[backends]]\nname = "v"\nurl = "{backend.url}"\nswitch = "vllm-sleep-1"\n'
                 f'[[models]]\nname = "m"\nbackends = ["v"]\n')
    env = {k: v for k, v in base_env(tmp_path).items() if k != "SLUICE_PORT"}
    settings = config.load(p, environ=env)
    assert settings.port == app.port
    err = io.StringIO()
    with contextlib.redirect_stderr(err):           # serving: validate would cut its requests
        assert run(settings, "m", [1], io.StringIO()) == 1
    assert "POST /admin/drain first" in err.getvalue() and backend.control_calls == []
    assert call(app, "POST", "/admin/drain")[0] == 200
    out = io.StringIO()
    assert run(settings, "m", [1], out) == 0, out.getvalue()
    assert "PASS" in out.getvalue()
