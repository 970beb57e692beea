"""The client-facing routes: sluice-native (/v1/query, /v1/health, /v1/queue/status) and OpenAI-compatible.

Each route validates its input completely before anything reaches the scheduler (invariant 7), then
runs the same life of a job: submit -> wait for a grant (watching the client) -> forward -> finish once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from typing import Any, Callable

from sluice import errors
from sluice.config import CLOUD, Settings
from sluice.scheduler import Health, Job, Outcome, Scheduler
from sluice.server import ClientGone, Handler, Route, compact_json
from sluice.upstream import Exchange, Upstream, json_body, strip_think

log = logging.getLogger("sluice.api")

# Fields whose value changes what sluice does or allows. One of them twice (`"max_tokens":99999,"max_tokens":5`)
# makes sluice re-encode the body: it checked the last value, and a backend whose parser keeps the first one
# must not see another.
_DECIDING_FIELDS = (b'"stream"', b'"max_tokens"', b'"max_completion_tokens"')
_OUTCOME = {errors.QueueTimeout: Outcome.TIMEOUT, errors.Cancelled: Outcome.CANCELLED,
            errors.QueueFull: Outcome.REJECTED, errors.TooManyRequests: Outcome.REJECTED}


def outcome_of(err: Exception) -> Outcome:
    return next((o for cls, o in _OUTCOME.items() if isinstance(err, cls)), Outcome.ERROR)


# ---- validation: every field sluice reads, with a message that names it ---------------------------------
def _int_field(body: dict, name: str, lo: int, hi: int, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise errors.BadRequest(f"{name} must be an integer from {lo} to {hi}, got {_show(v)}", param=name)
    if not lo <= v <= hi:
        raise errors.BadRequest(f"{name} must be from {lo} to {hi}, got {v}", param=name)
    return v


def _num_field(body: dict, name: str, lo: float, hi: float, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise errors.BadRequest(f"{name} must be a number from {lo:g} to {hi:g}, got {_show(v)}", param=name)
    if not lo <= v <= hi:
        raise errors.BadRequest(f"{name} must be from {lo:g} to {hi:g}, got {v}", param=name)
    return v


def _str_field(body: dict, name: str, max_chars: int, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise errors.BadRequest(f"{name} is required (a non-empty string)", param=name)
        return None
    if not isinstance(v, str):
        raise errors.BadRequest(f"{name} must be a string, got {_show(v)}", param=name)
    if required and not v.strip():
        raise errors.BadRequest(f"{name} must not be empty", param=name)
    if len(v) > max_chars:
        raise errors.BadRequest(f"{name} is {len(v)} characters; the limit is {max_chars} (SLUICE_MAX_PROMPT_CHARS)",
                                param=name)
    return v


def _show(v: Any) -> str:
    return f"{type(v).__name__} {json.dumps(v)[:40]}" if not isinstance(v, (dict, list)) else type(v).__name__


def with_model(raw: bytes, asked: str, upstream: str) -> bytes | None:
    """`raw` (a JSON object whose "model" is `asked`) with that value replaced by `upstream`, every other
    byte as it was; None when that is not certain on the bytes alone (the caller then re-encodes).

    Certain because a key that reads "model" is spelled `"model"` unless it escapes a letter (\\u006X): with
    no such escape in the body, the top-level key is where those seven bytes are, when they occur once.
    """
    i = raw.find(b'"model"')
    if i < 0 or raw.find(b'"model"', i + 7) >= 0 or b"\\u006" in raw or raw.startswith(b"\xef\xbb\xbf"):
        return None
    old = _json_str(asked)
    j = raw.find(old, i + 7)
    if j < 0 or raw[i + 7:j].strip(b" \t\r\n") != b":":
        return None
    return raw[:j] + _json_str(upstream) + raw[j + len(old):]


@functools.lru_cache(maxsize=1024)
def _json_str(s: str) -> bytes:
    return json.dumps(s).encode()


class Api:
    def __init__(self, settings: Settings, scheduler: Scheduler, upstreams: dict[str, Upstream], cloud,
                 *, on_backend_refused: Callable[[str], None] | None = None, started: float | None = None,
                 use_backend: Callable | None = None):
        self.scheduler = scheduler
        self.upstreams = upstreams
        self.cloud = cloud
        self.reconfigure(settings)
        self._refused = on_backend_refused or (lambda name: None)
        self._use_backend = use_backend or (lambda name, timeout: contextlib.nullcontext())
        self.started_wall = time.time()
        self.starting: Callable[[], set[str]] = set     # managed backends still starting (health says warming)
        self.started = started if started is not None else time.monotonic()

    def reconfigure(self, settings: Settings) -> None:
        # One assignment per attribute: a request thread sees the old or the new mapping, never half.
        self.models = {n: m for m in settings.models for n in (m.name, *m.aliases)}
        self.backends = {b.name: b for b in settings.backends}
        self.settings = settings

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/query", self.query, native=True),
            Route("GET", "/v1/health", self.health, native=True, public=True),
            Route("GET", "/v1/queue/status", self.queue_status, native=True),
            Route("POST", "/v1/chat/completions", lambda h: self.openai(h, "/chat/completions")),
            Route("POST", "/v1/completions", lambda h: self.openai(h, "/completions")),
            Route("POST", "/v1/embeddings", lambda h: self.openai(h, "/embeddings")),
            Route("GET", "/v1/models", self.list_models),
            Route("GET", "/v1/models/", self.get_model, prefix=True),
        ]

    # ---- helpers -----------------------------------------------------------------------------------
    def resolve(self, name: Any, native: bool) -> str:
        """The canonical model name for a requested name or alias; unknown names list the known ones."""
        if not isinstance(name, str) or not name:
            raise errors.BadRequest(f"model must be a non-empty string, got {_show(name)}", param="model")
        if name == CLOUD:
            return CLOUD
        model = self.models.get(name)
        if model is None:
            known = ", ".join(self.settings.model_names())
            msg = f"unknown model {name!r}; known models: {known}"
            if native:
                raise errors.BadRequest(msg, param="model", code="model_not_found")
            raise errors.NotFound(msg, param="model", code="model_not_found")
        return model.name

    def priority(self, h: Handler, body: dict) -> int:
        if body.get("priority") is not None:
            return _int_field(body, "priority", 0, 4)
        header = h.headers.get("X-Sluice-Priority")
        if header is None:
            return self.settings.default_priority
        value = header.strip(" \t")
        if len(value) != 1 or value not in "01234":       # ASCII only: '²'.isdigit() is True
            raise errors.BadRequest(f"X-Sluice-Priority must be an integer from 0 to 4, got {header[:20]!r}",
                                    param="priority")
        return int(value)

    def new_job(self, h: Handler, asked_model: str, model: str, priority: int, route: str, **kw) -> Job:
        """A job for the caller's key: its allowed models, its priority ceiling, its own queue limit."""
        key = getattr(h, "key", None)
        kw["id"] = h.request_id          # one id for the client's X-Request-Id, the log line and the JSONL entry
        if key is None:
            return Job(model, priority, route, **kw)
        if key.models and asked_model not in key.models and model not in key.models:
            raise errors.Forbidden(f"key {key.name!r} may not use model {asked_model!r} "
                                   f"(allowed: {', '.join(key.models)})", param="model")
        if priority < key.max_priority:
            h.extra_headers["X-Sluice-Priority-Clamped"] = f"{priority}->{key.max_priority}"
            priority = key.max_priority
        return Job(model, priority, route, client=key.name, max_queued=key.max_queued, **kw)

    def run(self, h: Handler, job: Job, serve: Callable[[Job], None],
            tick: Callable[[int], None] | None = None) -> None:
        """The life of a job: admitted, granted, served, finished exactly once."""
        model = self.models.get(job.model)
        if model is not None and model.fallback and job.route in ("/v1/query", "/v1/chat/completions") \
                and self.cloud.mode() != "unavailable":
            job.fallback_at = time.monotonic() + model.fallback_after_s
        self.scheduler.submit(job)  # raises the refusal (queue full, backend down); the job is already finished
        try:
            with h.server.watcher.watch(h.connection, lambda: self.scheduler.cancel(job)):
                self.scheduler.wait(job, tick, self.settings.sse_keepalive_s, min(5.0, self.settings.sse_keepalive_s))
                if job.backend is None:
                    serve(job)
                else:
                    with self._use_backend(job.backend, max(0.001, job.deadline - time.monotonic())):
                        serve(job)
        except errors.SluiceError as e:
            if job.abort_error is not None:          # sluice itself cut it short (e.g. a drain timeout)
                e = job.abort_error
            self.scheduler.finish(job, outcome_of(e), e)
            job.status = job.status or e.status
            raise e from None
        except ClientGone:
            self.scheduler.finish(job, Outcome.CANCELLED, errors.Cancelled("client disconnected"))
            raise
        except BaseException as e:
            self.scheduler.finish(job, Outcome.ERROR, errors.SluiceError(f"internal error: {e}"))
            raise
        self.scheduler.finish(job, Outcome.OK)

    def _headers(self, job: Job) -> dict[str, str]:
        return {"X-Sluice-Queue-Wait-Ms": f"{job.wait_s * 1000:.1f}",
                "X-Sluice-Backend": job.backend or (CLOUD if job.rerouted else job.model)}

    def _open(self, job: Job, path: str, body: bytes, deadline: float) -> tuple[Upstream, Exchange] | None:
        """Forward to the granted backend. None: it refused before anything was sent and the job moved to
        the cloud route (the model has fallback = "cloud")."""
        up = self.upstreams[job.backend]
        try:
            ex = up.open("POST", path, body, deadline,
                         on_open=lambda ex: self.scheduler.attach(job, ex.abort))
        except errors.BackendRefused:
            self._refused(job.backend)
            if job.fallback_at is None:
                raise
            log.warning("req=%s backend %s refused; falling back to the cloud route", job.id, job.backend)
            self.scheduler.reroute(job)
            return None
        job.first_byte_at = time.monotonic()
        return up, ex

    def _deadline(self, timeout: float | None = None) -> float:
        """When the forward must be done: the caller's own timeout, else SLUICE_QUEUE_TIMEOUT from the grant.
        One deadline covers the whole attempt chain (the one allowed reconnect included)."""
        return time.monotonic() + (timeout or self.settings.queue_timeout_s)

    # ---- sluice-native -------------------------------------------------------------------------------
    def query(self, h: Handler) -> None:
        s = self.settings
        body = h.read_json(s.max_body_bytes)
        model = self.resolve(body.get("model", s.models[0].name if s.models else CLOUD), native=True)
        prompt = _str_field(body, "prompt", s.max_prompt_chars, required=True)
        system = _str_field(body, "system", s.max_prompt_chars)
        max_tokens = _int_field(body, "max_tokens", 1, s.max_tokens, min(2048, s.max_tokens))
        temperature = _num_field(body, "temperature", 0, 2, 0.3)
        priority = _int_field(body, "priority", 0, 4, s.default_priority)
        timeout = _num_field(body, "timeout", 0.001, 86400.0)
        job = self.new_job(h, body.get("model"), model, priority, "/v1/query", timeout_s=timeout or s.queue_timeout_s)
        if s.log_prompts:
            job.payload = prompt
        result: dict = {}

        def serve(job: Job) -> None:
            if model == CLOUD or job.rerouted:
                result["text"] = self.cloud.query(prompt, system, max_tokens, temperature,
                                                  timeout or s.cloud_timeout_s)
                return
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            up_body = {"model": self.models[model].upstream_model, "messages": messages,
                       "max_tokens": max_tokens, "temperature": temperature, "stream": False,
                       "chat_template_kwargs": {"enable_thinking": False}}
            deadline = self._deadline(timeout)
            opened = self._open(job, "/chat/completions", json.dumps(up_body).encode(), deadline)
            if opened is None:
                return serve(job)
            up, ex = opened
            data = ex.read(deadline)
            ex.close()
            if ex.status != 200:
                raise errors.BadGateway(f"backend {up.name!r} answered {ex.status}: {data[:300].decode('utf-8', 'replace')}")
            obj = json_body(data, up.name)
            try:
                text = obj["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise errors.BadGateway(f"backend {up.name!r} returned no choices[0].message.content") from None
            if not isinstance(text, str):
                raise errors.BadGateway(f"backend {up.name!r} returned non-text content")
            job.usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
            result["text"] = strip_think(text)

        self.run(h, job, serve)
        job.status = 200
        h.respond_json(200, {"status": "ok", "source": "cloud" if model == CLOUD or job.rerouted else "local",
                             "result": result["text"], "id": job.id}, headers=self._headers(job))

    def health(self, h: Handler) -> None:
        doc = self.health_doc(self.scheduler.snapshot())
        if self.settings.keys and getattr(h, "key", None) is None:
            doc = {"status": doc["status"]}      # open to probes, but nothing about the setup without a key
        h.respond_json(200, doc)

    def health_doc(self, snap: dict) -> dict:
        states = {name: b["health"] for name, b in snap["backends"].items()}
        model_status = {}
        for m in self.settings.models:
            hs = [states[b] for b in m.backends]
            model_status[m.name] = ("ready" if Health.READY in hs else
                                    "warming" if Health.PENDING in hs else "down")
        starting = self.starting()
        for m in self.settings.models:
            if model_status[m.name] == "ready" and all(b in starting for b in m.backends):
                model_status[m.name] = "warming"
        model_status[CLOUD] = self.cloud.mode()
        if any(v in (Health.DOWN, Health.FAILED) for v in states.values()):
            status = "degraded"
        elif snap.get("draining"):
            status = "draining"          # POST /admin/resume takes new work again
        elif starting or not all(v == Health.READY for v in states.values()):
            status = "warming"
        else:
            status = "ok"
        ready = sum(1 for m in self.settings.models if model_status[m.name] == "ready")
        return {"status": status, "models_ready": ready, "models_total": len(self.settings.models),
                "backends": {self.upstreams[n].url: v for n, v in states.items()},
                "model_status": model_status,
                "queue": {"pending": snap["pending"], "active": snap["active"] > 0,
                          "total_served": snap["totals"]["served"], "avg_latency_ms": snap["avg_latency_ms"]}}

    def queue_status(self, h: Handler) -> None:
        snap = self.scheduler.snapshot()
        t = snap["totals"]
        elapsed = max((j["elapsed_s"] for j in snap["active_jobs"]), default=0.0)
        h.respond_json(200, {
            "pending": snap["pending"], "active": snap["active"] > 0, "active_elapsed_s": elapsed,
            "active_count": snap["active"],
            "total_received": t["received"], "total_served": t["served"], "total_rejected": t["rejected"],
            "total_timeouts": t["timed_out"], "total_cancelled": t["cancelled"], "total_errors": t["failed"],
            "avg_latency_ms": snap["avg_latency_ms"], "uptime_s": round(time.monotonic() - self.started, 1),
            "gates": list(snap["gates"].values()),
        })

    # ---- OpenAI-compatible ---------------------------------------------------------------------------
    def _model_names(self) -> list[str]:
        names = [n for m in self.settings.models for n in (m.name, *m.aliases)]
        return names + [CLOUD] if self.cloud.mode() != "unavailable" else names

    def _model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": int(self.started_wall), "owned_by": "sluice"}

    def list_models(self, h: Handler) -> None:
        h.respond_json(200, {"object": "list", "data": [self._model_object(n) for n in self._model_names()]})

    def get_model(self, h: Handler, *parts: str) -> None:
        """GET /v1/models/{id} (the SDKs' models.retrieve); an id may hold slashes."""
        name = "/".join(parts)
        if name not in self._model_names():
            raise errors.NotFound(f"no model {name!r}; GET /v1/models lists them", param="model",
                                  code="model_not_found")
        h.respond_json(200, self._model_object(name))

    def openai(self, h: Handler, path: str) -> None:
        s = self.settings
        body = h.read_json(s.max_body_bytes)
        model = self.resolve(body.get("model"), native=False)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise errors.BadRequest(f"stream must be true or false, got {_show(stream)}", param="stream")
        if path == "/embeddings":
            if stream:
                raise errors.BadRequest("embeddings cannot be streamed", param="stream")
            if not isinstance(body.get("input"), (str, list)):
                raise errors.BadRequest("input must be a string or a list", param="input")
        elif path == "/chat/completions":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise errors.BadRequest("messages must be a non-empty list of message objects", param="messages")
        elif not isinstance(body.get("prompt"), (str, list)):
            raise errors.BadRequest("prompt must be a string or a list", param="prompt")
        for name in ("max_tokens", "max_completion_tokens"):
            _int_field(body, name, 1, s.max_tokens)
        _num_field(body, "temperature", 0, 2)
        if "stream_options" in body and not isinstance(body["stream_options"], (dict, type(None))):
            raise errors.BadRequest("stream_options must be an object", param="stream_options")
        priority = self.priority(h, body)
        if model == CLOUD and path != "/chat/completions":
            raise errors.BadRequest(f"model {CLOUD!r} serves /v1/chat/completions only", param="model")
        job = self.new_job(h, body.get("model"), model, priority, "/v1" + path, stream=stream,
                           timeout_s=s.queue_timeout_s)
        if s.log_prompts:
            job.payload = body.get("messages", body.get("prompt", body.get("input")))
        upstream_model = self.models[model].upstream_model if model != CLOUD else None
        sse = _SSE(h, job, self)
        try:
            self.run(h, job, lambda job: self._serve_openai(h, job, path, body, upstream_model, sse),
                     tick=sse.tick if stream else None)
        except errors.SluiceError as e:
            if not sse.started:
                raise
            sse.fail(e)   # the 200 head went out while it waited: end the stream with an error event
            return
        if sse.started:
            sse.done()

    def _serve_openai(self, h: Handler, job: Job, path: str, body: dict, upstream_model: str | None,
                      sse: "_SSE") -> None:
        if job.model == CLOUD or job.rerouted:
            return self._serve_cloud(h, job, body, sse)
        forward_priority = self.backends[job.backend].forward_priority
        # The client's own bytes with only the model swapped, when nothing else changes (the usual request):
        # no re-encoding, and every other field goes upstream exactly as the client wrote it.
        raw = h.body
        data = None if forward_priority or "priority" in body or any(raw.count(f) > 1 for f in _DECIDING_FIELDS) \
            else with_model(raw, body["model"], upstream_model)
        if data is None:
            out = {**body, "model": upstream_model}
            if forward_priority:
                out["priority"] = job.priority
            else:
                out.pop("priority", None)
            data = json.dumps(out).encode()
        deadline = self._deadline()
        opened = self._open(job, path, data, deadline)
        if opened is None:
            return self._serve_cloud(h, job, body, sse)
        up, ex = opened
        if not job.stream or ex.status != 200:
            data = ex.read(deadline)
            ex.close()
            if ex.status >= 500:
                raise errors.BadGateway(f"backend {up.name!r} answered {ex.status}: "
                                        f"{data[:300].decode('utf-8', 'replace')}")
            if ex.status == 200:
                obj = json_body(data, up.name)
                job.usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
            elif job.stream:
                raise errors.BadGateway(f"backend {up.name!r} answered {ex.status}: "
                                        f"{data[:300].decode('utf-8', 'replace')}")
            job.status = ex.status
            self.scheduler.finish(job, Outcome.OK if ex.status == 200 else Outcome.ERROR)
            ctype = ex.headers.get("content-type", "application/json")
            h.respond(ex.status, data, ctype, headers=self._headers(job))
            return
        sse.relay(ex, deadline)

    def _serve_cloud(self, h: Handler, job: Job, body: dict, sse: "_SSE") -> None:
        timeout = self.settings.cloud_timeout_s
        if not job.stream:
            obj = self.cloud.chat(body, timeout)
            job.usage = obj.get("usage")
            job.status = 200
            self.scheduler.finish(job, Outcome.OK)
            h.respond_json(200, obj, headers=self._headers(job))
            return
        chunks = self.cloud.chat_stream(body, timeout)
        try:
            for chunk in chunks:
                sse.start()
                if chunk.get("usage"):
                    job.usage = chunk["usage"]
                sse.event(b"data: " + compact_json(chunk).encode() + b"\n\n")
        finally:
            chunks.close()


class _SSE:
    """One streamed answer: the 200 head (sent early while queued, or with the first upstream byte),
    relayed events, and a guaranteed `data: [DONE]`."""

    def __init__(self, h: Handler, job: Job, api: Api):
        self.h, self.job, self.api = h, job, api
        self.started = False
        self.saw_done = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.h.start_sse(self.api._headers(self.job))
            if self.job.first_byte_at is None:
                self.job.first_byte_at = time.monotonic()

    def tick(self, position: int) -> None:
        self.start()
        self.h.sse_chunk(b": queued position=%d\n\n" % position)

    def event(self, data: bytes) -> None:
        self.h.sse_chunk(data)

    def relay(self, ex: Exchange, deadline: float) -> None:
        """Forward upstream events as they arrive; comment lines kept; usage noted from the last chunk."""
        self.start()
        try:
            for events in ex.events(deadline):
                if events.startswith(b"data: [DONE]") or b"\ndata: [DONE]" in events:
                    self.saw_done = True       # a line start: JSON strings cannot hold a raw newline
                if b'"usage"' in events:
                    for line in events.split(b"\n"):
                        if line.startswith(b"data:") and b'"usage"' in line:
                            self._usage(line)
                self.h.sse_chunk(events)
        except ClientGone:
            ex.abort()
            raise
        ex.close()
        self.job.status = 200

    def _usage(self, line: bytes) -> None:
        try:
            usage = json.loads(line[5:]).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self.job.usage = usage

    def done(self) -> None:
        if not self.saw_done:
            self.h.sse_chunk(b"data: [DONE]\n\n")
        self.h.end_sse()

    def fail(self, err: errors.SluiceError) -> None:
        self.job.status = err.status
        try:
            self.h.sse_chunk(b"data: " + json.dumps(errors.openai_body(err)).encode() + b"\n\n")
            self.saw_done = False
            self.done()
        except ClientGone:
            pass
        self.h.close_connection = True
