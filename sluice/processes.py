"""Process mechanics for the backends sluice runs: what to run (engine presets, argv, `ProcessSpec`), how to
start one (`spawn`), probe it (`health_status`) and kill it with its whole process group (`kill_group`),
the RAM tier that picks the idle-unload default, and the on-disk registry of children that lets the next
sluice stop the orphans of one that died (`Registry`, `cleanup_orphans`).

Everything here is stateless or has its own lock; the lifecycle state machine that decides when to do
any of it is sluice/supervisor.py. Nothing here imports the rest of sluice (config imports the engine
names from here).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

log = logging.getLogger("sluice.processes")

SLEEP_METHODS = ("none", "stop", "vllm-sleep-1", "vllm-sleep-2")
START_MODES = ("lazy", "eager")
_LOG_ROTATE_BYTES = 20 << 20


# ---- engines and argv ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Engine:
    command: str                       # template, split with shlex BEFORE {model}/{host}/{port} are filled
    health_path: str = "/health"
    sleep_method: str = "stop"
    env: Mapping[str, str] = field(default_factory=dict)


ENGINES: dict[str, Engine] = {
    "mlx-lm": Engine("mlx_lm.server --model {model} --host {host} --port {port}"),
    "llama.cpp": Engine("llama-server -m {model} --host {host} --port {port}"),
    "vllm": Engine("vllm serve {model} --host {host} --port {port} --enable-sleep-mode",
                   sleep_method="vllm-sleep-1", env={"VLLM_SERVER_DEV_MODE": "1"}),
}

_PLACEHOLDER = re.compile(r"\{(model|host|port)\}")


def build_argv(command: str | Sequence[str] | None, engine: str | None, model: str, port: int,
               host: str = "127.0.0.1") -> tuple[str, ...]:
    """The argv to exec: `command` (a string is shlex-split) or the engine's template, with `{model}`,
    `{host}` and `{port}` filled in each argument AFTER splitting, in one pass (a value is never re-scanned
    for placeholders, never split, never given to a shell). A model that would begin an argument with `-`
    is refused: it would be read as an option (write `./-name` for such a relative path)."""
    if command is None:
        if engine is None:
            raise ValueError("a backend process needs a command or an engine "
                             f"(one of {', '.join(sorted(ENGINES))})")
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(sorted(ENGINES))}")
        command = ENGINES[engine].command
    tokens = shlex.split(command) if isinstance(command, str) else [str(t) for t in command]
    if not tokens:
        raise ValueError("empty command")
    values = {"model": str(model), "host": str(host), "port": str(int(port))}
    out = []
    for tok in tokens:
        if "{model}" in tok:
            if not values["model"]:
                raise ValueError("the command uses {model} but the model is empty")
            if "\0" in values["model"]:
                raise ValueError("model contains a NUL character")
            if tok.startswith("{model}") and values["model"].startswith("-"):
                raise ValueError(f"model {values['model']!r} starts with '-' and would be read as an option; "
                                 f"write './{values['model']}' for a relative path")
        out.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], tok))
    return tuple(out)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def ram_tier_idle_s(total_bytes: int | None = None) -> float:
    """Idle-unload default by installed RAM (the mlx-inference-server tiers): >= 64 GB: 600 s, 24-63 GB:
    300 s, below (or unknown): 180 s. GB are decimal, so a machine sold as 64 GB still counts as 64 after
    the kernel keeps its share."""
    if total_bytes is None:
        total_bytes = total_memory_bytes()
    if not total_bytes:
        return 180.0
    gb = total_bytes / 1e9
    return 600.0 if gb >= 64 else 300.0 if gb >= 24 else 180.0


# ---- the spec ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessSpec:
    """Everything needed to run, probe, restart, sleep and stop one backend process."""
    name: str
    argv: tuple[str, ...]
    port: int
    env: Mapping[str, str] = field(default_factory=dict, hash=False)   # added to (overriding) sluice's environment
    host: str = "127.0.0.1"
    health_path: str = "/health"
    start: str = "lazy"                  # lazy: on first ensure_ready; eager: when the Supervisor starts
    start_timeout_s: float = 120.0       # spawn -> healthy; past it: killed, FAILED (no retry)
    stop_timeout_s: float = 10.0         # SIGTERM -> SIGKILL
    start_retries: int = 3               # consecutive failures (early exits, crashes, wedges) before FAILED
    backoff_s: float = 1.0               # delay before retry n: backoff_s * 2**(n-1), at most backoff_max_s
    backoff_max_s: float = 30.0
    stable_s: float = 60.0               # READY this long resets the consecutive-failure count
    unhealthy_after: int = 3             # consecutive failed probes of a READY process -> restart
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 5.0
    idle_unload_s: float | None = None   # None: never; else sleep() after this long with nothing in flight
    sleep_method: str = "stop"           # none | stop | vllm-sleep-1 | vllm-sleep-2
    sleep_timeout_s: float = 120.0       # each vLLM /sleep, /wake_up, ... call
    log_path: Path | None = None         # child stdout+stderr, appended; None: discarded
    cwd: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        if self.log_path is not None:
            object.__setattr__(self, "log_path", Path(self.log_path))
        where = f"backends.{self.name}"
        if not self.argv:
            raise ValueError(f"{where}.command: empty")
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"{where}.port: must be 1..65535, got {self.port!r}")
        if self.sleep_method not in SLEEP_METHODS:
            raise ValueError(f"{where}.sleep: must be one of {', '.join(SLEEP_METHODS)}, got {self.sleep_method!r}")
        if self.start not in START_MODES:
            raise ValueError(f"{where}.start: must be lazy or eager, got {self.start!r}")
        if not self.health_path.startswith("/"):
            raise ValueError(f"{where}.health_path: must start with '/', got {self.health_path!r}")
        for k in ("start_timeout_s", "stop_timeout_s", "probe_interval_s", "probe_timeout_s", "sleep_timeout_s"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{where}.{k}: must be > 0, got {getattr(self, k)!r}")
        if self.start_retries < 0 or self.unhealthy_after < 1:
            raise ValueError(f"{where}: start_retries must be >= 0 and unhealthy_after >= 1")
        if self.idle_unload_s is not None and not self.idle_unload_s > 0:
            raise ValueError(f"{where}.idle_unload_s: must be > 0, got {self.idle_unload_s!r}")

    def backoff(self, failures: int) -> float:
        """Delay before the retry that follows the `failures`-th consecutive failure (1, 2, ...)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, failures - 1))


