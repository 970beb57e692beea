"""A streamed answer's life, the same for every API: its 200 head, sent early while the job waits in the queue
(with a keepalive every SSE_KEEPALIVE_S) or with the first upstream byte; the backend's events relayed or
translated as they arrive, the backend's exchange aborted when the client leaves; and, once the head is out,
a failure as the API's own last event, since the status line can no longer say it.

Each API surface subclasses `Stream` for its framing only: `keepalive` (an SSE comment here; Anthropic a
ping, Ollama an empty line of its answer), `error` (the bytes of its error event), `look` (what it notes in
a relayed stream: usage, the end) and, for NDJSON, the content type.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from sluice import errors
from sluice.jobs import JobPath, encode, expanded, usage_of
from sluice.scheduler import Job
from sluice.server import ClientGone, Handler
from sluice.translate_stream import chat_chunks
from sluice.upstream import Exchange


class Stream:
    content_type = "text/event-stream"

    def __init__(self, h: Handler, job: Job, jobs: JobPath, into=None):
        self.h, self.job, self.jobs = h, job, jobs
        self.into = into                  # what makes the API's events of chat chunks (translate_stream.ChunkStream)
        self.started = False

    # ---- the API's framing -------------------------------------------------------------------------------
    def keepalive(self, position: int) -> bytes:
        """What a stream waiting in the queue sends: an SSE comment, which SSE clients skip."""
        return b": queued position=%d\n\n" % position

    def error(self, err: errors.SluiceError) -> bytes:
        raise NotImplementedError

    def look(self, events: bytes) -> bytes:
        """A run of a relayed backend's events as it goes on, what the API needs of it noted."""
        return events

    # ---- the life ----------------------------------------------------------------------------------------
    def run(self, serve: Callable[[Job], None]) -> None:
        """The job through JobPath.run; a failure once the head went out (while queued, or mid-answer) ends the
        stream with the API's error event instead of a status."""
        try:
            self.jobs.run(self.h, self.job, serve, tick=self.tick if self.job.stream else None)
        except errors.SluiceError as e:
            if not self.started:
                raise
            self.fail(e)
            return
        if self.started:
            self.end()

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.h.start_sse(self.jobs.response_headers(self.job), self.content_type)
            if self.job.first_byte_at is None:
                self.job.first_byte_at = self.jobs.clock()

    def tick(self, position: int) -> None:
        self.send(self.keepalive(position))

    def send(self, data: bytes) -> None:
        self.start()
        self.h.sse_chunk(data)

    @contextlib.contextmanager
    def reading(self, ex: Exchange) -> Iterator[None]:
        """Around a loop over `ex`'s events: a client that leaves aborts the exchange, so the backend stops
        generating for nobody; otherwise the exchange is closed (its connection reused when read to the end)."""
        try:
            yield
        except ClientGone:
            ex.abort()
            raise
        finally:
            ex.close()

    def relay(self, ex: Exchange, deadline: float, rename: Callable[[bytes], bytes]) -> None:
        """A backend's stream in the API's own grammar, passed on as it arrives: each run of events through
        `look`, renamed to the model the client asked for."""
        self.start()
        with self.reading(ex):
            for events in ex.events(deadline):
                self.h.sse_chunk(rename(self.look(events)))

    def pass_through(self, backend: str, ex: Exchange, deadline: float, rename: Callable[[bytes], bytes],
                     usage: Callable[[dict], dict | None]) -> None:
        """A backend's answer in the client's own OpenAI-envelope API: a stream relayed; a whole answer renamed,
        its usage as `usage` reads it; a 4xx as the backend wrote it (JobPath.read_answer)."""
        if self.job.stream and ex.status == 200:
            self.relay(ex, deadline, rename)
            self.job.status = 200
            return
        answer = self.jobs.read_answer(self.h, self.job, backend, ex, deadline)
        if answer is not None:
            self.job.usage = usage(answer[1])
            self.jobs.answer(self.h, self.job, rename(answer[0]), 200,
                             ex.headers.get("content-type", "application/json"))

    def translated(self, path: str, body: dict, back: Callable[[dict], dict], cloud: Callable[[], None],
                   error: Callable[[str, int, bytes], errors.SluiceError] | None = None) -> None:
        """A request sluice translated (`body`, for the backend's `path`) at the granted backend, with the job's
        priority when the backend takes one: a stream through `translate`, a whole answer's object through
        `back` (errors as JobPath.read_answer says); `cloud()` when the backend refused and the job moved to
        the cloud route."""
        if self.jobs.backends[self.job.backend].forward_priority:
            body["priority"] = self.job.priority
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(self.job, path, encode(self.h, body), deadline)
        if opened is None:
            return cloud()
        up, ex = opened
        if self.job.stream and ex.status == 200:
            return self.translate(ex, deadline)
        answer = self.jobs.read_answer(self.h, self.job, up.name, ex, deadline, error)
        if answer is not None:
            self.job.usage = usage_of(answer[1])
            self.jobs.answer(self.h, self.job, back(answer[1]))

    def translate(self, ex: Exchange, deadline: float) -> None:
        """A backend's chat chunks as the API's events (`into` makes them and the closing ones), as they arrive."""
        self.start()
        done = False
        with self.reading(ex):
            for events in ex.events(deadline):
                chunks, done = chat_chunks(events, self.job.backend)
                self.send(b"".join([self.into.feed(c) for c in chunks]))
                if done:
                    break
        if not done and self.into.finish is None:
            raise errors.BadGateway(f"backend {self.job.backend!r} ended the stream before its last event")
        self.close_into()

    def close_into(self) -> None:
        """A translated stream's closing events; the job's usage as the translation counted it."""
        self.job.usage = self.into.usage
        self.send(self.into.end())
        self.job.status = 200

    def cloud_chat(self, body: dict, back: Callable[[dict], dict], each: Callable[[dict], None],
                   end: Callable[[], None] | None = None) -> None:
        """The job on the cloud route, as a chat request (cloud.py speaks Anthropic): a whole answer's object
        through `back`; a stream's chunks each through `each`, then `end()`."""
        body = expanded(self.h, body)           # Anthropic gets the real strings
        timeout = self.jobs.settings.cloud_timeout_s
        if not self.job.stream:
            obj = self.jobs.cloud.chat(body, timeout)
            self.job.usage = obj.get("usage")
            return self.jobs.answer(self.h, self.job, back(obj))
        chunks = self.jobs.cloud.chat_stream(body, timeout)
        try:
            for chunk in chunks:
                each(chunk)
        finally:
            chunks.close()
        if end is not None:
            end()

    def end(self) -> None:
        self.h.end_sse()

    def fail(self, err: errors.SluiceError) -> None:
        self.job.status = err.status
        try:
            self.h.sse_chunk(self.error(err))
            self.end()
        except ClientGone:
            pass
        self.h.close_connection = True
