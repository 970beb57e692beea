"""Operator routes: /admin/status, /admin/drain, /metrics, the dashboard at / and /openapi.json."""

from __future__ import annotations

import json
import time
from importlib import resources
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
            Route("GET", "/metrics", self.metrics, admin=True),
            Route("GET", "/", self.dashboard, public=True),
            Route("GET", "/ui", self.dashboard, public=True),
            Route("GET", "/openapi.json", self.openapi, public=True),
        ]

    def status_doc(self) -> dict:
        app = self.app
        s = app.settings
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
        backends = []
        for b in s.backends:
            live = snap["backends"][b.name]
            backends.append({"name": b.name, "url": b.url, "gate": b.gate, "state": live["health"],
                             "pid": None, "uptime_s": None, "restarts": 0, "last_error": None,
                             "inflight": live["inflight"], "slots": live["slots"],
                             "models": sorted(n for m in s.models if b.name in m.backends
                                              for n in (m.name, *m.aliases))})
        return {
            "version": __version__, "uptime_s": round(time.monotonic() - app.started, 1),
            "status": health["status"],
            "gates": gates,
            "queue": {"pending": snap["pending"], "by_priority": by_priority, "by_model": by_model,
                      "jobs": snap["waiting"]},
            "backends": backends,
            "models": [{"name": m.name, "aliases": list(m.aliases), "upstream_model": m.upstream_model,
                        "backends": list(m.backends), "status": health["model_status"][m.name]}
                       for m in s.models],
            "cloud": app.cloud.info(),
            "totals": snap["totals"],
            "recent": list(app.recent)[-50:],
            "config": {"host": s.host, "port": app.port, "max_queue_depth": s.max_queue_depth,
                       "aging_s": s.aging_s, "queue_timeout_s": s.queue_timeout_s,
                       "auth": bool(s.keys), "config_file": str(s.config_path) if s.config_path else None},
        }

    def status(self, h: Handler) -> None:
        h.respond_json(200, self.status_doc())

    def drain(self, h: Handler) -> None:
        """Stop admitting new work; what is queued and in flight still finishes."""
        self.app.scheduler.drain(errors.Unavailable("sluice is draining for maintenance; retry later",
                                                    retry_after=30))
        h.respond_json(200, {"status": "draining", "pending": self.app.scheduler.snapshot()["pending"]})

    def metrics(self, h: Handler) -> None:
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
