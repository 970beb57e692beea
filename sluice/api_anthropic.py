"""Anthropic Messages: POST /v1/messages and /v1/messages/count_tokens, an ingress adapter over the one job
path (jobs.py): the same admission, priority, gates, cancellation and logging as chat completions.

Where a request goes, once granted:
  a backend whose `api` includes "anthropic"   the client's body as sent, only the model swapped, to its
                                               /v1/messages; the answer relayed (model renamed)
  any other local backend                      translated to /v1/chat/completions and back (translate.py,
                                               translate_stream.py)
  `model: "cloud"`, or a `claude-*` name no    Anthropic, as sent (cloud.py), bypassing the queue
  local model has

Anthropic requires `max_tokens`, so clients send a generous ceiling (Claude Code: 32000): on local models it
is clamped to SLUICE_MAX_TOKENS and the model's own `max_tokens` rather than refused.

Streams follow Anthropic's grammar; while a stream waits in the queue its head, `message_start`, then `ping`
events go out (clients accept pings only after message_start), and a failure after that is an `error` event.
"""

from __future__ import annotations

import json
from typing import Callable

from sluice import errors
from sluice.cloud import ClientError
from sluice.config import CLOUD
from sluice.jobs import JobPath, ModelNamer, answered, bool_field, expanded, int_field, usage_of
from sluice.scheduler import Job
from sluice.server import Handler, Route
from sluice.streams import Stream
from sluice.translate import CLAUDE_MODEL, openai_usage, to_chat, to_message
from sluice.translate_stream import MessagesStream, event_name, split_events, sse, sse_data
from sluice.upstream import Exchange

# Fields whose value sluice acts on: one of them twice makes it re-encode the body (see api_openai.py).
_DECIDING_FIELDS = (b'"stream"', b'"max_tokens"')
_PING = sse("ping", {"type": "ping"})
CHARS_PER_TOKEN = 4          # count_tokens' estimate: ~4 characters of English text a token
IMAGE_TOKENS = 1600          # ...and an image at Anthropic's figure for ~1.15 megapixels


def _named(fn: Callable[[Handler], None]) -> Callable[[Handler], None]:
    """Anthropic's error body has no `param`: a 400's message names the field itself."""
    def route(h: Handler) -> None:
        try:
            fn(h)
        except errors.BadRequest as e:
            if e.param and not e.message.startswith(e.param):
                e.message = f"{e.param}: {e.message}"
            raise
    return route


def _backend_error(name: str, status: int, data: bytes) -> errors.SluiceError:
    text = answered(name, status, data)
    return ClientError(status, text) if 400 <= status < 500 else errors.BadGateway(text)


