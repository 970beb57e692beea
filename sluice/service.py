"""`sluice service install|uninstall|status`: run sluice under systemd (Linux) or launchd (macOS).

The unit (or plist) starts `<this interpreter> -m sluice serve [--config PATH]`, restarts it when it fails,
and gives it long enough to stop: sluice drains in-flight requests for up to SLUICE_SHUTDOWN_TIMEOUT_S,
then stops the backends it manages (each up to its own stop_timeout_s), and only after that may the
service manager send SIGKILL (`stop_timeout_s`).

Rendering is pure (`plan`, `render_systemd`, `render_launchd`); `install`/`uninstall`/`status` write or
read one file. `prefix` re-roots every path written (like DESTDIR) without changing what the unit says,
and with a prefix no service manager is ever called. systemctl/launchctl get an argv list, never a shell.
"""

from __future__ import annotations

import dataclasses
import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from sluice.config import ConfigError, Settings, load

UNIT_NAME = "sluice.service"
LAUNCHD_LABEL = "local.sluice"      # "local." is launchd's convention for jobs no vendor ships
# After the in-flight wait and the managed backends' own stop timeouts, sluice still joins its health,
# dispatcher and recorder threads (the recorder up to 5 s) and closes sockets; 10 s covers that with room.
STOP_MARGIN_S = 10.0
MANAGERS = ("systemd", "launchd")
_SAFE_ARG = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


@dataclasses.dataclass(frozen=True)
class Plan:
    manager: str                    # systemd | launchd
    user: bool                      # a user unit / LaunchAgent, else a system unit / LaunchDaemon
    path: Path                      # where the unit or plist lives (before any prefix)
    argv: tuple[str, ...]           # the command the service runs
    env_file: Path                  # systemd reads it at each start; launchd gets its values copied in
    env: tuple[tuple[str, str], ...]   # the env file's values when the plan was made
    log_dir: Path
    stop_timeout_s: float
    workdir: Path | None = None
    run_as: str | None = None


def default_manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def stop_timeout_s(settings: Settings) -> float:
    """How long the service manager waits between SIGTERM and SIGKILL (see the module docstring)."""
    backends = max((b.stop_timeout_s for b in settings.backends if b.managed), default=0.0)
    return settings.shutdown_timeout_s + backends + STOP_MARGIN_S


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads the simple cases: # comments, optional quotes."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read the environment file {str(path)!r}: {e.strerror}") from None
    env = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{path}:{n}: want KEY=VALUE, got {line[:60]!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key] = value
    return env


def plan(manager: str | None = None, user: bool = False, config: str | None = None,
         env_file: str | None = None, run_as: str | None = None, home: Path | None = None) -> Plan:
    """What `install` would write, from the settings the service itself will see (the config file and
    the env file, not this shell's environment). Raises ConfigError on a bad config or env file."""
    manager = manager or default_manager()
    if manager not in MANAGERS:
        raise ConfigError(f"service manager must be one of {', '.join(MANAGERS)}, got {manager!r}")
    xdg = os.environ.get("XDG_CONFIG_HOME") if home is None else None   # a given home is the whole story
    home = home or Path.home()
    if manager == "systemd":
        conf = Path(xdg) if xdg else home / ".config"
        path = conf / "systemd/user" / UNIT_NAME if user else Path("/etc/systemd/system") / UNIT_NAME
        default_env = conf / "sluice/sluice.env" if user else Path("/etc/sluice/sluice.env")
    else:
        path = (home / "Library/LaunchAgents" if user else Path("/Library/LaunchDaemons")) / f"{LAUNCHD_LABEL}.plist"
        default_env = home / ".sluice/sluice.env" if user else Path("/etc/sluice/sluice.env")
    env_path = Path(env_file).expanduser().absolute() if env_file else default_env
    env = read_env_file(env_path)
    argv = [sys.executable, "-m", "sluice", "serve"]
    if config:
        config = str(Path(config).expanduser().absolute())
        argv += ["--config", config]
    settings = load(config or env.get("SLUICE_CONFIG") or None, environ=env)
    pkg_root = Path(__file__).resolve().parent.parent
    # A checkout that was never pip-installed is importable only from its own directory; an installed
    # sluice lives in site-packages and needs no working directory.
    workdir = None if pkg_root.name in ("site-packages", "dist-packages") else pkg_root
    return Plan(manager, user, path, tuple(argv), env_path, tuple(sorted(env.items())), settings.log_dir,
                stop_timeout_s(settings), workdir, None if user else run_as)


