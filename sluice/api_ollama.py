"""Ollama's native API: /api/chat, /api/generate, /api/embed (and the older /api/embeddings), /api/tags, /api/ps,
/api/show, /api/version, /api/pull: an ingress adapter over the one job path (jobs.py).

Requests become OpenAI requests to the backend (translate_ollama.py); the answers come back in Ollama's shapes:
NDJSON lines (stream is on unless `"stream": false`), the last one `done` with `done_reason`, token counts and
durations in ns.

While a stream waits in the queue, the head goes out and an empty line of the answer's own kind (`"content": ""`,
`"done": false`) keeps it alive every SSE_KEEPALIVE_S: the `ollama` package parses every line as JSON, so a
comment or blank line would break it, and an empty delta is what Ollama itself sends at times.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from sluice import __version__, errors
from sluice.config import CLOUD
from sluice.jobs import JobPath, int_field, show
from sluice.scheduler import Job, Outcome
from sluice.server import ClientGone, Handler, Route, compact_json
from sluice.translate_ollama import DETAILS, Answer, bad, ns, options, request, upstream_error
from sluice.translate_stream import sse_data
from sluice.upstream import json_body

API_VERSION = "0.12.0"      # the Ollama API level answered by /api/version (clients gate features on it)
NDJSON = b"\n"


class _Lines:
    """One NDJSON answer: the 200 head (early while queued, or with the first line), lines, the end."""

    def __init__(self, h: Handler, job: Job, jobs: JobPath, answer: Answer):
        self.h, self.job, self.jobs, self.answer = h, job, jobs, answer
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.h.start_sse(self.jobs.response_headers(self.job), "application/x-ndjson")

    def send(self, lines: list[dict]) -> None:
        if lines:
            self.start()
            self.h.sse_chunk(b"".join(compact_json(x).encode() + NDJSON for x in lines))

    def tick(self, position: int) -> None:
        self.send([self.answer.line()])

    def end(self) -> None:
        self.h.end_sse()

    def fail(self, err: errors.SluiceError) -> None:
        """An error after the head: Ollama's clients raise on a line with `error`."""
        self.job.status = err.status
        try:
            self.send([{"error": err.message}])
            self.end()
        except ClientGone:
            pass
        self.h.close_connection = True


