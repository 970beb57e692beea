"""OpenAI Responses: POST /v1/responses, an ingress adapter over the one job path (jobs.py).

A backend that declares it (`api = ["openai", "responses"]` on [[backends]]: vLLM, llama.cpp, Ollama) gets
the client's body as sent, with only the model swapped, at its own /v1/responses; the answer or stream is
relayed with the model renamed to the one the client asked for. Any other backend (mlx_lm.server speaks
chat completions only), and the cloud model, get the request translated to chat completions and the answer
translated back (translate_responses.py, which also says what translation refuses: `store: true`,
`previous_response_id`, ...). A model whose backends all speak Responses is never translated, so those
fields are the backend's to judge; otherwise the request is checked as translation would need it before it
is queued, whichever backend then serves it.

Errors use the OpenAI envelope. A stream waiting in the queue gets SSE comments (`: queued position=N`),
which the openai SDK and Codex skip; a failure once the stream has begun is a `response.failed` event.
"""

from __future__ import annotations

import json

from sluice import errors
from sluice.config import CLOUD
from sluice.jobs import JobPath, ModelNamer, bool_field, expanded, int_field, num_field
from sluice.scheduler import Job
from sluice.server import Handler, Route
from sluice.streams import Stream
from sluice.translate_responses import (ResponsesStream, chat_usage, hosted_tools, shell, to_chat, to_response,
                                       tool_names_header, tool_namespaces)
from sluice.translate_stream import sse_data
from sluice.upstream import Exchange

ROUTE = "/v1/responses"
# Fields whose value changes what sluice does: one of them twice makes sluice re-encode a pass-through body
# (see JobPath.body_for).
_DECIDING_FIELDS = (b'"stream"', b'"max_output_tokens"')


class ResponsesApi:
    def __init__(self, jobs: JobPath):
        self.jobs = jobs

    def routes(self) -> list[Route]:
        return [Route("POST", ROUTE, self.create)]

    def _native(self, backend: str) -> bool:
        return "responses" in self.jobs.backends[backend].api

    def create(self, h: Handler) -> None:
        s = self.jobs.settings
        body = h.read_json(s.max_body_bytes, big=True)
        model = self.jobs.resolve(body.get("model"), native=False)
        stream = bool_field(body, "stream", False)
        int_field(body, "max_output_tokens", 1, s.max_tokens)
        num_field(body, "temperature", 0, 2)
        num_field(body, "top_p", 0, 1)
        priority = self.jobs.priority(h, body, model)
        cap = self.jobs.max_tokens_cap(model)
        upstream_model = self.jobs.models[model].upstream_model if model != CLOUD else CLOUD
        native = model != CLOUD and all(b in self.jobs.backends and self._native(b)
                                        for b in self.jobs.models[model].backends)
        chat = None if native else to_chat(body, upstream_model, cap)     # validated before it is queued
        spaces = tool_namespaces(body) if chat is not None else {}
        if chat is not None and hosted_tools(body):
            h.extra_headers["X-Sluice-Tools-Left-Out"] = tool_names_header(hosted_tools(body))
        job = self.jobs.new_job(h, body["model"], model, priority, ROUTE, stream=stream, timeout_s=None,
                                payload=body.get("input"))
        # what a Response repeats of the request; a long instructions string as the real text, not its mark
        echo = expanded(h, {k: v for k, v in body.items() if k != "input"})
        out = _Stream(h, job, self.jobs, ResponsesStream(shell(echo, body["model"]), spaces))
        out.run(lambda job: self._serve(h, job, body, chat, upstream_model, out))

    def _serve(self, h: Handler, job: Job, body: dict, chat: dict | None, upstream_model: str,
               out: "_Stream") -> None:
        if job.model == CLOUD or job.rerouted:
            return self._serve_cloud(h, job, chat or to_chat(body, CLOUD), out)
        if self._native(job.backend):
            return self._pass_through(h, job, body, upstream_model, out)
        if chat is None:              # a reload gave the model a backend that does not speak Responses
            chat = to_chat(body, upstream_model, self.jobs.max_tokens_cap(job.model))
        out.translated("/chat/completions", chat, lambda obj: to_response(obj, out.into.resp, out.into.spaces),
                       lambda: self._serve_cloud(h, job, chat, out))

    def _pass_through(self, h: Handler, job: Job, body: dict, upstream_model: str, out: "_Stream") -> None:
        cap = self.jobs.max_tokens_cap(job.model)
        asked = body.get("max_output_tokens")
        changes = {}
        if cap is not None and (asked is None or asked > cap):
            changes["max_output_tokens"] = min(asked or cap, cap)
        data = self.jobs.body_for(h, job, body, upstream_model, _DECIDING_FIELDS, changes)
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(job, "/responses", data, deadline)
        if opened is None:
            return self._serve_cloud(h, job, to_chat(body, CLOUD), out)
        up, ex = opened
        if job.stream and ex.status == 200:
            out.into.started = True      # the backend sends its own response.created; a failure adds none
        out.pass_through(up.name, ex, deadline, ModelNamer(upstream_model, body["model"]),
                         lambda obj: chat_usage(obj.get("usage")))

    def _serve_cloud(self, h: Handler, job: Job, chat: dict, out: "_Stream") -> None:
        out.cloud_chat(chat, lambda obj: to_response(obj, out.into.resp, out.into.spaces),
                       lambda chunk: out.send(out.into.feed(chunk)), out.close_into)


class _Stream(Stream):
    """One streamed answer in Responses events, translated from chat chunks (`into`) or relayed from a
    backend that speaks Responses."""

    def __init__(self, h: Handler, job: Job, jobs: JobPath, into: ResponsesStream):
        super().__init__(h, job, jobs, into)

    def error(self, err: errors.SluiceError) -> bytes:
        return self.into.fail(err.message)

    def translate(self, ex: Exchange, deadline: float) -> None:
        self.send(self.into.start())      # response.created at once, not with the first chunk
        super().translate(ex, deadline)

    def look(self, events: bytes) -> bytes:
        """A run of a Responses backend's events, its usage noted from the last one."""
        if b'"response.completed"' in events or b'"response.incomplete"' in events:
            for data in sse_data(events):
                self._usage(data)
        return events

    def _usage(self, data: bytes) -> None:
        try:
            resp = json.loads(data).get("response")
        except (ValueError, AttributeError):
            return
        if isinstance(resp, dict):
            self.job.usage = chat_usage(resp.get("usage"))
