"""The one job path every API shares: resolve the model, admit, wait for a grant (watching the client),
forward, finish exactly once. Each ingress API (api_native, api_openai, and the adapters beside them)
validates its own format, builds a Job here and runs it with `JobPath.run` (through streams.Stream where
the answer may stream). Also here: the helpers that every API's forward and answer share.
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
from sluice.bigjson import THRESHOLD
from sluice.config import CLOUD, Settings
from sluice.scheduler import Job, Outcome, Scheduler
from sluice.server import ClientGone, Handler
from sluice.upstream import Exchange, Upstream, json_body

log = logging.getLogger("sluice.api")

_OUTCOME = {errors.QueueTimeout: Outcome.TIMEOUT, errors.Cancelled: Outcome.CANCELLED,
            errors.QueueFull: Outcome.REJECTED, errors.TooManyRequests: Outcome.REJECTED}


_FALLBACK_ROUTES = ("/v1/query", "/v1/chat/completions", "/v1/messages")   # those that can serve a rerouted job


def outcome_of(err: Exception) -> Outcome:
    return next((o for cls, o in _OUTCOME.items() if isinstance(err, cls)), Outcome.ERROR)


# ---- validation: every field sluice reads, with a message that names it ---------------------------------
def int_field(body: dict, name: str, lo: int, hi: int, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise errors.BadRequest(f"{name} must be an integer from {lo} to {hi}, got {show(v)}", param=name)
    if not lo <= v <= hi:
        raise errors.BadRequest(f"{name} must be from {lo} to {hi}, got {v}", param=name)
    return v


def num_field(body: dict, name: str, lo: float, hi: float, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise errors.BadRequest(f"{name} must be a number from {lo:g} to {hi:g}, got {show(v)}", param=name)
    if not lo <= v <= hi:
        raise errors.BadRequest(f"{name} must be from {lo:g} to {hi:g}, got {v}", param=name)
    return v


def bool_field(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise errors.BadRequest(f"{name} must be true or false, got {show(v)}", param=name)
    return v


def str_field(body: dict, name: str, max_chars: int, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise errors.BadRequest(f"{name} is required (a non-empty string)", param=name)
        return None
    if not isinstance(v, str):
        raise errors.BadRequest(f"{name} must be a string, got {show(v)}", param=name)
    if required and not v.strip():
        raise errors.BadRequest(f"{name} must not be empty", param=name)
    if len(v) > max_chars:
        raise errors.BadRequest(f"{name} is {len(v)} characters; the limit is {max_chars} (SLUICE_MAX_PROMPT_CHARS)",
                                param=name)
    return v


def show(v: Any) -> str:
    return f"{type(v).__name__} {json.dumps(v)[:40]}" if not isinstance(v, (dict, list)) else type(v).__name__


def with_model(raw: bytes, asked: str, upstream: str) -> bytes | list | None:
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
    if len(raw) >= THRESHOLD:              # a large body (an image): its pieces, no copy of it
        view = memoryview(raw)
        return [view[:j], _json_str(upstream), view[j + len(old):]]
    return raw[:j] + _json_str(upstream) + raw[j + len(old):]


class ModelNamer:
    """Puts the name the client asked for (`fast`) where a backend's answer names its own model id
    (`mlx-community/Qwen3-1.7B-4bit`): on the answer's bytes, both usual spellings, nothing re-encoded."""

    __slots__ = ("pairs",)

    def __init__(self, upstream: str | None, asked: str):
        up, to = _json_str(upstream or asked), _json_str(asked)
        self.pairs = () if up == to else ((b'"model":' + up, b'"model":' + to), (b'"model": ' + up, b'"model": ' + to))

    def __call__(self, data: bytes) -> bytes:
        for old, new in self.pairs:
            if old in data:
                data = data.replace(old, new)
        return data


@functools.lru_cache(maxsize=1024)
def _json_str(s: str) -> bytes:
    return json.dumps(s).encode()


def encode(h: Handler, obj: dict) -> bytes | list:
    """A body sluice built, as the bytes to send: its long strings (images) put back from the client's body."""
    data = json.dumps(obj).encode()
    return data if h.bigs is None else h.bigs.encode(data)