def _unit_text(text: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ConfigError(f"a control character cannot go into a systemd unit: {text[:60]!r}")
    return text.replace("%", "%%")          # systemd expands %-specifiers everywhere in a unit


def _systemd_arg(arg: str) -> str:
    """One ExecStart= word: quoted (systemd's C-like rules) unless plainly safe; $ doubled, not expanded."""
    arg = _unit_text(arg)
    if _SAFE_ARG.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'


def render_systemd(p: Plan) -> str:
    seconds = f"{p.stop_timeout_s:g}"
    lines = [
        "# Written by `sluice service install`; `sluice service uninstall` removes it.",
        "[Unit]",
        "Description=sluice: priority-queue LLM request router",
        "After=network-online.target",
        "Wants=network-online.target",
        # A crash loop (port taken, backend path gone) stops after 5 tries in 5 minutes instead of forever.
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=exec",
        "ExecStart=" + " ".join(_systemd_arg(a) for a in p.argv),
        # sluice re-reads its configuration on SIGHUP, keeping queued and in-flight work.
        "ExecReload=/bin/kill -HUP $MAINPID",
        "EnvironmentFile=-" + _unit_text(str(p.env_file)),      # "-": a missing file is fine
    ]
    if p.workdir is not None:
        lines.append("WorkingDirectory=" + _unit_text(str(p.workdir)))
    if p.run_as:
        lines.append("User=" + _unit_text(p.run_as))
    lines += [
        "Restart=on-failure",
        "RestartSec=5",
        # Exit status 2 is a configuration error: restarting cannot fix it.
        "RestartPreventExitStatus=2",
        # SIGTERM goes to sluice alone (the default would signal its managed backends too, cutting off the
        # requests it is draining); what is still running after TimeoutStopSec is SIGKILLed, group and all.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={seconds}",
        # stderr goes to the journal (`journalctl -u sluice`, rotated by journald); sluice also keeps its
        # own size-rotated log at {log_dir}/sluice.log.
        "StandardOutput=journal",
        "StandardError=journal",
        "",
        "[Install]",
        "WantedBy=" + ("default.target" if p.user else "multi-user.target"),
        "",
    ]
    return "\n".join(lines)


def render_launchd(p: Plan) -> bytes:
    doc: dict = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(p.argv),
        "RunAtLoad": True,
        # Restarted unless it exited 0 (a requested stop): systemd's Restart=on-failure.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 5,
        "ExitTimeOut": int(p.stop_timeout_s + 0.999),
        # launchd does not rotate these; sluice's own rotated log is {log_dir}/sluice.log.
        "StandardOutPath": str(p.log_dir / "launchd.out.log"),
        "StandardErrorPath": str(p.log_dir / "launchd.err.log"),
    }
    if p.env:
        doc["EnvironmentVariables"] = dict(p.env)   # launchd cannot read an env file: copied at install
    if p.workdir is not None:
        doc["WorkingDirectory"] = str(p.workdir)
    if p.run_as:
        doc["UserName"] = p.run_as
    return plistlib.dumps(doc, sort_keys=True)


def render(p: Plan) -> bytes:
    return render_systemd(p).encode("utf-8") if p.manager == "systemd" else render_launchd(p)


def _rooted(path: Path, prefix: str | os.PathLike | None) -> Path:
    return Path(prefix) / path.relative_to(path.anchor) if prefix else path


