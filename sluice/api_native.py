"""The sluice-native API (compatible with the original sluice): /v1/query, /v1/health, /v1/queue/status; and
/v1/ready, the same health as a status code for balancers."""

from __future__ import annotations

import json
import time
from typing import Callable

from sluice import errors
from sluice.config import CLOUD
from sluice.jobs import JobPath, answered, int_field, num_field, str_field
from sluice.scheduler import Health, Job
from sluice.server import Handler, Route
from sluice.upstream import json_body, strip_think


class NativeApi:
    def __init__(self, jobs: JobPath):
        self.jobs = jobs
        self.starting: Callable[[], set[str]] = set     # managed backends still starting (health says warming)

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/query", self.query, api="native"),
            Route("GET", "/v1/health", self.health, api="native", public=True),
            Route("GET", "/v1/ready", self.ready, api="native", public=True),
            Route("GET", "/v1/queue/status", self.queue_status, api="native"),
        ]

    # ---- sluice-native -------------------------------------------------------------------------------
    def query(self, h: Handler) -> None:
        s = self.jobs.settings
        body = h.read_json(s.max_body_bytes)
        model = self.jobs.resolve(body.get("model", s.models[0].name if s.models else CLOUD), native=True)
        prompt = str_field(body, "prompt", s.max_prompt_chars, required=True)
        system = str_field(body, "system", s.max_prompt_chars)
        max_tokens = int_field(body, "max_tokens", 1, s.max_tokens, min(2048, s.max_tokens))
        cap = self.jobs.max_tokens_cap(model)
        if cap is not None:
            max_tokens = min(max_tokens, cap)
        temperature = num_field(body, "temperature", 0, 2, 0.3)
        priority = self.jobs.priority(h, body, model)
        timeout = num_field(body, "timeout", 0.001, 86400.0)
        job = self.jobs.new_job(h, body.get("model"), model, priority, "/v1/query", timeout_s=timeout)
        if s.log_prompts:
            job.payload = prompt
        result: dict = {}

        def serve(job: Job) -> None:
            if model == CLOUD or job.rerouted:
                result["text"] = self.jobs.cloud.query(prompt, system, max_tokens, temperature,
                                                  timeout or s.cloud_timeout_s)
                return
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            up_body = {"model": self.jobs.models[model].upstream_model, "messages": messages,
                       "max_tokens": max_tokens, "temperature": temperature, "stream": False,
                       "chat_template_kwargs": {"enable_thinking": False}}
            deadline = self.jobs.deadline(timeout)
            opened = self.jobs.forward(job, "/chat/completions", json.dumps(up_body).encode(), deadline)
            if opened is None:
                return serve(job)
            up, ex = opened
            data = ex.read(deadline)
            ex.close()
            if ex.status != 200:
                raise errors.BadGateway(answered(up.name, ex.status, data))
            obj = json_body(data, up.name)
            try:
                text = obj["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise errors.BadGateway(f"backend {up.name!r} returned no choices[0].message.content") from None
            if not isinstance(text, str):
                raise errors.BadGateway(f"backend {up.name!r} returned non-text content")
            job.usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
            result["text"] = strip_think(text)

        self.jobs.run(h, job, serve)
        job.status = 200
        h.respond_json(200, {"status": "ok", "source": "cloud" if model == CLOUD or job.rerouted else "local",
                             "result": result["text"], "id": job.id}, headers=self.jobs.response_headers(job))

    def health(self, h: Handler) -> None:
        doc = self.health_doc(self.jobs.scheduler.snapshot())
        if self.jobs.settings.keys and getattr(h, "key", None) is None:
            doc = {"status": doc["status"]}      # open to probes, but nothing about the setup without a key
        h.respond_json(200, doc)

    def ready(self, h: Handler) -> None:
        """Health as a status code, for a balancer (or a front sluice's `health_path`) that reads nothing else:
        200 while this sluice takes new work, 503 (with why) while it would refuse some of it."""
        snap = self.jobs.scheduler.snapshot()
        doc = self.health_doc(snap)
        why = self.not_ready(doc, snap)
        doc["ready"] = why is None
        if self.jobs.settings.keys and getattr(h, "key", None) is None:
            doc = {"status": doc["status"], "ready": doc["ready"]}
            why = why and "not ready; GET /v1/health with an API key says why"
        if why is None:
            return h.respond_json(200, doc)
        h.respond_json(503, {**doc, "error": why}, headers={"Retry-After": "5"})

    def not_ready(self, doc: dict, snap: dict) -> str | None:
        """Why this sluice would refuse new work now, or None: it is ready while it admits requests, grants
        them, and has for every model a backend that can take it (ready, warming, or merely failing its probe
        on an exclusive gate, where that means asleep). So `ok` and `warming` are ready, `draining` never,
        `degraded` only while every model still has somewhere to go (one of two backends of a model down)."""
        if snap["draining"]:
            return "draining: it takes no new requests (POST /admin/resume takes them again)"
        if doc.get("problem"):
            return f"queued requests are not being granted: {doc['problem']}"
        usable = {n for n, b in snap["backends"].items() if not b["out"]}      # the scheduler's own rule
        stuck = [m.name for m in self.jobs.settings.models if m.backends and not usable.intersection(m.backends)]
        if stuck:
            return f"no backend can take model(s) {', '.join(stuck)} now; they would be refused 503"
        return None

    def health_doc(self, snap: dict) -> dict:
        states = {name: b["health"] for name, b in snap["backends"].items()}
        model_status = {}
        for m in self.jobs.settings.models:
            hs = [states[b] for b in m.backends]
            model_status[m.name] = ("ready" if Health.READY in hs else
                                    "warming" if Health.PENDING in hs else "down")
        starting = self.starting()
        for m in self.jobs.settings.models:
            if model_status[m.name] == "ready" and all(b in starting for b in m.backends):
                model_status[m.name] = "warming"
        model_status[CLOUD] = self.jobs.cloud.mode()
        problem = snap.get("dispatcher")          # queued requests are not being granted
        if problem or any(v in (Health.DOWN, Health.FAILED) for v in states.values()):
            status = "degraded"
        elif snap.get("draining"):
            status = "draining"          # POST /admin/resume takes new work again
        elif starting or not all(v == Health.READY for v in states.values()):
            status = "warming"
        else:
            status = "ok"
        ready = sum(1 for m in self.jobs.settings.models if model_status[m.name] == "ready")
        doc = {"status": status, "models_ready": ready, "models_total": len(self.jobs.settings.models),
                "backends": {self.jobs.upstreams[n].url: v for n, v in states.items()},
                "model_status": model_status,
                "queue": {"pending": snap["pending"], "active": snap["active"] > 0,
                          "total_served": snap["totals"]["served"], "avg_latency_ms": snap["avg_latency_ms"]}}
        if problem:
            doc["problem"] = problem
        return doc

    def queue_status(self, h: Handler) -> None:
        snap = self.jobs.scheduler.snapshot()
        t = snap["totals"]
        elapsed = max((j["elapsed_s"] for j in snap["active_jobs"]), default=0.0)
        h.respond_json(200, {
            "pending": snap["pending"], "active": snap["active"] > 0, "active_elapsed_s": elapsed,
            "active_count": snap["active"],
            "total_received": t["received"], "total_served": t["served"], "total_rejected": t["rejected"],
            "total_timeouts": t["timed_out"], "total_cancelled": t["cancelled"], "total_errors": t["failed"],
            "avg_latency_ms": snap["avg_latency_ms"], "uptime_s": round(time.monotonic() - self.jobs.started, 1),
            "gates": list(snap["gates"].values()),
        })