def spec_for(name: str, *, model: str = "", engine: str | None = None,
             command: str | Sequence[str] | None = None, port: int | None = None, host: str = "127.0.0.1",
             log_dir: Path | None = None, env: Mapping[str, str] | None = None, **overrides) -> ProcessSpec:
    """A ProcessSpec from config-level inputs: the engine preset supplies argv template, health path,
    sleep method and env; `command` replaces the template; `overrides` set any other ProcessSpec field."""
    preset = ENGINES.get(engine) if engine else None
    if engine and preset is None:
        raise ValueError(f"backends.{name}.engine: unknown engine {engine!r}; expected one of "
                         f"{', '.join(sorted(ENGINES))}")
    port = free_port(host) if port is None else port
    kw: dict = {"health_path": preset.health_path if preset else "/health",
                "sleep_method": preset.sleep_method if preset else "stop"}
    if log_dir is not None:
        kw["log_path"] = Path(log_dir) / f"{name}.log"
    kw.update(overrides)
    return ProcessSpec(name=name, argv=build_argv(command, engine, model, port, host), port=port, host=host,
                       env={**(preset.env if preset else {}), **(env or {})}, **kw)


# ---- one process: spawn, probe, kill -------------------------------------------------------------------
def spawn(spec: ProcessSpec) -> subprocess.Popen:
    """Start `spec`'s process in its own session (its group can then be killed whole), stdout and stderr
    appended to spec.log_path after a header line (the file rotated once past 20 MiB), or discarded.
    Raises OSError when the log cannot be opened or the program cannot be run."""
    env = {**os.environ, **spec.env}
    out = subprocess.DEVNULL
    logf = None
    if spec.log_path is not None:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if spec.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(spec.log_path, spec.log_path.with_name(spec.log_path.name + ".1"))
        except FileNotFoundError:
            pass
        logf = out = open(spec.log_path, "ab")
        logf.write(f"\n=== sluice {time.strftime('%Y-%m-%d %H:%M:%S')}: starting {spec.name}: "
                   f"{shlex.join(spec.argv)}\n".encode())
        logf.flush()
    try:
        return subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=spec.cwd, start_new_session=True, close_fds=True)
    finally:
        if logf is not None:
            logf.close()       # the child keeps its own descriptor


