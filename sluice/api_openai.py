"""The OpenAI-compatible API: chat/completions, completions, embeddings (SSE streaming), models."""

from __future__ import annotations

import json
import time

from sluice import errors
from sluice.config import CLOUD
from sluice.jobs import JobPath, ModelNamer, int_field, num_field, show, with_model
from sluice.scheduler import Job, Outcome
from sluice.server import ClientGone, Handler, Route, compact_json
from sluice.upstream import Exchange, json_body

# Fields whose value changes what sluice does or allows. One of them twice (`"max_tokens":99999,"max_tokens":5`)
# makes sluice re-encode the body: it checked the last value, and a backend whose parser keeps the first one
# must not see another.
_DECIDING_FIELDS = (b'"stream"', b'"max_tokens"', b'"max_completion_tokens"')
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def _within(body: dict, cap: int) -> bool:
    """The request names a token limit, and every one it names is at most `cap` (validated ints)."""
    asked = [body[f] for f in _TOKEN_FIELDS if body.get(f) is not None]
    return bool(asked) and all(v <= cap for v in asked)


class OpenAIApi:
    def __init__(self, jobs: JobPath):
        self.jobs = jobs

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/chat/completions", lambda h: self.openai(h, "/chat/completions")),
            Route("POST", "/v1/completions", lambda h: self.openai(h, "/completions")),
            Route("POST", "/v1/embeddings", lambda h: self.openai(h, "/embeddings")),
            Route("GET", "/v1/models", self.list_models),
            Route("GET", "/v1/models/", self.get_model, prefix=True),
        ]

    # ---- OpenAI-compatible ---------------------------------------------------------------------------
    def _model_names(self) -> list[str]:
        names = [n for m in self.jobs.settings.models for n in (m.name, *m.aliases)]
        return names + [CLOUD] if self.jobs.cloud.mode() != "unavailable" else names

    def _model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": int(self.jobs.started_wall), "owned_by": "sluice"}

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
        s = self.jobs.settings
        body = h.read_json(s.max_body_bytes, big=True)
        model = self.jobs.resolve(body.get("model"), native=False)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise errors.BadRequest(f"stream must be true or false, got {show(stream)}", param="stream")
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
            int_field(body, name, 1, s.max_tokens)
        num_field(body, "temperature", 0, 2)
        if "stream_options" in body and not isinstance(body["stream_options"], (dict, type(None))):
            raise errors.BadRequest("stream_options must be an object", param="stream_options")
        priority = self.jobs.priority(h, body, model)
        if model == CLOUD and path != "/chat/completions":
            raise errors.BadRequest(f"model {CLOUD!r} serves /v1/chat/completions only", param="model")
        job = self.jobs.new_job(h, body.get("model"), model, priority, "/v1" + path, stream=stream,
                           timeout_s=None)
        if s.log_prompts:
            payload = body.get("messages", body.get("prompt", body.get("input")))
            job.payload = h.bigs.expand(payload) if h.bigs is not None else payload
        upstream_model = self.jobs.models[model].upstream_model if model != CLOUD else None
        sse = _SSE(h, job, self)
        try:
            self.jobs.run(h, job, lambda job: self._serve_openai(h, job, path, body, upstream_model, sse),
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
        forward_priority = self.jobs.backends[job.backend].forward_priority
        # The client's own bytes with only the model swapped, when nothing else changes (the usual request):
        # no re-encoding, and every other field goes upstream exactly as the client wrote it.
        raw = h.body
        cap = self.jobs.max_tokens_cap(job.model)
        capped = cap is not None and path != "/embeddings" and not _within(body, cap)
        data = None if capped or forward_priority or "priority" in body or \
            any(raw.count(f) > 1 for f in _DECIDING_FIELDS) else with_model(raw, body["model"], upstream_model)
        if data is None:
            out = {**body, "model": upstream_model}
            if capped:                    # the model's max_tokens limit: what asks for more, or names none
                asked = [f for f in _TOKEN_FIELDS if f in out] or ["max_tokens"]
                out.update({f: min(out.get(f) or cap, cap) for f in asked})
            if forward_priority:
                out["priority"] = job.priority
            else:
                out.pop("priority", None)
            data = json.dumps(out).encode()
            if h.bigs is not None:
                data = h.bigs.encode(data)
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(job, path, data, deadline)
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
            self.jobs.scheduler.finish(job, Outcome.OK if ex.status == 200 else Outcome.ERROR)
            ctype = ex.headers.get("content-type", "application/json")
            h.respond(ex.status, ModelNamer(upstream_model, body["model"])(data) if ex.status == 200 else data,
                      ctype, headers=self.jobs.response_headers(job))
            return
        sse.relay(ex, deadline, ModelNamer(upstream_model, body["model"]))

    def _serve_cloud(self, h: Handler, job: Job, body: dict, sse: "_SSE") -> None:
        if h.bigs is not None:
            body = h.bigs.expand(body)           # Anthropic gets the real strings
        timeout = self.jobs.settings.cloud_timeout_s
        if not job.stream:
            obj = self.jobs.cloud.chat(body, timeout)
            job.usage = obj.get("usage")
            job.status = 200
            self.jobs.scheduler.finish(job, Outcome.OK)
            h.respond_json(200, obj, headers=self.jobs.response_headers(job))
            return
        chunks = self.jobs.cloud.chat_stream(body, timeout)
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

    def __init__(self, h: Handler, job: Job, api: "OpenAIApi"):
        self.h, self.job, self.api = h, job, api
        self.started = False
        self.saw_done = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.h.start_sse(self.api.jobs.response_headers(self.job))
            if self.job.first_byte_at is None:
                self.job.first_byte_at = time.monotonic()

    def tick(self, position: int) -> None:
        self.start()
        self.h.sse_chunk(b": queued position=%d\n\n" % position)

    def event(self, data: bytes) -> None:
        self.h.sse_chunk(data)

    def relay(self, ex: Exchange, deadline: float, rename=lambda data: data) -> None:
        """Forward upstream events as they arrive, each renamed to the model the client asked for;
        comment lines kept; usage noted from the last chunk."""
        self.start()
        try:
            for events in ex.events(deadline):
                if events.startswith(b"data: [DONE]") or b"\ndata: [DONE]" in events:
                    self.saw_done = True       # a line start: JSON strings cannot hold a raw newline
                if b'"usage"' in events:
                    for line in events.split(b"\n"):
                        if line.startswith(b"data:") and b'"usage"' in line:
                            self._usage(line)
                self.h.sse_chunk(rename(events))
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