def estimate_tokens(body: dict) -> int:
    """count_tokens' estimate for a Messages request: its text (system, text blocks, tool inputs and results,
    tool definitions as JSON) at CHARS_PER_TOKEN characters a token, plus IMAGE_TOKENS per image. Local
    tokenizers differ; this is the order of magnitude a client needs to decide when to compact."""
    images = 0

    def chars(x) -> int:
        nonlocal images
        if isinstance(x, str):
            return len(x)
        if isinstance(x, list):
            return sum(chars(b) for b in x)
        if not isinstance(x, dict):
            return 0
        kind = x.get("type")
        if kind == "image":
            images += 1
            return 0
        if kind == "text":
            return chars(x.get("text"))
        if kind == "tool_use":
            return chars(x.get("name")) + len(json.dumps(x.get("input")))
        return chars(x.get("content"))             # a tool_result, a message

    n = chars(body.get("system")) + sum(chars(m) for m in body.get("messages") or [] if isinstance(m, dict))
    if body.get("tools"):
        n += len(json.dumps(body["tools"]))
    return max(1, -(-n // CHARS_PER_TOKEN)) + images * IMAGE_TOKENS


class AnthropicApi:
    def __init__(self, jobs: JobPath):
        self.jobs = jobs

    def routes(self) -> list[Route]:
        return [Route("POST", "/v1/messages", _named(self.messages), api="anthropic"),
                Route("POST", "/v1/messages/count_tokens", _named(self.count_tokens), api="anthropic")]

    # ---- validation --------------------------------------------------------------------------------------
    def _model(self, body: dict) -> str:
        """The canonical local model, or CLOUD for "cloud" and for a claude-* name no local model has."""
        name = body.get("model")
        if isinstance(name, str) and name not in self.jobs.models and CLAUDE_MODEL.fullmatch(name):
            return CLOUD
        return self.jobs.resolve(name, native=False)

    def _native(self, model: str) -> bool:
        """Every backend of the model speaks Messages itself (then only the basics are checked here)."""
        m = self.jobs.models.get(model)
        return m is not None and all("anthropic" in getattr(self.jobs.backends.get(b), "api", ()) for b in m.backends)

    def _validate(self, body: dict, model: str, counting: bool = False) -> dict | None:
        """Checks what sluice reads; for a model a translation may serve, all of it: the chat request then."""
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise errors.BadRequest("messages must be a non-empty list of {\"role\", \"content\"} objects",
                                    param="messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
                raise errors.BadRequest("each message must be {\"role\": \"user\" | \"assistant\", \"content\": ...}",
                                        param=f"messages[{i}].role")
        if not counting:
            if body.get("max_tokens") is None:
                raise errors.BadRequest("max_tokens is required: an integer >= 1", param="max_tokens")
            int_field(body, "max_tokens", 1, 2 ** 31)
        bool_field(body, "stream", False)
        if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
            raise errors.BadRequest("metadata must be an object", param="metadata")
        if model == CLOUD or self._native(model):
            return None
        return to_chat({**body, "max_tokens": 1} if counting else body, self.jobs.models[model].upstream_model)

    # ---- routes ------------------------------------------------------------------------------------------
    def count_tokens(self, h: Handler) -> None:
        """An estimate, no queue: see estimate_tokens."""
        body = h.read_json(self.jobs.settings.max_body_bytes, big=True)
        self._validate(body, self._model(body), counting=True)
        h.respond_json(200, {"input_tokens": estimate_tokens(body)})

    def messages(self, h: Handler) -> None:
        s = self.jobs.settings
        body = h.read_json(s.max_body_bytes, big=True)
        model = self._model(body)
        chat = self._validate(body, model)
        priority = self.jobs.priority(h, body, model)
        stream = body.get("stream", False)
        job = self.jobs.new_job(h, body["model"], model, priority, "/v1/messages", stream=stream, timeout_s=None,
                                payload=body["messages"])
        out = _Stream(h, job, self.jobs, MessagesStream(body["model"], body.get("stop_sequences")))
        out.run(lambda job: self._serve(h, job, body, chat, out))

    # ---- serving -----------------------------------------------------------------------------------------
    def _serve(self, h: Handler, job: Job, body: dict, chat: dict | None, out: "_Stream") -> None:
        if job.model == CLOUD or job.rerouted:
            return self._serve_cloud(h, job, body, out)
        if chat is None or "anthropic" in self.jobs.backends[job.backend].api:
            return self._serve_native(h, job, body, out)
        return self._serve_translated(h, job, body, chat, out)

    def _max_tokens(self, job: Job, asked: int) -> int:
        cap = self.jobs.max_tokens_cap(job.model)
        return min(asked, self.jobs.settings.max_tokens, cap or asked)

    def _serve_translated(self, h: Handler, job: Job, body: dict, chat: dict, out: "_Stream") -> None:
        chat["max_tokens"] = self._max_tokens(job, chat["max_tokens"])
        out.translated("/chat/completions", chat,
                       lambda obj: to_message(obj, body["model"], body.get("stop_sequences")),
                       lambda: self._serve_cloud(h, job, body, out), _backend_error)

    def _serve_native(self, h: Handler, job: Job, body: dict, out: "_Stream") -> None:
        """The client's bytes, only the model swapped, when nothing else changes (the usual request)."""
        upstream_model = self.jobs.models[job.model].upstream_model
        max_tokens = self._max_tokens(job, body["max_tokens"])
        changes = {"max_tokens": max_tokens} if max_tokens != body["max_tokens"] else {}
        data = self.jobs.body_for(h, job, body, upstream_model, _DECIDING_FIELDS, changes)
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(job, "/messages", data, deadline)
        if opened is None:
            return self._serve_cloud(h, job, body, out)
        up, ex = opened
        rename = ModelNamer(upstream_model, body["model"])
        if job.stream and ex.status == 200:
            return out.pass_on(ex, deadline, rename)
        data, obj = self.jobs.read_answer(h, job, up.name, ex, deadline, _backend_error)
        usage = usage_of(obj)
        job.usage = openai_usage(usage) if usage is not None else None
        self.jobs.answer(h, job, rename(data))

    def _serve_cloud(self, h: Handler, job: Job, body: dict, out: "_Stream") -> None:
        body = expanded(h, body)           # Anthropic gets the real strings
        request = {k: v for k, v in body.items() if k not in ("priority", "stream")}
        timeout, beta = self.jobs.settings.cloud_timeout_s, h.headers.get("anthropic-beta")
        if not job.stream:
            msg = self.jobs.cloud.messages(request, timeout, beta)
            job.usage = openai_usage(msg.get("usage"))
            return self.jobs.answer(h, job, {**msg, "model": body["model"]})
        events = self.jobs.cloud.messages_stream(request, timeout, beta)
        try:
            for ev in events:
                out.cloud_event(ev, body["model"])
        finally:
            events.close()
        out.finish()


class _Stream(Stream):
    """One streamed Messages answer: Anthropic's events. `into` makes them from chat chunks, and its
    message_start, once sent while queued, stands for the upstream's own on a pass-through."""

    def __init__(self, h: Handler, job: Job, jobs: JobPath, into: MessagesStream):
        super().__init__(h, job, jobs, into)
        self.stopped = False              # message_stop went out
        self.usage: dict = {}             # Anthropic's, from a pass-through's events

    def keepalive(self, position: int) -> bytes:
        return self.into.start() + _PING    # clients accept a ping only after message_start

    def error(self, err: errors.SluiceError) -> bytes:
        return sse("error", errors.anthropic_body(err))

    def pass_on(self, ex: Exchange, deadline: float, rename: Callable[[bytes], bytes]) -> None:
        """A Messages backend's events as they are, renamed; usage noted from message_start/message_delta."""
        self.relay(ex, deadline, rename)
        if not self.stopped:
            raise errors.BadGateway("the backend's stream ended before message_stop")
        self.finish()

    def look(self, events: bytes) -> bytes:
        if self.into.started or b"message_st" in events:
            return b"".join(self._passing(e) for e in split_events(events))
        if b'"usage"' in events:
            for e in split_events(events):
                self._passing(e)
        return events

    def _passing(self, event: bytes) -> bytes:
        """`event` as it goes on (b"": left out), its usage noted."""
        name = event_name(event)
        if name in (b"message_start", b"message_delta"):
            for data in sse_data(event):
                try:
                    self._note(json.loads(data))
                except (ValueError, AttributeError):
                    continue
        elif name == b"message_stop":
            self.stopped = True
        if name == b"message_start":
            if self.into.started:
                return b""            # ours went out while it waited
            self.into.started = True
        return event

    def _note(self, ev: dict) -> None:
        u = (ev.get("message") or {}).get("usage") if ev.get("type") == "message_start" else ev.get("usage")
        if isinstance(u, dict):
            self.usage.update({k: v for k, v in u.items() if v is not None})

    def cloud_event(self, ev: dict, model: str) -> None:
        kind = ev.get("type")
        self._note(ev)
        if kind == "message_start":
            if self.into.started:
                return
            self.into.started = True
            ev = {**ev, "message": {**(ev.get("message") or {}), "model": model}}
        elif kind == "message_stop":
            self.stopped = True
        self.send(sse(str(kind), ev))

    def finish(self) -> None:
        if self.usage:
            self.job.usage = openai_usage(self.usage)
        self.job.status = 200
