"""The composition root: build every part from the settings, start them in order, stop them in reverse.

Start: scheduler (dispatcher) -> health probes -> HTTP server.
Stop:  stop accepting -> answer queued jobs 503 -> let in-flight jobs finish (bounded) -> probes ->
       dispatcher -> close upstream connections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import threading
import time
from collections import deque

from sluice import __version__, errors, logfile
from sluice.admin import Admin
from sluice.api import Api
from sluice.backend_rules import State
from sluice.backends import BackendOps, process_spec, upstream_url
from sluice.browser import BrowserGuard
from sluice.cloud import Cloud
from sluice.config import ConfigError, Settings
from sluice.metrics import SluiceMetrics
from sluice.models import ModelTable
from sluice.monitor import Supervisor
from sluice.scheduler import BackendSpec, Health, Job, Scheduler
from sluice.server import Route, Routes, Server, compact_json
from sluice.upstream import HealthMonitor, Upstream

log = logging.getLogger("sluice")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guard(s: Settings) -> BrowserGuard:
    return BrowserGuard(s.host, s.allowed_hosts, s.cors_origins)


def _requests_log(log_dir) -> logfile.BatchHandler | None:
    """requests.jsonl in SLUICE_LOG_DIR, one JSON object per finished job, rotated by size."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        return logfile.file_handler(log_dir / "requests.jsonl", 20 << 20, 3)
    except OSError as e:
        log.warning("cannot write %s/requests.jsonl (%s); request log disabled", log_dir, e)
        return None