def health_status(host: str, port: int, path: str, timeout: float) -> int:
    """The HTTP status of `GET path` on host:port. Raises OSError (socket.timeout when it answers too
    slowly) or http.client.HTTPException when nothing answers HTTP."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read(1 << 16)
        return resp.status
    finally:
        conn.close()


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with code {rc}"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_group(proc: subprocess.Popen | None, timeout: float, name: str = "") -> None:
    """SIGTERM `proc`'s process group, SIGKILL it after `timeout` s (at once when `timeout` is 0), and reap
    `proc`; stragglers of the group (helpers the child started) are killed by the same deadline. `proc`
    must lead its group (started with start_new_session=True, as `spawn` does). `name` labels the logs."""
    if proc is None:
        return
    what = f"{name}: pid {proc.pid}" if name else f"pid {proc.pid}"
    pgid = proc.pid
    deadline = time.monotonic() + timeout
    if proc.poll() is None and timeout > 0:
        _signal_group(pgid, signal.SIGTERM)
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        if timeout > 0:
            log.warning("%s ignored SIGTERM for %.1fs; SIGKILL", what, timeout)
        _signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            log.error("%s survived SIGKILL", what)
    pause = threading.Event()
    while _group_alive(pgid) and time.monotonic() < deadline:
        pause.wait(0.05)
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)


# ---- process identity (for the registry) ---------------------------------------------------------------
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> str | None:
    """An opaque string that identifies when `pid` started (None: no such live process). With the pid it
    names one process for the life of the machine: a recycled pid has a different start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        stat = None
    except OSError:
        return None
    if stat is not None:
        rest = stat[stat.rfind(")") + 2:].split()
        if not rest or rest[0] in ("Z", "X"):   # zombie or dead: gone for our purposes
            return None
        return f"{_boot_id()}:{rest[19]}"
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(int(pid))], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def process_argv(pid: int) -> tuple[str, ...] | None:
    """The command line `pid` runs now (on systems without /proc: one element, ps's space-joined line)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return tuple(a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]) or None
    except FileNotFoundError:
        if Path("/proc/self/cmdline").exists():
            return None
    except OSError:
        return None
    try:
        out = subprocess.run(["ps", "-ww", "-o", "command=", "-p", str(int(pid))], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip(),) if out.stdout.strip() else None


def is_same_process(pid: int, start_time: str | None, argv: Sequence[str] | None) -> bool:
    """True only when `pid` is alive, started at `start_time` and runs `argv`: safe to signal."""
    if not pid or pid <= 1 or not start_time or pid == os.getpid():
        return False
    if process_start_time(pid) != start_time:
        return False
    if argv is None:
        return True
    now = process_argv(pid)
    if now is None:
        return False
    return tuple(now) == tuple(argv) or (len(now) == 1 and now[0] == " ".join(argv))


# ---- the registry ------------------------------------------------------------------------------------------
class Registry:
    """This sluice's children, on disk: `state_dir/processes-<pid>-<nonce>.json`, rewritten atomically
    (temp file + os.replace) on every spawn and exit. One file per sluice instance, so instances sharing a
    state_dir never mistake each other's children for orphans."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / f"processes-{os.getpid()}-{secrets.token_hex(4)}.json"
        self._lock = threading.Lock()
        self._children: dict[str, dict] = {}
        self._owner = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()),
                       "argv": list(process_argv(os.getpid()) or ())}

    def record(self, name: str, proc: subprocess.Popen, argv: Sequence[str], stop_timeout_s: float) -> None:
        entry = {"name": name, "pid": proc.pid, "pgid": proc.pid, "start_time": process_start_time(proc.pid),
                 "argv": list(argv), "stop_timeout_s": stop_timeout_s, "started_at": time.time()}
        with self._lock:
            self._children[name] = entry
            self._write()

    def forget(self, name: str, pid: int | None = None) -> None:
        """Drop `name`'s entry; with `pid`, only while it is that process's (a newer spawn replaces it)."""
        with self._lock:
            entry = self._children.get(name)
            if entry is not None and (pid is None or entry["pid"] == pid):
                del self._children[name]
                self._write()

    def write(self) -> None:
        with self._lock:
            self._write()

    def close(self) -> None:
        """Remove our file (after a clean stop: no child of ours is left)."""
        with self._lock:
            if self._children:
                self._write()
                return
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _write(self) -> None:
        data = {"version": 1, "owner": self._owner, "children": list(self._children.values())}
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".processes-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as e:
            log.warning("cannot write process registry %s: %s", self.path, e)


