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
import time

from sluice import errors
from sluice.config import CLOUD
from sluice.jobs import JobPath, ModelNamer, int_field, num_field, show, with_model
from sluice.scheduler import Job, Outcome
from sluice.server import ClientGone, Handler, Route
from sluice.translate_responses import (ResponsesStream, chat_usage, hosted_tools, shell, to_chat, to_response,
                                       tool_namespaces)
from sluice.translate_stream import sse_data
from sluice.upstream import Exchange, json_body

ROUTE = "/v1/responses"
# Fields whose value changes what sluice does: one of them twice makes sluice re-encode a pass-through body
# (it checked the last value; a backend whose parser keeps the first must not see another).
_DECIDING_FIELDS = (b'"stream"', b'"max_output_tokens"')


def _encode(h: Handler, obj: dict) -> bytes | list:
    """A translated request as the bytes to send, its long strings put back from the client's body."""
    data = json.dumps(obj).encode()
    return data if h.bigs is None else h.bigs.encode(data)


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
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise errors.BadRequest(f"stream must be true or false, got {show(stream)}", param="stream")
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
            h.extra_headers["X-Sluice-Tools-Left-Out"] = ", ".join(dict.fromkeys(hosted_tools(body)))
        job = self.jobs.new_job(h, body["model"], model, priority, ROUTE, stream=stream, timeout_s=None)
        if s.log_prompts:
            job.payload = h.bigs.expand(body.get("input")) if h.bigs is not None else body.get("input")
        echo = {k: v for k, v in body.items() if k != "input"}      # what a Response repeats of the request
        if h.bigs is not None:
            echo = h.bigs.expand(echo)            # a long instructions string: the real text, not its mark
        out = _Stream(h, job, self.jobs, ResponsesStream(shell(echo, body["model"]), spaces))
        try:
            self.jobs.run(h, job, lambda job: self._serve(h, job, body, chat, upstream_model, out),
                          tick=out.tick if stream else None)
        except errors.SluiceError as e:
            if not out.started:
                raise
            out.fail(e)   # the 200 head went out while it waited: end the stream with response.failed
            return
        if out.started:
            out.h.end_sse()

    def _serve(self, h: Handler, job: Job, body: dict, chat: dict | None, upstream_model: str,
               out: "_Stream") -> None:
        if job.model == CLOUD or job.rerouted:
            return self._serve_cloud(h, job, chat or to_chat(body, CLOUD), out)
        if self._native(job.backend):
            return self._pass_through(h, job, body, upstream_model, out)
        if chat is None:              # a reload gave the model a backend that does not speak Responses
            chat = to_chat(body, upstream_model, self.jobs.max_tokens_cap(job.model))
        if self.jobs.backends[job.backend].forward_priority:
            chat["priority"] = job.priority
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(job, "/chat/completions", _encode(h, chat), deadline)
        if opened is None:
            return self._serve_cloud(h, job, chat, out)
        up, ex = opened
        if job.stream and ex.status == 200:
            return out.translate(ex, deadline)
        data = self._read(h, job, up.name, ex, deadline)
        if data is not None:
            obj = json_body(data, up.name)
            job.usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
            self._answer(h, job, to_response(obj, out.stream.resp, out.stream.spaces))

    def _read(self, h: Handler, job: Job, name: str, ex: Exchange, deadline: float) -> bytes | None:
        """The backend's whole 200 answer; its own 4xx is relayed as it came, in the same OpenAI envelope
        (None); a 5xx, or any error once the stream has begun, is a 502."""
        data = ex.read(deadline)
        ex.close()
        if ex.status >= 500 or (ex.status != 200 and job.stream):
            raise errors.BadGateway(f"backend {name!r} answered {ex.status}: {data[:300].decode('utf-8', 'replace')}")
        if ex.status == 200:
            return data
        job.status = ex.status
        self.jobs.scheduler.finish(job, Outcome.ERROR)
        h.respond(ex.status, data, ex.headers.get("content-type", "application/json"),
                  headers=self.jobs.response_headers(job))
        return None

    def _answer(self, h: Handler, job: Job, resp: dict) -> None:
        job.status = 200
        self.jobs.scheduler.finish(job, Outcome.OK)
        h.respond_json(200, resp, headers=self.jobs.response_headers(job))

    def _pass_through(self, h: Handler, job: Job, body: dict, upstream_model: str, out: "_Stream") -> None:
        forward_priority = self.jobs.backends[job.backend].forward_priority
        raw = h.body
        cap = self.jobs.max_tokens_cap(job.model)
        asked = body.get("max_output_tokens")
        capped = cap is not None and (asked is None or asked > cap)
        data = None if capped or forward_priority or "priority" in body or \
            any(raw.count(f) > 1 for f in _DECIDING_FIELDS) else with_model(raw, body["model"], upstream_model)
        if data is None:
            sent = {**body, "model": upstream_model}
            if capped:
                sent["max_output_tokens"] = min(asked or cap, cap)
            sent.pop("priority", None)
            if forward_priority:
                sent["priority"] = job.priority
            data = json.dumps(sent).encode()
            if h.bigs is not None:
                data = h.bigs.encode(data)
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(job, "/responses", data, deadline)
        if opened is None:
            return self._serve_cloud(h, job, to_chat(body, CLOUD), out)
        up, ex = opened
        rename = ModelNamer(upstream_model, body["model"])
        if job.stream and ex.status == 200:
            return out.relay(ex, deadline, rename)
        data = self._read(h, job, up.name, ex, deadline)
        if data is not None:
            job.usage = chat_usage(json_body(data, up.name).get("usage"))
            job.status = 200
            self.jobs.scheduler.finish(job, Outcome.OK)
            h.respond(200, rename(data), ex.headers.get("content-type", "application/json"),
                      headers=self.jobs.response_headers(job))

    def _serve_cloud(self, h: Handler, job: Job, chat: dict, out: "_Stream") -> None:
        if h.bigs is not None:
            chat = h.bigs.expand(chat)           # Anthropic gets the real strings
        timeout = self.jobs.settings.cloud_timeout_s
        if not job.stream:
            obj = self.jobs.cloud.chat(chat, timeout)
            job.usage = obj.get("usage")
            return self._answer(h, job, to_response(obj, out.stream.resp, out.stream.spaces))
        chunks = self.jobs.cloud.chat_stream(chat, timeout)
        try:
            for chunk in chunks:
                out.send(out.stream.feed(chunk))
            out.send(out.stream.end())
            job.usage = out.stream.usage
            job.status = 200
        finally:
            chunks.close()