def _manager_argvs(p: Plan, action: str) -> list[list[str]]:
    """The service-manager commands for `action` (install, uninstall, status)."""
    if p.manager == "systemd":
        ctl = ["systemctl", "--user"] if p.user else ["systemctl"]
        return {"install": [ctl + ["daemon-reload"], ctl + ["enable", "--now", UNIT_NAME]],
                "uninstall": [ctl + ["disable", "--now", UNIT_NAME]], "forget": [ctl + ["daemon-reload"]],
                "status": [ctl + ["is-active", UNIT_NAME]]}[action]
    domain = f"gui/{os.getuid()}" if p.user else "system"
    return {"install": [["launchctl", "bootstrap", domain, str(p.path)]],
            "uninstall": [["launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"]], "forget": [],
            "status": [["launchctl", "print", f"{domain}/{LAUNCHD_LABEL}"]]}[action]


def _run_manager(p: Plan, action: str, prefix, say) -> int:
    """Run the manager's commands, or with a prefix (or without the tool) say what to run. Last rc."""
    argvs = _manager_argvs(p, action)
    if not argvs:
        return 0
    if prefix or shutil.which(argvs[0][0]) is None:
        if action != "status":
            say("then run: " + " && ".join(" ".join(a) for a in argvs))
        return -1
    rc = 0
    for argv in argvs:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            say(f"{' '.join(argv)}: {e}")
            return 1
        rc = r.returncode
        out = (r.stdout.strip() if action == "status" else "") or r.stderr.strip()
        if out:
            say(f"{' '.join(argv[:3])}: {out.splitlines()[0][:200]}")
    return rc


def install(p: Plan, prefix: str | os.PathLike | None = None, say=print) -> int:
    target = _rooted(p.path, prefix)
    data = render(p)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if p.manager == "launchd":
            _rooted(p.log_dir, prefix).mkdir(parents=True, exist_ok=True)   # launchd will not create it
        tmp = target.with_name(target.name + ".tmp")
        # The plist may carry SLUICE_API_KEY from the env file: readable by its owner only.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if p.env else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as e:
        hint = "" if p.user or prefix else " (a system unit needs root: sudo, or --user for a user unit)"
        say(f"sluice: cannot write {target}: {e.strerror}{hint}")
        return 1
    say(f"wrote {target}")
    if p.manager == "systemd":
        say(f"settings: SLUICE_* lines in {p.env_file} (optional; read at each start)")
    else:
        say(f"settings: SLUICE_* lines in {p.env_file}, copied into the plist: run install again after editing")
    rc = _run_manager(p, "install", prefix, say)
    return 0 if rc in (0, -1) else 1


def uninstall(p: Plan, prefix: str | os.PathLike | None = None, say=print) -> int:
    target = _rooted(p.path, prefix)
    if not target.exists():
        say(f"not installed: no {target}")
        return 0
    _run_manager(p, "uninstall", prefix, say)     # stopped while the manager can still find the file
    try:
        target.unlink()
    except OSError as e:
        say(f"sluice: cannot remove {target}: {e.strerror}")
        return 1
    say(f"removed {target} (the env file {p.env_file} and the logs are kept)")
    _run_manager(p, "forget", prefix, say)
    return 0


def status(p: Plan, prefix: str | os.PathLike | None = None, say=print) -> int:
    """0 when the unit or plist is installed, 1 when it is not."""
    target = _rooted(p.path, prefix)
    if not target.exists():
        say(f"not installed (no {target}); `sluice service install{' --user' if p.user else ''}` installs it")
        return 1
    say(f"installed: {target} ({p.manager} {'user' if p.user else 'system'} service)")
    _run_manager(p, "status", prefix, say)
    return 0


def main(args) -> int:
    """The CLI's `sluice service ...` (ConfigError propagates: the CLI answers it with exit status 2)."""
    p = plan(args.manager, args.user, args.config, args.env_file, args.run_as)
    if args.action == "show":
        sys.stdout.write(render(p).decode("utf-8"))
        return 0
    return {"install": install, "uninstall": uninstall, "status": status}[args.action](p, args.prefix)