def expanded(h: Handler, obj: Any) -> Any:
    """`obj` with the client's long strings in place of their marks: for what needs the real text (the cloud
    route, the prompt log)."""
    return obj if h.bigs is None else h.bigs.expand(obj)


def usage_of(obj: dict) -> dict | None:
    """An answer's `usage` object, or None."""
    return obj.get("usage") if isinstance(obj.get("usage"), dict) else None


def answered(backend: str, status: int, data: bytes | str) -> str:
    """What a backend's failed answer says: its status and the start of its body (or its message)."""
    text = data if isinstance(data, str) else data[:300].decode("utf-8", "replace")
    return f"backend {backend!r} answered {status}: {text}"


class JobPath:
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
        self.clock = scheduler.clock           # one clock for a job's times: the scheduler's (tests inject one)
        self.started = started if started is not None else time.monotonic()

    def reconfigure(self, settings: Settings) -> None:
        # One assignment: a request thread sees the old table or the new one, never parts of both.
        self._table = (settings, {n: m for m in settings.models for n in (m.name, *m.aliases)},
                       {b.name: b for b in settings.backends})

    @property
    def settings(self) -> Settings:
        return self._table[0]

    @property
    def models(self) -> dict:
        """Model name or alias -> ModelConfig."""
        return self._table[1]

    @property
    def backends(self) -> dict:
        """Backend name -> BackendConfig."""
        return self._table[2]

    # ---- helpers -----------------------------------------------------------------------------------
    def resolve(self, name: Any, native: bool) -> str:
        """The canonical model name for a requested name or alias; unknown names list the known ones."""
        if not isinstance(name, str) or not name:
            raise errors.BadRequest(f"model must be a non-empty string, got {show(name)}", param="model")
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

    def priority(self, h: Handler, body: dict, model: str | None = None) -> int:
        """The body's `priority`, else X-Sluice-Priority, else the model's default_priority, else the server's."""
        if body.get("priority") is not None:
            return int_field(body, "priority", 0, 4)
        header = h.headers.get("X-Sluice-Priority")
        if header is None:
            limit = self.models[model].default_priority if model in self.models else None
            return self.settings.default_priority if limit is None else limit
        value = header.strip(" \t")
        if len(value) != 1 or value not in "01234":       # ASCII only: '²'.isdigit() is True
            raise errors.BadRequest(f"X-Sluice-Priority must be an integer from 0 to 4, got {header[:20]!r}",
                                    param="priority")
        return int(value)

    def names(self) -> list[str]:
        """The names a client may ask for: models, their aliases, and `cloud` when it can serve."""
        names = [n for m in self.settings.models for n in (m.name, *m.aliases)]
        return names + [CLOUD] if self.cloud.mode() != "unavailable" else names

    def new_job(self, h: Handler, asked_model: str, model: str, priority: int, route: str, payload: Any = None,
                **kw) -> Job:
        """A job for the caller's key (its allowed models, its priority ceiling, its own queue limit), with its
        prompt `payload` kept for the request log when SLUICE_LOG_PROMPTS is on."""
        key = getattr(h, "key", None)
        kw["id"] = h.request_id          # one id for the client's X-Request-Id, the log line and the JSONL entry
        if self.settings.log_prompts:
            kw["payload"] = expanded(h, payload)
        if kw.get("timeout_s") is None:  # the queue wait: the model's own limit, else the server's
            limit = self.models[model].timeout_s if model in self.models else None
            kw["timeout_s"] = self.settings.queue_timeout_s if limit is None else limit
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
        if model is not None and model.fallback and job.route in _FALLBACK_ROUTES \
                and self.cloud.mode() != "unavailable":
            job.fallback_at = self.clock() + model.fallback_after_s
        self.scheduler.submit(job)  # raises the refusal (queue full, backend down); the job is already finished
        try:
            with h.server.watcher.watch(h.connection, lambda: self.scheduler.cancel(job)):
                moved = False
                while True:
                    self.scheduler.wait(job, tick, self.settings.sse_keepalive_s,
                                        min(5.0, self.settings.sse_keepalive_s))
                    try:
                        if job.backend is None:
                            serve(job)
                        else:
                            with self._use_backend(job.backend, max(0.001, job.deadline - self.clock())):
                                serve(job)
                        break
                    except errors.BackendRefused:
                        # Nothing reached the backend, so another one may take the job: once, not round a pool.
                        refused = job.backend
                        if moved or not self.scheduler.requeue(job):
                            raise
                        moved = True
                        log.warning("req=%s backend %s refused the connection; moving to another backend",
                                    job.id, refused)
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

    def max_tokens_cap(self, model: str) -> int | None:
        """The model's max_tokens limit (a request asking for more, or naming none, gets this), or None."""
        return self.models[model].max_tokens if model in self.models else None

    def response_headers(self, job: Job) -> dict[str, str]:
        return {"X-Sluice-Queue-Wait-Ms": f"{job.wait_s * 1000:.1f}",
                "X-Sluice-Backend": job.backend or (CLOUD if job.rerouted else job.model)}

    def forward(self, job: Job, path: str, body: bytes, deadline: float) -> tuple[Upstream, Exchange] | None:
        """Forward to the granted backend. None: it refused before anything was sent and the job moved to
        the cloud route (the model has fallback = "cloud"). Without fallback that refusal is raised
        (errors.BackendRefused), and `run` moves the job to another backend of its model once."""
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
        job.first_byte_at = self.clock()
        return up, ex

    def body_for(self, h: Handler, job: Job, body: dict, upstream_model: str, deciding: tuple[bytes, ...],
                 changes: dict) -> bytes | list:
        """What a backend that speaks the client's own API gets: the client's bytes with only the model swapped
        when nothing else changes (the usual request), so every other field goes upstream exactly as written.
        Re-encoded when sluice changes a field (`changes`: the model's token limit), when the backend takes
        the job's priority, or when one of the `deciding` fields (whose value sluice acted on) occurs twice:
        sluice checked the last value, and a backend whose parser keeps the first must not see another."""
        forward_priority = self.backends[job.backend].forward_priority
        raw = h.body
        if not (changes or forward_priority or "priority" in body or any(raw.count(f) > 1 for f in deciding)):
            data = with_model(raw, body["model"], upstream_model)
            if data is not None:
                return data
        out = {**body, "model": upstream_model, **changes}
        if forward_priority:
            out["priority"] = job.priority
        else:
            out.pop("priority", None)
        return encode(h, out)

    def read_answer(self, h: Handler, job: Job, backend: str, ex: Exchange, deadline: float,
                    error: Callable[[str, int, bytes], errors.SluiceError] | None = None) -> tuple[bytes, dict] | None:
        """A backend's whole 200 answer, as bytes and as the JSON object it must be. Any other status raises
        `error(backend, status, body)` when given (an API with an envelope of its own); else a 5xx, or any
        error once a stream was asked for, is a 502, and a 4xx is relayed as the backend wrote it (None: the
        client has its answer), in the OpenAI envelope that both sides speak."""
        data = ex.read(deadline)
        ex.close()
        if ex.status == 200:
            return data, json_body(data, backend)
        if error is not None:
            raise error(backend, ex.status, data)
        if ex.status >= 500 or job.stream:
            raise errors.BadGateway(answered(backend, ex.status, data))
        self.answer(h, job, data, ex.status, ex.headers.get("content-type", "application/json"))
        return None

    def answer(self, h: Handler, job: Job, data: bytes | dict, status: int = 200,
               ctype: str = "application/json") -> None:
        """A whole answer: the job finished first, so its slot is free before the client has read it."""
        job.status = status
        self.scheduler.finish(job, Outcome.OK if status == 200 else Outcome.ERROR)
        if isinstance(data, dict):
            h.respond_json(status, data, headers=self.response_headers(job))
        else:
            h.respond(status, data, ctype, headers=self.response_headers(job))

    def deadline(self, timeout: float | None = None) -> float:
        """When the forward must be done: the caller's own timeout, else SLUICE_QUEUE_TIMEOUT from the grant.
        One deadline covers the whole attempt chain (the one allowed reconnect included)."""
        return time.monotonic() + (timeout or self.settings.queue_timeout_s)   # upstream I/O's own clock

