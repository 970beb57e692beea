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
from sluice.jobs import JobPath, bool_field, encode, int_field, usage_of
from sluice.scheduler import Job, Outcome
from sluice.server import Handler, Route, compact_json
from sluice.streams import Stream
from sluice.translate_ollama import DETAILS, Answer, bad, ns, options, request, upstream_error
from sluice.translate_stream import sse_data
from sluice.upstream import Exchange

API_VERSION = "0.12.0"      # the Ollama API level answered by /api/version (clients gate features on it)


def _ndjson(lines: list[dict]) -> bytes:
    return b"".join(compact_json(x).encode() + b"\n" for x in lines)


class _Lines(Stream):
    """One NDJSON answer: its head goes out with the first line (or while queued, with an empty one)."""

    content_type = "application/x-ndjson"

    def __init__(self, h: Handler, job: Job, jobs: JobPath, answer: Answer):
        super().__init__(h, job, jobs)
        self.answer = answer

    def keepalive(self, position: int) -> bytes:
        return _ndjson([self.answer.line()])

    def error(self, err: errors.SluiceError) -> bytes:
        return _ndjson([{"error": err.message}])          # Ollama's clients raise on a line with `error`

    def lines(self, lines: list[dict | None]) -> None:
        lines = [x for x in lines if x is not None]
        if lines:
            self.send(_ndjson(lines))

    def translate(self, ex: Exchange, deadline: float) -> None:
        """The backend's chat chunks as Ollama's lines; what does not parse is passed over (Ollama's own
        clients would rather have the rest of the answer than an error)."""
        with self.reading(ex):
            for events in ex.events(deadline):
                sent = []
                for payload in sse_data(events):
                    if payload != b"[DONE]":
                        try:
                            sent.append(self.answer.chunk(json.loads(payload)))
                        except (ValueError, AttributeError):
                            continue
                self.lines(sent)
        self.tail()

    def tail(self) -> None:
        """The last lines, once the job is finished (its slot free before they are written)."""
        self.job.usage = self.answer.usage
        self.job.status = 200
        self.jobs.scheduler.finish(self.job, Outcome.OK)
        self.lines(self.answer.tail())


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
    def _resolve(self, name) -> str:
        """A configured name or alias; `name:latest` (what Ollama clients add) is the name itself."""
        if isinstance(name, str) and name.endswith(":latest") and name[:-7] in self.jobs.models:
            name = name[:-7]
        return self.jobs.resolve(name, native=False)

    def _entry(self, name: str) -> dict:
        when = datetime.fromtimestamp(self.jobs.started_wall, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"name": name, "model": name, "modified_at": when, "size": 0, "digest": "", "details": DETAILS}

    def tags(self, h: Handler) -> None:
        h.respond_json(200, {"models": [self._entry(n) for n in self.jobs.names()]})

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
        stream = bool_field(body, "stream", True)
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
        job = self.jobs.new_job(h, body["model"], model, priority, f"/api/{kind}", stream=stream, timeout_s=None,
                                payload=out.get("messages", out.get("prompt")))
        answer = Answer(kind, body["model"], t0)
        lines = _Lines(h, job, self.jobs, answer)
        lines.run(lambda job: self._serve(h, job, path, out, answer, lines))

    def _serve(self, h: Handler, job: Job, path: str, out: dict, answer: Answer, lines: _Lines) -> None:
        answer.t_grant = time.monotonic()
        if job.model == CLOUD or job.rerouted:
            return self._serve_cloud(h, job, out, answer, lines)
        lines.translated(path, {"model": self.jobs.models[job.model].upstream_model, **out}, answer.whole,
                         lambda: self._serve_cloud(h, job, out, answer, lines), upstream_error)

    def _serve_cloud(self, h: Handler, job: Job, out: dict, answer: Answer, lines: _Lines) -> None:
        lines.cloud_chat({"model": CLOUD, **out}, answer.whole, lambda chunk: lines.lines([answer.chunk(chunk)]),
                         lines.tail)

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
        opened = self.jobs.forward(job, "/embeddings", encode(h, up_body), deadline)
        if opened is None:
            raise errors.Unavailable(f"no local backend took model {asked!r} for embeddings; retry shortly")
        up, ex = opened
        _, obj = self.jobs.read_answer(h, job, up.name, ex, deadline, upstream_error)
        items = obj.get("data") if isinstance(obj.get("data"), list) else []
        vectors = [d.get("embedding") for d in sorted((d for d in items if isinstance(d, dict)),
                                                      key=lambda d: d.get("index", 0))]
        usage = usage_of(obj) or {}
        job.usage = usage or None
        if legacy:
            answer = {"embedding": vectors[0] if vectors else []}
        else:
            answer = {"model": asked, "embeddings": vectors, "total_duration": ns(time.monotonic() - t0),
                      "load_duration": ns(grant - t0)}
            if isinstance(usage.get("prompt_tokens"), int):
                answer["prompt_eval_count"] = usage["prompt_tokens"]
        self.jobs.answer(h, job, answer)
