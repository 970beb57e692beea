"""BackendOps: the one owner of every backend action (load, unload, sleep, wake, stop).

Nothing else calls the supervisor's lifecycle actions or vLLM's sleep API: the scheduler's switch
thread (through `switch`), admin's `POST /admin/models/{name}/...` (through `model_action`) and
`sluice validate` all come here. On an exclusive gate an admin action is not run here directly: it is
handed to the scheduler (`Scheduler.switch_now`), which drains, switches and records exactly as for a
request-driven switch, and calls back into `switch` from its switch thread.

Every action raises on failure (a SluiceError, so an operator gets a clear answer). `stop` of a vLLM-style
server sluice does not run cannot stop it: it succeeds only when the server is verifiably asleep (`GET
/is_sleeping`) or gone (connection refused), so a switch never wakes the next model beside one still awake.
For `switch = "command"` a stop runs `sleep_cmd` again and trusts its exit status: sluice has no way to
look.

Sleep levels (`switch = "vllm-sleep-auto"`): vLLM cannot move a sleeping model from level 1 to level 2
without waking it, so the level is chosen when the model is put to sleep (`choose_level`) and kept in one
book here, with the time it went to sleep: level 1 when its last sleep was shorter than `demote_after_s`
(or it never slept) and the level-1 weights of every sleeper, its own `weights_gb` included, fit
`l1_ram_budget_gb`; level 2 otherwise. A wake uses the level the book holds.
"""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Callable, Mapping

from sluice import errors
from sluice.config import ConfigError
from sluice.processes import ProcessSpec, ram_tier_idle_s, spec_for, total_memory_bytes

if TYPE_CHECKING:
    from sluice.config import BackendConfig, Settings
    from sluice.monitor import Supervisor
    from sluice.upstream import Upstream

log = logging.getLogger("sluice.backends")

ACTIONS = ("load", "unload", "sleep", "wake")
_DOWN_STATES = ("sleeping", "stopped", "failed")      # no process of it holds the GPU


def _sleeping_flag(status: int, body: bytes) -> bool | None:
    """`is_sleeping` from a `GET /is_sleeping` answer; None when the answer does not say."""
    try:
        flag = json.loads(body).get("is_sleeping") if status == 200 else None
    except (ValueError, AttributeError):
        return None
    return flag if isinstance(flag, bool) else None


def process_spec(b: "BackendConfig", settings: "Settings") -> ProcessSpec:
    """How sluice runs a managed backend (`engine`/`command` in its [[backends]] table)."""
    idle = b.idle_unload_s if b.idle_unload_s is not None else ram_tier_idle_s()
    extra = {"health_path": b.health_path} if b.health_path else {}
    try:
        return spec_for(b.name, model=b.model_path, engine=b.engine, command=b.command, port=b.port,
                        log_dir=settings.log_dir, env=dict(b.env), start=b.start,
                        start_timeout_s=b.start_timeout_s, stop_timeout_s=b.stop_timeout_s,
                        start_retries=b.start_retries, unhealthy_after=b.unhealthy_after,
                        sleep_timeout_s=b.sleep_timeout_s, idle_unload_s=idle or None,
                        probe_interval_s=settings.health_interval_s, **extra)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("backends.") else f"backends.{b.name}: {e}") from None


def upstream_url(b: "BackendConfig", spec: ProcessSpec | None) -> str:
    return f"http://127.0.0.1:{spec.port}/v1" if spec is not None else b.url


def default_l1_ram_budget_gb(total_bytes: int | None = None) -> float:
    """Half the installed RAM (decimal GB) may hold level-1 sleepers' weights; unknown RAM: none (level 2)."""
    total = total_memory_bytes() if total_bytes is None else total_bytes
    return total / 2e9 if total else 0.0