class _Stream:
    """One streamed answer: the 200 head (sent early while queued, or with the first event), then Responses
    events, translated from chat chunks or relayed from a backend that speaks Responses."""

    def __init__(self, h: Handler, job: Job, jobs: JobPath, stream: ResponsesStream):
        self.h, self.job, self.jobs, self.stream = h, job, jobs, stream
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.h.start_sse(self.jobs.response_headers(self.job))
            if self.job.first_byte_at is None:
                self.job.first_byte_at = time.monotonic()

    def tick(self, position: int) -> None:
        self.start()
        self.h.sse_chunk(b": queued position=%d\n\n" % position)

    def send(self, data: bytes) -> None:
        self.start()
        self.h.sse_chunk(data)

    def translate(self, ex: Exchange, deadline: float) -> None:
        """Chat chunks from the backend, as Responses events as they arrive."""
        self.send(self.stream.start())
        done = False
        try:
            for events in ex.events(deadline):
                out = b""
                for data in sse_data(events):
                    if data == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise errors.BadGateway(f"backend {self.job.backend!r} sent a stream event that is not "
                                                f"JSON: {data[:200].decode('utf-8', 'replace')}") from None
                    if isinstance(chunk, dict):
                        if isinstance(chunk.get("error"), dict):
                            raise errors.BadGateway(f"backend {self.job.backend!r} failed mid-stream: "
                                                    f"{chunk['error'].get('message')}")
                        out += self.stream.feed(chunk)
                self.send(out)
                if done:
                    break
        except ClientGone:
            ex.abort()
            raise
        if not done and self.stream.finish is None:
            ex.close()
            raise errors.BadGateway(f"backend {self.job.backend!r} ended the stream before its end")
        ex.close()
        self.send(self.stream.end())
        self.job.usage = self.stream.usage
        self.job.status = 200

    def relay(self, ex: Exchange, deadline: float, rename) -> None:
        """A Responses stream from the backend, as it arrives, each event renamed to the client's model."""
        self.start()
        self.stream.started = True         # the backend sends its own response.created; a failure adds none
        try:
            for events in ex.events(deadline):
                if b'"response.completed"' in events or b'"response.incomplete"' in events:
                    for data in sse_data(events):
                        self._usage(data)
                self.h.sse_chunk(rename(events))
        except ClientGone:
            ex.abort()
            raise
        ex.close()
        self.job.status = 200

    def _usage(self, data: bytes) -> None:
        try:
            resp = json.loads(data).get("response")
        except (ValueError, AttributeError):
            return
        if isinstance(resp, dict):
            self.job.usage = chat_usage(resp.get("usage"))

    def fail(self, err: errors.SluiceError) -> None:
        self.job.status = err.status
        try:
            self.h.sse_chunk(self.stream.fail(err.message))
            self.h.end_sse()
        except ClientGone:
            pass
        self.h.close_connection = True
