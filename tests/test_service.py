"""`sluice service`: the systemd unit passes `systemd-analyze verify`, the launchd plist round-trips through
plistlib, install/uninstall/status touch only the given prefix (or, without one, only the user unit's own
path), and the service manager is called with an argv list — a stand-in `systemctl` on PATH records it."""

from __future__ import annotations

import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sluice import service
from sluice.cli import main

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private HOME, and a PATH whose systemctl/launchctl only record the argv they were given."""
    h = tmp_path / "home"
    h.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("systemctl", "launchctl"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> "{tmp_path}/calls"\necho active\n')
        script.chmod(0o755)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return h


def calls(tmp_path) -> list[str]:
    p = tmp_path / "calls"
    return p.read_text().splitlines() if p.exists() else []


def config_file(tmp_path, name="sluice.toml", stop_timeout_s=None) -> Path:
    path = tmp_path / name
    managed = "" if stop_timeout_s is None else f"""
[[backends]]
name = "eng"
command = ["{sys.executable}", "-c", "pass", "{{port}}"]
model_path = "tiny"
stop_timeout_s = {stop_timeout_s}

[[models]]
name = "tiny"
upstream_model = "tiny"
backends = ["eng"]
"""
    path.write_text(managed)
    return path


# ---- the shutdown timeout ----------------------------------------------------------------------------------
def test_stop_timeout_covers_the_drain_and_the_managed_backends(tmp_path, home):
    env = tmp_path / "sluice.env"
    env.write_text("# the service's settings\nSLUICE_SHUTDOWN_TIMEOUT_S=45\n")
    p = service.plan("systemd", env_file=str(env))
    assert p.stop_timeout_s == 45 + service.STOP_MARGIN_S
    assert "TimeoutStopSec=55\n" in service.render_systemd(p)
    p = service.plan("launchd", user=True, env_file=str(env), config=str(config_file(tmp_path, stop_timeout_s=20)))
    assert p.stop_timeout_s == 45 + 20 + service.STOP_MARGIN_S
    assert plistlib.loads(service.render_launchd(p))["ExitTimeOut"] == 75


def test_the_default_stop_timeout_follows_the_default_shutdown_timeout(home):
    from sluice.config import Settings
    p = service.plan("systemd", user=True)
    assert p.stop_timeout_s == Settings().shutdown_timeout_s + service.STOP_MARGIN_S


# ---- systemd ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("user", [False, True])
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path, home, user):
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (`command -v systemd-analyze` found nothing)")
    # A config path with a space, a % and a $: each must reach sluice literally, not as systemd syntax.
    conf = config_file(tmp_path, "my 50% $HOME.toml")
    p = service.plan("systemd", user=user, config=str(conf), run_as="sluice")
    unit = tmp_path / "prefix" / p.path.relative_to("/")
    assert service.install(p, prefix=tmp_path / "prefix", say=lambda s: None) == 0
    text = unit.read_text()
    assert f'ExecStart={sys.executable} -m sluice serve --config "{tmp_path}/my 50%% $$HOME.toml"' in text
    assert "Restart=on-failure" in text and "KillMode=mixed" in text and "EnvironmentFile=-" in text
    assert ("User=sluice" in text) != user           # a user unit runs as its user: no User=
    assert ("WantedBy=default.target" if user else "WantedBy=multi-user.target") in text
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}     # the user manager wants a runtime dir
    r = subprocess.run([SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify", str(unit)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "sluice.service" not in r.stderr, r.stderr


def test_systemd_refuses_what_a_unit_cannot_carry(tmp_path, home):
    assert main(["service", "show", "--manager", "systemd", "--config", str(config_file(tmp_path, "a\nb.toml"))]) == 2


def test_system_unit_path_and_env_file_defaults(home):
    p = service.plan("systemd")
    assert p.path == Path("/etc/systemd/system/sluice.service") and p.env_file == Path("/etc/sluice/sluice.env")
    p = service.plan("systemd", user=True)
    assert p.path == home / ".config/systemd/user/sluice.service"
    assert p.env_file == home / ".config/sluice/sluice.env"


# ---- launchd -------------------------------------------------------------------------------------------------
def test_plist_round_trips_with_the_expected_keys(tmp_path, home):
    env = tmp_path / "sluice.env"
    env.write_text('SLUICE_PORT=5601\nSLUICE_API_KEY="sk-local"\n')
    conf = config_file(tmp_path)
    prefix = tmp_path / "prefix"
    assert main(["service", "install", "--manager", "launchd", "--user", "--prefix", str(prefix),
                 "--config", str(conf), "--env-file", str(env)]) == 0
    path = prefix / (home / "Library/LaunchAgents/local.sluice.plist").relative_to("/")
    doc = plistlib.loads(path.read_bytes())
    assert {"Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "StandardOutPath", "StandardErrorPath",
            "ExitTimeOut", "EnvironmentVariables", "ThrottleInterval"} <= set(doc)
    assert doc["Label"] == "local.sluice" and doc["RunAtLoad"] is True
    assert doc["ProgramArguments"] == [sys.executable, "-m", "sluice", "serve", "--config", str(conf)]
    assert doc["KeepAlive"] == {"SuccessfulExit": False}
    assert doc["EnvironmentVariables"] == {"SLUICE_PORT": "5601", "SLUICE_API_KEY": "sk-local"}
    assert doc["StandardErrorPath"].endswith("launchd.err.log") and doc["ExitTimeOut"] >= 30
    assert stat.S_IMODE(path.stat().st_mode) == 0o600      # it holds the API key
    assert "UserName" not in doc
    assert calls(tmp_path) == []


def test_launch_daemon_runs_as_the_given_account(home):
    p = service.plan("launchd", run_as="_sluice")
    assert p.path == Path("/Library/LaunchDaemons/local.sluice.plist")
    assert plistlib.loads(service.render_launchd(p))["UserName"] == "_sluice"


# ---- install / uninstall / status -------------------------------------------------------------------------------
@pytest.mark.parametrize("manager", ["systemd", "launchd"])
def test_nothing_is_written_outside_the_prefix(tmp_path, home, manager, capsys):
    before = listing(tmp_path)
    prefix = tmp_path / "prefix"
    args = ["--manager", manager, "--prefix", str(prefix)]
    real = service.plan(manager).path
    existed = real.exists()
    assert main(["service", "install", *args]) == 0
    assert main(["service", "install", "--user", *args]) == 0
    added = listing(tmp_path) - before
    assert added and all(a == "prefix" or a.startswith("prefix" + os.sep) for a in added), added
    assert real.exists() == existed and calls(tmp_path) == []           # and no service manager was called
    out = capsys.readouterr().out
    assert "then run: " in out and str(prefix) in out


def test_install_status_uninstall(tmp_path, home, capsys):
    args = ["--manager", "systemd", "--prefix", str(tmp_path / "p")]
    assert main(["service", "status", *args]) == 1 and "not installed" in capsys.readouterr().out
    assert main(["service", "install", *args]) == 0
    assert main(["service", "status", *args]) == 0 and "installed: " in capsys.readouterr().out
    assert main(["service", "uninstall", *args]) == 0
    assert not (tmp_path / "p/etc/systemd/system/sluice.service").exists()
    assert main(["service", "status", *args]) == 1
    assert main(["service", "uninstall", *args]) == 0 and "not installed" in capsys.readouterr().out


def test_user_unit_without_prefix_calls_systemctl_with_an_argv(tmp_path, home, capsys):
    before = listing(tmp_path)
    assert main(["service", "install", "--user", "--manager", "systemd"]) == 0
    unit = home / ".config/systemd/user/sluice.service"
    assert unit.exists() and listing(tmp_path) - before == {"calls", *{str(p.relative_to(tmp_path)) for p in
                                                                     [unit, *unit.parents] if home in p.parents}}
    assert calls(tmp_path) == ["systemctl --user daemon-reload", "systemctl --user enable --now sluice.service"]
    assert main(["service", "status", "--user", "--manager", "systemd"]) == 0
    assert "is-active: active" in capsys.readouterr().out.replace("systemctl --user is-active", "is-active")
    assert main(["service", "uninstall", "--user", "--manager", "systemd"]) == 0 and not unit.exists()
    assert calls(tmp_path)[-2:] == ["systemctl --user disable --now sluice.service", "systemctl --user daemon-reload"]


def test_bad_env_file_is_a_configuration_error(tmp_path, home, capsys):
    env = tmp_path / "bad.env"
    env.write_text("SLUICE_PORT 5601\n")
    assert main(["service", "show", "--env-file", str(env)]) == 2
    assert "want KEY=VALUE" in capsys.readouterr().err
    env.write_text("SLUICE_SHUTDOWN_TIMEOUT_S=soon\n")
    assert main(["service", "show", "--env-file", str(env)]) == 2