class BackendOps:
    """`configs`: backend name -> BackendConfig; `upstreams`: name -> Upstream; `supervisor`: the managed
    processes (None when sluice runs none)."""

    def __init__(self, configs: Mapping[str, "BackendConfig"], upstreams: Mapping[str, "Upstream"],
                 supervisor: "Supervisor | None" = None, *, l1_ram_budget_gb: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._configs = dict(configs)
        self._upstreams = upstreams
        self.supervisor = supervisor
        self.l1_ram_budget_gb = default_l1_ram_budget_gb() if l1_ram_budget_gb is None else l1_ram_budget_gb
        self._clock = clock
        # The sleep-level book; a leaf lock (nothing under it blocks or takes another lock).
        self._levels_lock = threading.Lock()
        self._asleep: dict[str, tuple[int, float]] = {}   # backend -> (level, since) of its vLLM sleep
        self._last_sleep_s: dict[str, float] = {}         # servers sluice does not run: their last sleep's length
        self._adopt_managed()

    def reconfigure(self, configs: Mapping[str, "BackendConfig"]) -> None:
        self._configs = dict(configs)      # one assignment: readers see the old table or the new one
        self._adopt_managed()

    def _adopt_managed(self) -> None:
        """A managed vLLM backend sleeps at the level this book chooses (its supervisor calls back, also for
        an idle unload) and, with `stop_after_s`, is stopped once asleep that long (its monitor's tick)."""
        for name, cfg in self._configs.items():
            if self.managed(name):
                m = self.supervisor.get(name)
                if m.spec.sleep_method.startswith("vllm-sleep-"):
                    m.adapt_sleep(lambda n=name: self.choose_level(n), cfg.stop_after_s)

    def config(self, backend: str) -> "BackendConfig":
        return self._configs[backend]

    def gate_of(self, backend: str) -> str:
        return self._configs[backend].gate

    def managed(self, backend: str) -> bool:
        return self.supervisor is not None and backend in self.supervisor

    # ---- the scheduler's switcher: sleep | stop | wake ------------------------------------------------------
    def switch(self, backend: str, action: str) -> None:
        """Take a backend's model off the GPU ("sleep", "stop") or bring it back ("wake"); raises on failure.
        A "stop" of a server sluice does not run verifies it is asleep or gone instead."""
        {"sleep": self.sleep, "stop": self.stop, "wake": self.wake}[action](backend)

    def wake(self, backend: str) -> None:
        cfg = self._configs[backend]
        if self.managed(backend):
            self.supervisor.get(backend).ensure_ready(cfg.start_timeout_s)
        elif cfg.switch == "command":
            self._run(cfg.wake_cmd, cfg.sleep_timeout_s)
        elif cfg.switch == "vllm-sleep-auto":
            with self._levels_lock:
                entry = self._asleep.get(backend)
            if entry is None and self._says_asleep(backend) is False:
                return            # not put to sleep by this sluice, and it says it is awake: nothing to wake
            # Asleep at a level it was not put to by this sluice: level 2's wake is right for either level.
            self.wake_level(backend, entry[0] if entry is not None else 2)
            with self._levels_lock:
                if self._asleep.get(backend) == entry:
                    self._asleep.pop(backend, None)
                    if entry is not None:
                        self._last_sleep_s[backend] = self._clock() - entry[1]
        elif cfg.switch.startswith("vllm-sleep-"):
            self.wake_level(backend, int(cfg.switch[-1]))
            with self._levels_lock:
                self._asleep.pop(backend, None)

    def sleep(self, backend: str) -> None:
        cfg = self._configs[backend]
        if self.managed(backend):
            managed = self.supervisor.get(backend)
            state = managed.sleep()        # a failed sleep escalates to stop inside
            if state.value not in _DOWN_STATES and managed.spec.sleep_method != "none":
                raise errors.Unavailable(f"backend {backend!r} did not go to sleep (it is {state.value})",
                                         retry_after=5)
        elif cfg.switch == "command":
            self._run(cfg.sleep_cmd, cfg.sleep_timeout_s)
        elif cfg.switch.startswith("vllm-sleep-"):
            self.sleep_level(backend, self.choose_level(backend))

    def choose_level(self, backend: str) -> int:
        """The level `backend` is put to sleep at now, entered in the book (under its lock, so two sleeps at
        once cannot both take the last room in the budget): see the module docstring."""
        cfg = self._configs[backend]
        managed = self.supervisor.get(backend) if self.managed(backend) else None
        method = managed.spec.sleep_method if managed is not None and cfg.switch != "vllm-sleep-auto" else cfg.switch
        with self._levels_lock:
            level = int(method[-1]) if method in ("vllm-sleep-1", "vllm-sleep-2") else 2
            if method == "vllm-sleep-auto":
                last = managed.last_sleep_s if managed is not None else self._last_sleep_s.get(backend)
                came_back_soon = last is None or last < cfg.demote_after_s
                fits = self._l1_gb_locked(backend) + (cfg.weights_gb or 0.0) <= self.l1_ram_budget_gb
                level = 1 if came_back_soon and fits else 2
            self._asleep[backend] = (level, self._clock())
        return level

    def _l1_gb_locked(self, but: str) -> float:
        """RAM held by level-1 sleepers other than `but`."""
        self._prune_locked()
        return sum(self._configs[n].weights_gb or 0.0 for n, (level, _) in self._asleep.items()
                   if level == 1 and n != but and n in self._configs)

    def _prune_locked(self) -> None:
        """A managed backend no longer asleep (woken for a request, stopped, crashed) leaves the book: its
        supervisor, not this book, saw that happen."""
        for name in [n for n in self._asleep if self.managed(n)]:
            if self.supervisor.get(name).state.value != "sleeping":
                del self._asleep[name]

    def asleep_level(self, backend: str) -> int | None:
        """The vLLM sleep level `backend` is at (None: awake, stopped, or not a vLLM sleeper)."""
        with self._levels_lock:
            self._prune_locked()
            entry = self._asleep.get(backend)
        return entry[0] if entry is not None else None

    def sleep_level(self, backend: str, level: int) -> None:
        """vLLM's sleep mode at `level`, each call bounded by the backend's sleep_timeout_s."""
        self._upstreams[backend].vllm_sleep(level, timeout=self._configs[backend].sleep_timeout_s)

    def wake_level(self, backend: str, level: int) -> None:
        self._upstreams[backend].vllm_wake(level, timeout=self._configs[backend].sleep_timeout_s)

    def stop(self, backend: str) -> None:
        cfg = self._configs[backend]
        if self.managed(backend):
            managed = self.supervisor.get(backend)
            managed.stop()
            if managed.state.value != "stopped":
                raise errors.Unavailable(f"backend {backend!r} could not be stopped (it is {managed.state.value})",
                                         retry_after=5)
        elif cfg.switch == "command":
            self._run(cfg.sleep_cmd, cfg.sleep_timeout_s)     # no process to stop: the sleep command again
        elif cfg.switch.startswith("vllm-sleep-"):
            why = self.awake_reason(backend)
            if why is not None:
                with self._levels_lock:
                    self._asleep.pop(backend, None)     # the switch aborts: it stays resident, awake
                raise errors.Unavailable(f"backend {backend!r} is not run by sluice, so it cannot be stopped, "
                                         f"and {why}", retry_after=5)
        else:
            raise errors.Conflict(f"backend {backend!r} is not run by sluice and has no sleep method, so it "
                                  "cannot be stopped")

    def awake_reason(self, backend: str, timeout: float = 5.0, tries: int = 5) -> str | None:
        """None when a vLLM-style server is verifiably asleep (`GET /is_sleeping`) or gone (connection
        refused); else why it must be taken as still awake. A server killed a moment ago may reset the
        connection while its socket closes: that is asked again, a few times, before it counts as awake."""
        why = "no answer"
        for attempt in range(tries):
            if attempt:
                time.sleep(0.2)
            try:
                status, body = self._get(backend, "/is_sleeping", timeout)
            except ConnectionRefusedError:
                return None                                # nothing listens: the server is gone
            except (OSError, http.client.HTTPException) as e:
                why = f"GET /is_sleeping failed ({e})"
                continue
            if _sleeping_flag(status, body) is True:
                return None
            return f"GET /is_sleeping says it is awake (HTTP {status}: {body[:100]!r})"
        return why

    def _says_asleep(self, backend: str, timeout: float = 5.0) -> bool | None:
        """What `GET /is_sleeping` says (True, False); None when the server does not say (no answer, an
        error, a body without the flag): then only a wake is safe, never assuming it is awake."""
        try:
            return _sleeping_flag(*self._get(backend, "/is_sleeping", timeout))
        except (OSError, http.client.HTTPException):
            return None

    def _get(self, backend: str, path: str, timeout: float) -> tuple[int, bytes]:
        up = self._upstreams[backend]
        conn = http.client.HTTPConnection(up.host, up.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    @staticmethod
    def _run(argv, timeout: float) -> None:
        try:
            r = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise errors.BadGateway(f"{argv[0]} did not finish within sleep_timeout_s={timeout:g}s") from None
        except OSError as e:                 # not found, not executable: the configured command is wrong
            raise errors.BadGateway(f"cannot run {argv[0]}: {e.strerror or e}; check sleep_cmd/wake_cmd") from None
        if r.returncode != 0:
            raise errors.BadGateway(f"{argv[0]} exited {r.returncode}: "
                                    f"{r.stderr[-300:].decode(errors='replace')}")

    # ---- admin: one model's backends ------------------------------------------------------------------------
    def model_action(self, model: str, backends, action: str, scheduler) -> dict:
        """`POST /admin/models/{name}/{action}` for the backends that serve `model`.

        On an exclusive gate it is the scheduler's switch (`switch_now`): load/wake = "make this model
        resident" (drain the current one, sleep it, wake this one), sleep/unload = "take it off the GPU"
        (drain first) — never two models awake, no stream cut. On a shared gate a backend with requests in
        flight is not put down under them: 409, retry when they are done."""
        if action not in ACTIONS:
            raise errors.NotFound(f"unknown action {action!r}; use load, unload, sleep or wake")
        for b in backends:
            cfg = self._configs[b]
            if not self.managed(b) and cfg.switch == "none":
                raise errors.Conflict(f"backend {b!r} is not run by sluice and has no sleep method, so it cannot "
                                      f"{action}; give it an engine/command or switch = \"vllm-sleep-1\"")
        up = action in ("load", "wake")
        switched, gates = [], []
        for b in backends:
            gate = self.gate_of(b)
            if scheduler.is_exclusive(gate):
                if gate not in gates:
                    gates.append(gate)
                    switched.append(scheduler.switch_now(gate, model if up else None, evict=None if up else model,
                                                         how=self._down(backends, action)))
                continue
            if up:
                self.switch(b, "wake")
                continue
            with scheduler.holding(b, action):        # idle, and kept so while it goes down
                self.switch(b, self._down([b], action))
        return {"model": model, "action": action, "backends": list(backends), "switches": switched}

    def _down(self, backends, action: str) -> str:
        """How `action` takes backends down: unload stops what sluice runs; a server it does not run can
        only be put to sleep (its switch method)."""
        return "stop" if action == "unload" and all(self.managed(b) for b in backends) else "sleep"
