"""The OpenAI-compatible API: chat/completions, completions, embeddings (SSE streaming), models."""

from __future__ import annotations

import json

from sluice import errors
from sluice.config import CLOUD
from sluice.jobs import JobPath, ModelNamer, bool_field, int_field, num_field, usage_of
from sluice.scheduler import Job
from sluice.server import Handler, Route, compact_json
from sluice.streams import Stream

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
    def _model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": int(self.jobs.started_wall), "owned_by": "sluice"}

    def list_models(self, h: Handler) -> None:
        h.respond_json(200, {"object": "list", "data": [self._model_object(n) for n in self.jobs.names()]})

    def get_model(self, h: Handler, *parts: str) -> None:
        """GET /v1/models/{id} (the SDKs' models.retrieve); an id may hold slashes."""
        name = "/".join(parts)
        if name not in self.jobs.names():
            raise errors.NotFound(f"no model {name!r}; GET /v1/models lists them", param="model",
                                  code="model_not_found")
        h.respond_json(200, self._model_object(name))

    def openai(self, h: Handler, path: str) -> None:
        s = self.jobs.settings
        body = h.read_json(s.max_body_bytes, big=True)
        model = self.jobs.resolve(body.get("model"), native=False)
        stream = bool_field(body, "stream", False)
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
        job = self.jobs.new_job(h, body.get("model"), model, priority, "/v1" + path, stream=stream, timeout_s=None,
                                payload=body.get("messages", body.get("prompt", body.get("input"))))
        upstream_model = self.jobs.models[model].upstream_model if model != CLOUD else None
        sse = _SSE(h, job, self.jobs)
        sse.run(lambda job: self._serve_openai(h, job, path, body, upstream_model, sse))

    def _serve_openai(self, h: Handler, job: Job, path: str, body: dict, upstream_model: str | None,
                      sse: "_SSE") -> None:
        if job.model == CLOUD or job.rerouted:
            return self._serve_cloud(h, job, body, sse)
        cap = self.jobs.max_tokens_cap(job.model)
        changes = {}
        if cap is not None and path != "/embeddings" and not _within(body, cap):
            # the model's max_tokens limit: on what asks for more, or, naming none, as max_tokens
            asked = [f for f in _TOKEN_FIELDS if f in body] or ["max_tokens"]
            changes = {f: min(body.get(f) or cap, cap) for f in asked}
        data = self.jobs.body_for(h, job, body, upstream_model, _DECIDING_FIELDS, changes)
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(job, path, data, deadline)
        if opened is None:
            return self._serve_cloud(h, job, body, sse)
        up, ex = opened
        sse.pass_through(up.name, ex, deadline, ModelNamer(upstream_model, body["model"]), usage_of)

    def _serve_cloud(self, h: Handler, job: Job, body: dict, sse: "_SSE") -> None:
        sse.cloud_chat(body, lambda obj: obj, sse.chunk)


class _SSE(Stream):
    """One streamed answer in OpenAI's SSE, which ends with `data: [DONE]` whatever happened."""

    def __init__(self, h: Handler, job: Job, jobs: JobPath):
        super().__init__(h, job, jobs)
        self.saw_done = False

    def look(self, events: bytes) -> bytes:
        """A run of the backend's events, noted: its [DONE], the usage of its last chunk."""
        if events.startswith(b"data: [DONE]") or b"\ndata: [DONE]" in events:
            self.saw_done = True       # a line start: JSON strings cannot hold a raw newline
        if b'"usage"' in events:
            for line in events.split(b"\n"):
                if line.startswith(b"data:") and b'"usage"' in line:
                    self._usage(line)
        return events

    def chunk(self, chunk: dict) -> None:
        """One chunk of the cloud route's stream."""
        if chunk.get("usage"):
            self.job.usage = chunk["usage"]
        self.send(b"data: " + compact_json(chunk).encode() + b"\n\n")

    def _usage(self, line: bytes) -> None:
        try:
            usage = json.loads(line[5:]).get("usage")
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self.job.usage = usage

    def error(self, err: errors.SluiceError) -> bytes:
        self.saw_done = False          # the [DONE] goes out after the error, whatever came before
        return b"data: " + json.dumps(errors.openai_body(err)).encode() + b"\n\n"

    def end(self) -> None:
        if not self.saw_done:
            self.h.sse_chunk(b"data: [DONE]\n\n")
        self.h.end_sse()
