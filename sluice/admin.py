"""Operator routes: /admin/status, /admin/drain, /metrics, the dashboard at / and /openapi.json."""

from __future__ import annotations

import json
import time
from importlib import resources
from urllib.parse import parse_qs, urlsplit
from typing import TYPE_CHECKING

from sluice import __version__, errors
from sluice.server import Handler, Route

if TYPE_CHECKING:
    from sluice.app import App


class Admin:
    def __init__(self, app: "App"):
        self.app = app
        self._dashboard: bytes | None = None

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/admin/status", self.status, admin=True),
            Route("POST", "/admin/drain", self.drain, admin=True),
            Route("POST", "/admin/resume", self.resume, admin=True),
            Route("GET", "/admin/log", self.log_tail, admin=True),
            Route("POST", "/admin/models/", self.model_action, admin=True, prefix=True),
            Route("GET", "/metrics", self.metrics, admin=True),
            Route("GET", "/", self.dashboard, public=True),
            Route("GET", "/ui", self.dashboard, public=True),
            Route("GET", "/openapi.json", self.openapi, public=True),
        ]

    def status_doc(self) -> dict:
        app = self.app
        s = app.settings
        models, sources = app.table.models, app.table.sources
        snap = app.scheduler.snapshot()
        by_priority = {str(p): 0 for p in range(5)}
        by_model: dict[str, dict[str, int]] = {}
        for j in snap["waiting"]:
            by_priority[str(j["priority"])] += 1
            by_model.setdefault(j["model"], {}).setdefault(str(j["priority"]), 0)
            by_model[j["model"]][str(j["priority"])] += 1
        gates = []
        for name, g in snap["gates"].items():
            gates.append({**g, "jobs": [j for j in snap["active_jobs"] if j["gate"] == name]})
        health = app.api.health_doc(snap)
        managed = {i["name"]: i for i in app.supervisor.snapshot()} if app.supervisor else {}
        backends = []
        for b in s.backends:
            live = snap["backends"][b.name]
            proc = managed.get(b.name, {})
            backends.append({"name": b.name, "url": app.upstreams[b.name].url, "gate": b.gate,
                             "state": proc["state"].lower() if proc else live["health"], "managed": bool(proc),
                             "pid": proc.get("pid"), "uptime_s": proc.get("uptime_s"),
                             "restarts": proc.get("restarts", 0), "last_error": proc.get("last_error"),
                             "inflight": live["inflight"], "slots": live["slots"],
                             "sleep_level": app.ops.asleep_level(b.name),
                             "models": sorted(n for m in models if b.name in m.backends
                                              for n in (m.name, *m.aliases)),
                             "discover": b.discover, "manifest": app.table.manifest(b.name)})
        return {
            "version": __version__, "uptime_s": round(time.monotonic() - app.started, 1),
            "status": health["status"],
            "gates": gates,
            "queue": {"pending": snap["pending"], "by_priority": by_priority, "by_model": by_model,
                      "jobs": snap["waiting"]},
            "backends": backends,
            "models": [{"name": m.name, "aliases": list(m.aliases), "upstream_model": m.upstream_model,
                        "backends": list(m.backends), "source": sources.get(m.name, "config"),
                        "status": health["model_status"].get(m.name, "down")}
                       for m in models],
            "cloud": app.cloud.info(),
            "totals": snap["totals"],
            "recent": list(app.recent)[-50:],
            "config": {"host": s.host, "port": app.port, "max_queue_depth": s.max_queue_depth,
                       "aging_s": s.aging_s, "queue_timeout_s": s.queue_timeout_s,
                       "auth": bool(s.keys), "config_file": str(s.config_path) if s.config_path else None},
        }

    def status(self, h: Handler) -> None:
        self.app.flush_records()
        h.respond_json(200, self.status_doc())

    def drain(self, h: Handler) -> None:
        """Stop admitting new work; what is queued and in flight still finishes."""
        self.app.scheduler.drain(errors.Unavailable("sluice is draining for maintenance; retry later",
                                                    retry_after=30))
        h.respond_json(200, {"status": "draining", "pending": self.app.scheduler.snapshot()["pending"]})

    def resume(self, h: Handler) -> None:
        """Undo a drain: new work is admitted again."""
        resumed = self.app.scheduler.resume()
        h.respond_json(200, {"status": "ok", "resumed": resumed})

    def log_tail(self, h: Handler) -> None:
        """GET /admin/log?n=100: the last n request-log entries (the lines requests.jsonl gets), oldest first."""
        keep = self.app.recent.maxlen
        raw = parse_qs(urlsplit(h.path).query, keep_blank_values=True).get("n", ["100"])[-1]
        n = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 6 else 0
        if not 1 <= n <= keep:
            raise errors.BadRequest(f"n must be a whole number from 1 to {keep} (sluice keeps the last {keep} "
                                    f"requests in memory; older ones are in requests.jsonl); got {raw[:20]!r}",
                                    param="n")
        self.app.flush_records()
        h.respond_json(200, {"object": "list", "data": list(self.app.recent)[-n:]})

    def model_action(self, h: Handler, name: str = "", action: str = "", *rest: str) -> None:
        """POST /admin/models/{name}/load|unload|sleep|wake for the backends that serve a model."""
        app = self.app
        model = app.api.models.get(name)
        if model is None or rest:
            raise errors.NotFound(f"no model {name!r}; known: {', '.join(app.api.settings.model_names()[:-1])}",
                                  code="model_not_found")
        h.respond_json(200, app.ops.model_action(model.name, model.backends, action, app.scheduler))

    def metrics(self, h: Handler) -> None:
        self.app.flush_records()
        h.respond(200, self.app.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    def dashboard(self, h: Handler) -> None:
        if self._dashboard is None:
            self._dashboard = resources.files("sluice").joinpath("static/index.html").read_bytes()
        h.respond(200, self._dashboard, "text/html; charset=utf-8",
                  headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                           "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                      "script-src 'self' 'unsafe-inline'; img-src 'self' data:"})

    def openapi(self, h: Handler) -> None:
        from sluice.openapi import spec
        h.respond(200, json.dumps(spec(self.app.server.routes.routes)).encode())