class OllamaApi:
    def __init__(self, jobs: JobPath):
        self.jobs = jobs

    def routes(self) -> list[Route]:
        r = lambda method, path, fn: Route(method, path, fn, api="ollama")
        return [r("POST", "/api/chat", lambda h: self.answer(h, "chat")),
                r("POST", "/api/generate", lambda h: self.answer(h, "generate")),
                r("POST", "/api/embed", lambda h: self.embed(h, legacy=False)),
                r("POST", "/api/embeddings", lambda h: self.embed(h, legacy=True)),
                r("GET", "/api/tags", self.tags), r("GET", "/api/ps", self.ps), r("POST", "/api/show", self.show),
                r("GET", "/api/version", self.version), r("POST", "/api/pull", self.pull)]

    # ---- models --------------------------------------------------------------------------------------
    def _names(self) -> list[str]:
        names = [n for m in self.jobs.settings.models for n in (m.name, *m.aliases)]
        return names + [CLOUD] if self.jobs.cloud.mode() != "unavailable" else names

    def _resolve(self, name) -> str:
        """A configured name or alias; `name:latest` (what Ollama clients add) is the name itself."""
        if isinstance(name, str) and name.endswith(":latest") and name[:-7] in self.jobs.models:
            name = name[:-7]
        return self.jobs.resolve(name, native=False)

    def _entry(self, name: str) -> dict:
        when = datetime.fromtimestamp(self.jobs.started_wall, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"name": name, "model": name, "modified_at": when, "size": 0, "digest": "", "details": DETAILS}

    def tags(self, h: Handler) -> None:
        h.respond_json(200, {"models": [self._entry(n) for n in self._names()]})

    def ps(self, h: Handler) -> None:
        """What each gate has loaded: an exclusive gate its resident model; a shared gate the model each
        of its ready backends served last (all of them are up at once there)."""
        snap = self.jobs.scheduler.snapshot()
        loaded = [g["resident"] for g in snap["gates"].values() if g["resident"]]
        shared = {n for n, g in snap["gates"].items() if g["mode"] != "exclusive"}
        loaded += [b["current"] for b in snap["backends"].values()
                   if b["gate"] in shared and b["health"] == "ready" and b["current"]]
        models = [{**self._entry(n), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}
                  for n in dict.fromkeys(loaded)]
        h.respond_json(200, {"models": models})

    def show(self, h: Handler) -> None:
        body = h.read_json(self.jobs.settings.max_body_bytes)
        asked = body.get("model", body.get("name"))
        model = self._resolve(asked)
        cfg = self.jobs.models.get(model)
        info = {"sluice.upstream_model": cfg.upstream_model, "sluice.backends": list(cfg.backends)} if cfg else {}
        h.respond_json(200, {"modelfile": "", "parameters": "", "template": "", "details": DETAILS,
                             "model_info": info, "capabilities": ["completion", "tools"],
                             "modified_at": self._entry(model)["modified_at"]})

    def version(self, h: Handler) -> None:
        h.respond_json(200, {"version": API_VERSION}, headers={"X-Sluice-Version": __version__})

    def pull(self, h: Handler) -> None:
        """Models are configured, never downloaded: a known one is "pulled" already."""
        body = h.read_json(self.jobs.settings.max_body_bytes)
        self._resolve(body.get("model", body.get("name")))
        if body.get("stream", True) is False:
            return h.respond_json(200, {"status": "success"})
        h.respond(200, b'{"status":"success"}\n', "application/x-ndjson")

    # ---- chat and generate ---------------------------------------------------------------------------
    def answer(self, h: Handler, kind: str) -> None:
        t0 = time.monotonic()
        s = self.jobs.settings
        body = h.read_json(s.max_body_bytes, big=True)
        model = self._resolve(body.get("model"))
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise bad(f"stream must be true or false, got {show(stream)}", "stream")
        out, path = request(body, kind)
        if out is None:                   # no prompt: Ollama's "load the model" call, answered at once
            return h.respond_json(200, {**Answer(kind, body["model"], t0).line(done=True), "done_reason": "load"})
        out.update(options(body, s.max_tokens))
        cap = self.jobs.max_tokens_cap(model)
        if cap is not None and out.get("max_tokens", cap + 1) > cap:
            out["max_tokens"] = cap
        if stream:
            out.update(stream=True, stream_options={"include_usage": True})
        if model == CLOUD and path != "/chat/completions":
            raise bad(f"model {CLOUD!r} serves chat only (not raw or suffix generate)", "model")
        priority = self.jobs.priority(h, body, model)
        job = self.jobs.new_job(h, body["model"], model, priority, f"/api/{kind}", stream=stream, timeout_s=None)
        if s.log_prompts:
            payload = out.get("messages", out.get("prompt"))
            job.payload = h.bigs.expand(payload) if h.bigs is not None else payload
        answer = Answer(kind, body["model"], t0)
        lines = _Lines(h, job, self.jobs, answer)
        try:
            self.jobs.run(h, job, lambda job: self._serve(h, job, path, out, answer, lines),
                          tick=lines.tick if stream else None)
        except errors.SluiceError as e:
            if not lines.started:
                raise
            lines.fail(e)
            return
        if lines.started:
            lines.end()

    def _encode(self, h: Handler, out: dict):
        """The upstream body, long strings (images) put back from the request's own bytes."""
        data = json.dumps(out).encode()
        return data if h.bigs is None else h.bigs.encode(data)

    def _serve(self, h: Handler, job: Job, path: str, out: dict, answer: Answer, lines: _Lines) -> None:
        answer.t_grant = time.monotonic()
        if job.model == CLOUD or job.rerouted:
            return self._serve_cloud(h, job, out, answer, lines)
        upstream_model = self.jobs.models[job.model].upstream_model
        up_body = {"model": upstream_model, **out}
        if self.jobs.backends[job.backend].forward_priority:
            up_body["priority"] = job.priority
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(job, path, self._encode(h, up_body), deadline)
        if opened is None:
            return self._serve_cloud(h, job, out, answer, lines)
        up, ex = opened
        if not job.stream or ex.status != 200:
            data = ex.read(deadline)
            ex.close()
            if ex.status != 200:
                raise upstream_error(up.name, ex.status, data)
            obj = json_body(data, up.name)
            job.usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
            return self._whole(h, job, answer.whole(obj))
        try:
            for events in ex.events(deadline):
                sent = []
                for payload in sse_data(events):
                    if payload != b"[DONE]":
                        try:
                            line = answer.chunk(json.loads(payload))
                        except (ValueError, AttributeError):
                            continue
                        if line is not None:
                            sent.append(line)
                lines.send(sent)
        except ClientGone:
            ex.abort()
            raise
        ex.close()
        self._end_stream(job, answer, lines)

    def _whole(self, h: Handler, job: Job, obj: dict) -> None:
        job.status = 200
        self.jobs.scheduler.finish(job, Outcome.OK)       # the slot is free before the answer is written
        h.respond_json(200, obj, headers=self.jobs.response_headers(job))

    def _end_stream(self, job: Job, answer: Answer, lines: _Lines) -> None:
        job.usage = answer.usage
        job.status = 200
        self.jobs.scheduler.finish(job, Outcome.OK)
        lines.send(answer.tail())

    def _serve_cloud(self, h: Handler, job: Job, out: dict, answer: Answer, lines: _Lines) -> None:
        body = {"model": CLOUD, **(h.bigs.expand(out) if h.bigs is not None else out)}
        timeout = self.jobs.settings.cloud_timeout_s
        if not job.stream:
            obj = self.jobs.cloud.chat(body, timeout)
            job.usage = obj.get("usage")
            return self._whole(h, job, answer.whole(obj))
        chunks = self.jobs.cloud.chat_stream(body, timeout)
        try:
            for chunk in chunks:
                line = answer.chunk(chunk)
                lines.send([line] if line is not None else [])
        finally:
            chunks.close()
        self._end_stream(job, answer, lines)

    # ---- embeddings ----------------------------------------------------------------------------------
    def embed(self, h: Handler, legacy: bool) -> None:
        t0 = time.monotonic()
        body = h.read_json(self.jobs.settings.max_body_bytes, big=True)
        model = self._resolve(body.get("model"))
        name = "prompt" if legacy else "input"
        given = body.get(name)
        if not (isinstance(given, str) or (isinstance(given, list) and given
                                           and all(isinstance(x, str) for x in given))):
            raise bad(f"{name} must be a string" + ("" if legacy else " or a non-empty list of strings"), name)
        if model == CLOUD:
            raise bad(f"model {CLOUD!r} has no embeddings; use a local model", "model")
        out = {"input": given}
        dims = int_field(body, "dimensions", 1, 1 << 16)
        if dims is not None:
            out["dimensions"] = dims
        priority = self.jobs.priority(h, body, model)
        route = "/api/embeddings" if legacy else "/api/embed"
        job = self.jobs.new_job(h, body["model"], model, priority, route, timeout_s=None)
        self.jobs.run(h, job, lambda job: self._serve_embed(h, job, out, body["model"], t0, legacy))

    def _serve_embed(self, h: Handler, job: Job, out: dict, asked: str, t0: float, legacy: bool) -> None:
        grant = time.monotonic()
        up_body = {"model": self.jobs.models[job.model].upstream_model, **out}
        deadline = self.jobs.deadline()
        opened = self.jobs.forward(job, "/embeddings", self._encode(h, up_body), deadline)
        if opened is None:
            raise errors.Unavailable(f"no local backend took model {asked!r} for embeddings; retry shortly")
        up, ex = opened
        data = ex.read(deadline)
        ex.close()
        if ex.status != 200:
            raise upstream_error(up.name, ex.status, data)
        obj = json_body(data, up.name)
        items = obj.get("data") if isinstance(obj.get("data"), list) else []
        vectors = [d.get("embedding") for d in sorted((d for d in items if isinstance(d, dict)),
                                                      key=lambda d: d.get("index", 0))]
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        job.usage = usage or None
        if legacy:
            answer = {"embedding": vectors[0] if vectors else []}
        else:
            answer = {"model": asked, "embeddings": vectors, "total_duration": ns(time.monotonic() - t0),
                      "load_duration": ns(grant - t0)}
            if isinstance(usage.get("prompt_tokens"), int):
                answer["prompt_eval_count"] = usage["prompt_tokens"]
        self._whole(h, job, answer)