class App:
    def __init__(self, settings: Settings, environ=None):
        if not is_loopback(settings.host) and not settings.keys and not settings.allow_unauthenticated:
            raise ConfigError(
                f"SLUICE_HOST: refusing to listen on {settings.host!r} without API keys; set SLUICE_API_KEYS "
                "(clients send Authorization: Bearer KEY), or SLUICE_ALLOW_UNAUTHENTICATED=1 to allow it anyway")
        self.settings = settings
        self.started = time.monotonic()
        self.recent: deque[dict] = deque(maxlen=200)
        # Finished jobs wait here for the recorder; appending wakes no thread, so recording never competes
        # with a request for the interpreter while that request is still being answered.
        self._records: deque[tuple] = deque()
        self._records_lock = threading.Lock()
        self._recording = threading.Thread(target=self._recorder, name="sluice-recorder", daemon=True)
        procs = [process_spec(b, settings) for b in settings.backends if b.managed]
        spec = {p.name: p for p in procs}
        self.upstreams = {b.name: Upstream(b.name, upstream_url(b, spec.get(b.name)), b.api_key)
                          for b in settings.backends}
        self.table = ModelTable(settings)
        specs = [BackendSpec(b.name, b.gate, self.table.serving(b.name), b.slots, b.jit_swap)
                 for b in settings.backends]
        self.scheduler = Scheduler(settings.gates, specs, max_queue_depth=settings.max_queue_depth,
                                   aging_s=settings.aging_s, on_finish=self._record,
                                   switcher=lambda backend, action: self.ops.switch(backend, action),
                                   on_switch=lambda gate, phases: self.metrics.record_switch(gate, phases))
        self.cloud = Cloud(settings.cloud_model, settings.cloud_concurrency, settings.claude_bin, environ)
        # Managed backends are probed by their supervisor; the health monitor watches the others.
        self.supervisor = Supervisor(procs, settings.state_dir, on_change=self._managed_changed,
                                     is_busy=self.scheduler.busy) if procs else None
        # The one owner of every backend action: the scheduler's switches, admin's and validate's.
        self.ops = BackendOps({b.name: b for b in settings.backends}, self.upstreams, self.supervisor,
                              l1_ram_budget_gb=settings.l1_ram_budget_gb)
        for p in procs:
            self.scheduler.set_health(p.name, Health.READY)      # startable on demand: not down
        self.health = HealthMonitor({b.name: (self.upstreams[b.name], b.health_path)
                                     for b in settings.backends if not b.managed},
                                    self._report_health, settings.health_interval_s,
                                    discover={b.name for b in settings.backends if b.discover},
                                    on_manifest=self.table.report, manifest_interval=settings.manifest_interval_s,
                                    after_round=self.table.retire_drained)
        self.api = Api(self.table.effective(), self.scheduler, self.upstreams, self.cloud,
                       on_backend_refused=self._backend_refused, started=self.started, use_backend=self._use_backend)
        self.table.bind(self.scheduler, self.api.reconfigure)
        self.api.native.starting = self._starting
        self.admin = Admin(self)
        self.metrics = SluiceMetrics(__version__, self.admin.status_doc, lambda: time.monotonic() - self.started)
        self.server = Server((settings.host, settings.port), Routes(self.api.routes() + self.admin.routes()),
                             self.authorize, settings.client_timeout_s, settings.max_connections,
                             _guard(settings), settings.max_connections_per_client)
        # Ollama clients look for their own port (11434): the same routes on a second listener.
        self.ollama_server = None if settings.ollama_port is None else Server(
            (settings.host, settings.ollama_port), self.server.routes, self.authorize, settings.client_timeout_s,
            settings.max_connections, _guard(settings), settings.max_connections_per_client)
        self._requests_log = _requests_log(settings.log_dir)
        self._serving: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def ollama_port(self) -> int | None:
        return self.ollama_server.server_address[1] if self.ollama_server is not None else None

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "App":
        self._recording.start()
        if self.supervisor is not None:
            self.supervisor.start()
        self.scheduler.start()
        self.health.start()
        self._serving = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                         name="sluice-http", daemon=True)
        self._serving.start()
        if self.ollama_server is not None:
            threading.Thread(target=self.ollama_server.serve_forever, kwargs={"poll_interval": 0.2},
                             name="sluice-http-ollama", daemon=True).start()
            log.info("sluice serving Ollama clients on port %d", self.ollama_server.server_address[1])
        log.info("sluice listening on %s (models: %s)", self.url, ", ".join(self.settings.model_names()))
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Graceful: no new connections, queued jobs answered 503, in-flight ones finish within `timeout`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        timeout = self.settings.shutdown_timeout_s if timeout is None else timeout
        self.server.shutdown()
        if self.ollama_server is not None:
            self.ollama_server.shutdown()
        for server in filter(None, (self.server, self.ollama_server)):
            server.connections.shed_idle()     # kept-alive clients see the close a process exit would give them
        n = self.scheduler.close(errors.Unavailable("sluice is shutting down; retry against another instance "
                                                    "or after it restarts", retry_after=5))
        if n:
            log.info("answered %d queued request(s) with 503 (shutting down)", n)
        if not self.scheduler.wait_idle(timeout):
            log.warning("in-flight requests still running after %.0fs; stopping anyway", timeout)
        self.health.stop()
        self.scheduler.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
        self.server.server_close()
        if self.ollama_server is not None:
            self.ollama_server.server_close()
        for up in self.upstreams.values():
            up.close()
        self._recording.join(timeout=5)
        if self._requests_log is not None:
            self._requests_log.close()

    def reload(self, new: Settings) -> None:
        """Apply a re-read config without dropping queued or in-flight work (SIGHUP).

        Keys, limits and models change in place: a model may be added, removed, renamed, or given other
        aliases, upstream id or backends (among the existing ones). Jobs in flight finish where they are.
        Queued jobs of a model that still has a backend keep their place. A removed model takes no new
        requests but still serves its queued ones on the backends it had ("retiring", until they are
        done), unless the new configuration uses its name for something else: then they fail at once with
        a clear 503. Gates and backends shape the slots, the probes and the processes sluice runs, so
        changing those is refused: restart to apply them (a backend's `models` list may change).
        """
        old = self.settings
        shape = lambda s: (s.gates, [dataclasses.replace(b, models=()) for b in s.backends], s.host, s.port,
                           s.ollama_port)
        if shape(new) != shape(old):
            raise ConfigError("gates, backends or the listen address changed; "
                              "restart sluice to apply those (the running configuration is kept)")
        if not is_loopback(new.host) and not new.keys and not new.allow_unauthenticated:
            raise ConfigError("the new configuration has no API keys for a non-loopback address")
        changes = self.table.reload(new)
        self.settings = new
        self.ops.reconfigure({b.name: b for b in new.backends})
        self.scheduler.max_queue_depth = new.max_queue_depth
        self.scheduler.aging_s = new.aging_s
        for server in filter(None, (self.server, self.ollama_server)):
            server.client_timeout_s = new.client_timeout_s
            server.connections.max_total = new.max_connections
            server.connections.per_client = new.max_connections_per_client
            server.guard = _guard(new)
        self.health.manifest_interval = new.manifest_interval_s
        log.info("configuration reloaded (%d key(s), queue depth %d; %s)", len(new.keys), new.max_queue_depth,
                 changes)

    def __enter__(self) -> "App":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(timeout=5)

    # ---- wiring ------------------------------------------------------------------------------------------
    def _report_health(self, backend: str, ok: bool) -> None:
        self.scheduler.set_health(backend, Health.READY if ok else Health.DOWN)

    def _managed_changed(self, name: str, old, new) -> None:
        # FAILED (restarts exhausted, start timeout) refuses its jobs at once, on an exclusive gate too (a
        # switch to it would take the working model down for nothing); every other state can serve
        # (STOPPED and SLEEPING start or wake on the next request).
        if new is State.FAILED:
            self.scheduler.set_health(name, Health.FAILED, self.supervisor.get(name).last_error)
        else:
            self.scheduler.set_health(name, Health.READY)

    def _starting(self) -> set[str]:
        """Managed backends whose process is starting: health says "warming" until they are ready."""
        if self.supervisor is None:
            return set()
        return {i["name"] for i in self.supervisor.snapshot() if i["state"] == "starting"}

    def _use_backend(self, name: str, timeout: float):
        """Context for forwarding to a backend: a managed one is started or woken first and kept from idle
        unload until the request is done."""
        if self.supervisor is not None and name in self.supervisor:
            return self.supervisor.get(name).use(timeout)
        return contextlib.nullcontext()

    def _backend_refused(self, backend: str) -> None:
        self.scheduler.set_health(backend, Health.DOWN)
        self.health.kick()

    def authorize(self, h, route: Route) -> None:
        """Set `h.key` to the caller's key; refuse what that key may not do. Without keys all is open."""
        h.key = None
        keys = self.settings.keys
        if not keys:
            return
        auth = h.headers.get("Authorization", "")
        given = (auth[7:].strip() if auth[:7].lower() == "bearer " else h.headers.get("x-api-key", "")).encode()
        # Compare against every key, each in constant time, so timing tells nothing about which matched.
        for k in keys:
            if hmac.compare_digest(given, k.key.encode()):
                h.key = k
        if route.public:
            return
        if h.key is None:
            raise errors.Unauthorized("missing or wrong API key; send Authorization: Bearer KEY or x-api-key: KEY")
        if route.admin and not h.key.admin:
            raise errors.Forbidden(f"key {h.key.name!r} is not an admin key")

    def _record(self, job: Job) -> None:
        """Note a finished job: only the clocks are read here; the recorder thread builds the entry, off the
        request's path (a finished job's fields are final; its HTTP status, if not yet set, is the error's)."""
        self._records.append((job, time.monotonic(), time.time()))

    def _entry(self, job: Job, now: float, wall: float) -> dict:
        service_ms = (now - job.granted_at) * 1000 if job.granted_at is not None else 0.0
        ttfb_ms = (job.first_byte_at - job.granted_at) * 1000 if job.first_byte_at and job.granted_at else None
        entry = {"time": round(wall, 3), "id": job.id, "route": job.route, "model": job.model,
                 "priority": job.priority, "outcome": job.outcome.value, "status": job.status or
                 (job.error.status if job.error else 200), "backend": job.backend, "client": job.client,
                 "wait_ms": round(job.wait_s * 1000, 2), "service_ms": round(service_ms, 2),
                 "ttfb_ms": round(ttfb_ms, 2) if ttfb_ms is not None else None, "usage": job.usage}
        if self.settings.log_prompts and job.payload is not None:
            entry["prompt"] = job.payload
        return entry

    def flush_records(self) -> None:
        """Record every job finished so far (metrics, log, `recent`): the recorder's work, done now."""
        with self._records_lock, logfile.batch():
            while self._records:
                self._record_one(*self._records.popleft())

    def _recorder(self) -> None:
        while not self._stopped.wait(0.2):
            self.flush_records()
        self.flush_records()

    def _record_one(self, job: Job, now: float, wall: float) -> None:
        try:
            entry = self._entry(job, now, wall)
            error = job.error.message if job.error is not None and job.outcome.value != "ok" else None
            self.metrics.record(entry, job.granted_at is not None)
            self.recent.append(entry)
            if self._requests_log is not None:
                self._requests_log.write_line(compact_json(entry))
            log.info("req=%s route=%s model=%s prio=%d wait_ms=%.1f service_ms=%.1f outcome=%s status=%s%s",
                     entry["id"], entry["route"], entry["model"], entry["priority"], entry["wait_ms"],
                     entry["service_ms"], entry["outcome"], entry["status"], f" error={error!r}" if error else "")
        except Exception:
            log.exception("recording a finished request failed")