def cleanup_orphans(state_dir: Path, *, max_wait_s: float = 10.0) -> list[dict]:
    """Stop children left by a sluice that died: for every registry file in `state_dir` whose owner is
    gone, each child that is verifiably the same process (pid + start time + argv) gets SIGTERM to its
    process group, then SIGKILL after its stop timeout. A pid now used by another process is left alone.
    Returns the entries that were signalled."""
    state_dir = Path(state_dir)
    victims: list[dict] = []
    for path in sorted(state_dir.glob("processes-*.json")):
        try:
            data = json.loads(path.read_text())
            owner = data.get("owner") or {}
            children = list(data.get("children") or [])
        except (OSError, ValueError, AttributeError) as e:
            log.warning("ignoring unreadable process registry %s: %s", path, e)
            continue
        if is_same_process(int(owner.get("pid") or 0), owner.get("start_time"), None) or \
                (owner.get("pid") == os.getpid() and owner.get("start_time") == process_start_time(os.getpid())):
            continue   # its sluice is alive (another instance, or an earlier Supervisor in this process)
        for c in children:
            try:
                pid, start, argv = int(c["pid"]), c.get("start_time"), tuple(c["argv"])
            except (KeyError, TypeError, ValueError):
                continue
            if is_same_process(pid, start, argv):
                victims.append(c)
            else:
                log.info("registry %s: pid %s is no longer %s's process; left alone", path.name, pid,
                         c.get("name"))
        try:
            path.unlink()
        except OSError:
            pass
    if not victims:
        return []

    def signal_all(sig: int, entries: list[dict]) -> None:
        for c in entries:
            if not is_same_process(int(c["pid"]), c.get("start_time"), tuple(c["argv"])):
                continue   # verified again right before every signal: the pid may have been recycled
            pgid = int(c.get("pgid") or 0)
            try:
                if pgid and pgid == os.getpgid(int(c["pid"])):
                    os.killpg(pgid, sig)
                else:
                    os.kill(int(c["pid"]), sig)
            except (ProcessLookupError, PermissionError) as e:
                log.info("orphan %s (pid %s): %s", c.get("name"), c["pid"], e)

    for c in victims:
        log.warning("stopping orphan backend %s (pid %s) left by a previous sluice: %s", c.get("name"),
                    c["pid"], shlex.join(c["argv"]))
    signal_all(signal.SIGTERM, victims)
    wait_s = min(max_wait_s, max(float(c.get("stop_timeout_s") or 10.0) for c in victims))
    deadline = time.monotonic() + wait_s
    alive = victims
    pause = threading.Event()
    while alive and time.monotonic() < deadline:
        pause.wait(0.05)
        alive = [c for c in alive if process_start_time(int(c["pid"])) == c.get("start_time")]
    if alive:
        signal_all(signal.SIGKILL, alive)
    return victims


__all__ = ["ENGINES", "Engine", "ProcessSpec", "Registry", "SLEEP_METHODS", "START_MODES", "build_argv",
           "cleanup_orphans", "describe_exit", "free_port", "health_status", "is_same_process", "kill_group",
           "process_argv", "process_start_time", "ram_tier_idle_s", "spawn", "spec_for",
           "total_memory_bytes"]
