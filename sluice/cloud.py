"""The Anthropic route for `model: "cloud"`: no gate, its own concurrency limit.

Three modes, chosen per call by `Cloud.mode()`:
  api          the `anthropic` SDK is importable and ANTHROPIC_API_KEY is set (`pip install 'sluice-llm[cloud]'`);
               ANTHROPIC_BASE_URL, when set, points it elsewhere (a proxy, a test stand-in).
  cli          otherwise the `claude` CLI, run as `claude -p --model MODEL [--system-prompt=SYSTEM] -- PROMPT`:
               client text is only ever an option's value inside one argv element or the operand after `--`,
               never an option of its own.
  unavailable  a 503 whose message says how to enable one of the two.

OpenAI chat.completions requests are translated to the Messages API and back by sluice/translate_cloud.py
(`to_messages`, `from_message`) and sluice/translate_stream.py (`translate_events`), streaming included;
Messages requests (the /v1/messages ingress) go to the API as they are (`messages`, `messages_stream`), or
to the CLI as text (`cli_form`, `flatten`). Everything here is stdlib at import time; the SDK is imported on
the first API call.

Model choice: the configured cloud model, unless the request names a `claude-*` model itself.
Timeouts: the `timeout` argument is the caller's whole budget: waiting for a permit plus the call. For a
stream it bounds the wait for the answer to start and then each read (a stream that keeps producing may
run longer; the caller closes it to stop).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from sluice import errors
from sluice.processes import kill_group
from sluice.translate import CLAUDE_MODEL, new_message_id
from sluice.translate_cloud import from_message, to_messages
from sluice.translate_stream import Chunker, message_events, translate_events

RETRY_AFTER_S = 5.0                  # when Anthropic rate-limits or is overloaded without saying for how long
_HOW_TO_ENABLE = ("pip install 'sluice-llm[cloud]' and set ANTHROPIC_API_KEY, or install the `claude` CLI "
                  "(SLUICE_CLAUDE_BIN names it when it is not on PATH)")


class Cloud:
    """The cloud route. Thread-safe; one instance serves every handler thread."""

    def __init__(self, model: str = "claude-sonnet-4-6", concurrency: int = 4, claude_bin: str = "claude",
                 environ: Mapping[str, str] | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.model = model
        self.concurrency = concurrency
        self.claude_bin = claude_bin
        self._env = os.environ if environ is None else environ
        self._permits = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()          # guards _inflight and the lazily built client
        self._inflight = 0
        self._client = None
        self._create_params: frozenset[str] = frozenset()

    # ---- state ---------------------------------------------------------------------------------------
    def mode(self) -> str:
        """"api", "cli" or "unavailable", as the next call would find it (cheap: imports nothing)."""
        if self._env.get("ANTHROPIC_API_KEY") and _sdk_installed():
            return "api"
        if self._cli_path():
            return "cli"
        return "unavailable"

    def info(self) -> dict:
        with self._lock:
            inflight = self._inflight
        return {"mode": self.mode(), "model": self.model, "inflight": inflight, "concurrency": self.concurrency}

    def _cli_path(self) -> str | None:
        found = shutil.which(self.claude_bin, path=self._env.get("PATH"))
        if found:
            return found
        if os.sep in self.claude_bin and os.path.isfile(self.claude_bin) and os.access(self.claude_bin, os.X_OK):
            return self.claude_bin
        return None

    def _unavailable(self) -> errors.Unavailable:
        if self._env.get("ANTHROPIC_API_KEY"):
            why = "ANTHROPIC_API_KEY is set but the anthropic package is not installed"
        else:
            why = "the cloud model is not configured"
        return errors.Unavailable(f"{why}: {_HOW_TO_ENABLE}", retry_after=60)

    # ---- concurrency -------------------------------------------------------------------------------
    def _acquire(self, deadline: float) -> None:
        if not self._permits.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise errors.Unavailable(f"the cloud route is busy ({self.concurrency} calls at once, "
                                     "SLUICE_CLOUD_CONCURRENCY); retry shortly", retry_after=2)
        with self._lock:
            self._inflight += 1

    def _release(self) -> None:
        with self._lock:
            self._inflight -= 1
        self._permits.release()

    # ---- the three entry points ------------------------------------------------------------------
    def query(self, prompt: str, system: str | None, max_tokens: int, temperature: float | None,
              timeout: float) -> str:
        """The native /v1/query: one prompt in, the answer's text out."""
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        if system:
            body["messages"].insert(0, {"role": "system", "content": system})
        if temperature is not None:
            body["temperature"] = temperature
        return self.chat(body, timeout)["choices"][0]["message"]["content"] or ""

    def chat(self, body: dict, timeout: float) -> dict:
        """An OpenAI chat.completions body in, an OpenAI chat.completion dict out."""
        mode = self.mode()
        if mode == "unavailable":
            raise self._unavailable()
        request = to_messages(body, self.model)
        if mode == "cli":
            prompt = flatten(request)
        deadline = time.monotonic() + timeout
        self._acquire(deadline)
        try:
            if mode == "api":
                msg = self._api(request, deadline, stream=False)
                return from_message(_as_dict(msg), request["model"])
            text = self._cli(request, prompt, deadline)
            return from_message({"content": [{"type": "text", "text": text}], "stop_reason": "end_turn"},
                                request["model"])
        finally:
            self._release()

    def chat_stream(self, body: dict, timeout: float) -> "CloudStream":
        """OpenAI chat.completion.chunk dicts (the caller writes each as an SSE `data:` line, then [DONE]).

        Errors that happen before the answer starts (bad body, busy, unavailable, auth, rate limit, the
        upstream status) raise from this call, so the caller can still answer with a real status. The
        returned iterator holds a concurrency permit until it is exhausted, fails or is closed: the caller
        MUST close() it (or use it as a context manager) when it stops reading early."""
        mode = self.mode()
        if mode == "unavailable":
            raise self._unavailable()
        request = to_messages(body, self.model)
        include_usage = bool(isinstance(body.get("stream_options"), dict)
                             and body["stream_options"].get("include_usage"))
        chunker = Chunker(request["model"])
        if mode == "cli":
            prompt = flatten(request)
        deadline = time.monotonic() + timeout
        self._acquire(deadline)
        if mode == "cli":
            try:
                text = self._cli(request, prompt, deadline)
            finally:
                self._release()
            chunks = [chunker.make({"role": "assistant", "content": text}), chunker.make({}, finish="stop")]
            if include_usage:
                chunks.append(chunker.make({}, usage={"prompt_tokens": 0, "completion_tokens": 0,
                                                      "total_tokens": 0}))
            return CloudStream(iter(chunks), None, lambda: None)
        try:
            upstream = self._api(request, deadline, stream=True)
        except BaseException:
            self._release()
            raise
        events = (_as_dict(e) for e in upstream)
        return CloudStream(translate_events(events, chunker, include_usage), upstream, self._release,
                           key=self._env.get("ANTHROPIC_API_KEY"))

    # ---- Messages as they are (the /v1/messages ingress) ---------------------------------------------------
    def _messages_request(self, body: dict) -> dict:
        model = body.get("model")
        return {**body, "model": model if isinstance(model, str) and CLAUDE_MODEL.fullmatch(model) else self.model}

    def messages(self, body: dict, timeout: float, beta: str | None = None) -> dict:
        """A Messages request (no `stream`) in, Anthropic's answer out as it came (a dict). Anthropic's own
        4xx (a bad field, too large) reach the client with their status (ClientError). `beta`: the client's
        anthropic-beta header, which the features it asks for need."""
        mode = self.mode()
        if mode == "unavailable":
            raise self._unavailable()
        request = self._messages_request(body)
        if mode == "cli":
            request = cli_form(request)
            prompt = flatten(request)
        deadline = time.monotonic() + timeout
        self._acquire(deadline)
        try:
            if mode == "api":
                return _as_wire(self._api(request, deadline, stream=False, relay=True, beta=beta))
            text = self._cli(request, prompt, deadline)
        finally:
            self._release()
        return {"id": new_message_id(), "type": "message", "role": "assistant", "model": request["model"],
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}

    def messages_stream(self, body: dict, timeout: float, beta: str | None = None) -> "CloudStream":
        """Anthropic's stream events for a Messages request, as dicts, as they came (the CLI's answer as one
        stream of whole blocks). Errors before the answer starts raise here; close() it, as chat_stream's."""
        mode = self.mode()
        if mode == "cli":
            return CloudStream(message_events(self.messages(body, timeout)), None, lambda: None)
        if mode == "unavailable":
            raise self._unavailable()
        request = self._messages_request(body)
        deadline = time.monotonic() + timeout
        self._acquire(deadline)
        try:
            upstream = self._api(request, deadline, stream=True, relay=True, beta=beta)
        except BaseException:
            self._release()
            raise
        return CloudStream((_as_wire(e) for e in upstream), upstream, self._release,
                           key=self._env.get("ANTHROPIC_API_KEY"))

    # ---- transports ----------------------------------------------------------------------------------
    def _sdk_client(self):
        with self._lock:
            if self._client is None:
                sdk = _sdk()
                if sdk is None:
                    raise self._unavailable()
                kw: dict[str, Any] = {"api_key": self._env.get("ANTHROPIC_API_KEY"), "max_retries": 0}
                if self._env.get("ANTHROPIC_BASE_URL"):
                    kw["base_url"] = self._env["ANTHROPIC_BASE_URL"]
                client = sdk.Anthropic(**kw)
                import inspect
                self._create_params = frozenset(inspect.signature(client.messages.create).parameters)
                self._client = client
            return self._client

    def _api(self, request: dict, deadline: float, stream: bool, relay: bool = False, beta: str | None = None):
        client = self._sdk_client()
        # Fields this SDK version has no keyword for (some releases dropped `temperature` and `top_p`)
        # travel in `extra_body`, so the API still receives them.
        kw = {k: v for k, v in request.items() if k in self._create_params}
        extra = {k: v for k, v in request.items() if k not in self._create_params}
        if extra:
            kw["extra_body"] = extra
        if stream:
            kw["stream"] = True
        if beta:
            kw["extra_headers"] = {"anthropic-beta": beta}
        try:
            return client.messages.create(**kw, timeout=max(0.001, deadline - time.monotonic()))
        except Exception as e:
            raise _map_sdk_error(e, self._env.get("ANTHROPIC_API_KEY"), relay) from None

    def _cli(self, request: dict, prompt: str, deadline: float) -> str:
        argv = cli_argv(self._cli_path() or self.claude_bin, request["model"], request.get("system"), prompt)
        env = dict(os.environ)
        if self._env is not os.environ:
            env.update(self._env)
        # An empty working directory: the CLI's read-only tools then reach nothing of the server's files.
        with tempfile.TemporaryDirectory(prefix="sluice-claude-") as cwd:
            try:
                proc = subprocess.Popen(argv, shell=False, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
            except ValueError:      # a NUL byte in the text: argv cannot carry it
                raise errors.BadRequest("the prompt contains a NUL character", param="messages") from None
            except OSError as e:
                if e.errno == errno.E2BIG:
                    raise errors.PayloadTooLarge("the prompt is too long for the claude CLI's command line; "
                                                 "use the API route (ANTHROPIC_API_KEY)", param="messages") from None
                raise errors.BadGateway(f"cannot run the claude CLI: {e.strerror or e}") from None
            try:
                out, err = proc.communicate(timeout=max(0.001, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise errors.QueueTimeout("the claude CLI did not answer in time") from None
            except BaseException:
                _kill_group(proc)
                raise
        if proc.returncode != 0:
            tail = err[-500:].decode("utf-8", "replace").strip() or out[-200:].decode("utf-8", "replace").strip()
            raise errors.BadGateway(f"the claude CLI exited {proc.returncode}: {tail}")
        return out.decode("utf-8", "replace").strip()


class CloudStream:
    """An iterator of OpenAI chunk dicts that holds one cloud permit until it is exhausted, fails or is
    closed. close() is idempotent: it closes the upstream response and returns the permit."""

    def __init__(self, chunks: Iterator[dict], upstream, release: Callable[[], None], key: str | None = None):
        self._chunks = chunks
        self._key = key
        self._upstream = upstream
        self._release = release
        self._closed = False
        self._close_lock = threading.Lock()

    def __iter__(self) -> "CloudStream":
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        try:
            return next(self._chunks)
        except StopIteration:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise _map_sdk_error(e, self._key) from None

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            close = getattr(self._chunks, "close", None)
            if close:
                close()
            if self._upstream is not None:
                self._upstream.close()
        except Exception:
            pass
        finally:
            self._release()

    def __enter__(self) -> "CloudStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):          # a safety net only; callers close() explicitly
        try:
            self.close()
        except Exception:
            pass


def cli_argv(claude: str, model: str, system: str | None, prompt: str) -> list[str]:
    """The claude CLI's argv. Everything before `--` is ours: fixed option names, the model (ours or a
    validated `claude-*` name) and the system prompt fused into the single element `--system-prompt=...`,
    so no text can stand as an option; the client's prompt is the one operand after `--`."""
    if not model or model.startswith("-"):
        raise errors.BadRequest(f"invalid model name {model!r}", param="model")
    argv = [claude, "-p", "--model", model]
    if system:
        argv.append("--system-prompt=" + system)
    argv += ["--", prompt]
    return argv


def _kill_group(proc: subprocess.Popen) -> None:
    kill_group(proc, 0)
    proc.communicate()      # closes its pipes


# ---- the SDK, imported lazily ------------------------------------------------------------------------------
def _sdk_installed() -> bool:
    if "anthropic" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("anthropic") is not None
    except (ImportError, ValueError):
        return False


def _sdk():
    try:
        import anthropic
    except ImportError:
        return None
    return anthropic


def _as_dict(obj) -> dict:
    return obj if isinstance(obj, dict) else obj.model_dump()


def _as_wire(obj) -> dict:
    """An SDK object as the JSON it came as: only the fields Anthropic sent (a newer SDK's defaults left out)."""
    return obj if isinstance(obj, dict) else obj.to_dict(mode="json")


class ClientError(errors.SluiceError):
    """A 4xx that is the client's to fix (a backend or Anthropic said so), sent on with its own status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _upstream_message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(err.get("message"), str):
            return err["message"]
    return str(e)


def _retry_after(e: Exception) -> float:
    response = getattr(e, "response", None)
    try:
        value = float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return RETRY_AFTER_S
    return value if 0 < value <= 3600 else RETRY_AFTER_S


def _map_sdk_error(e: BaseException, key: str | None = None, relay: bool = False) -> errors.SluiceError:
    """An SDK (or httpx, mid-stream) exception as the sluice error a client should see. The key never appears.
    `relay`: the request went as the client sent it, so Anthropic's 400/404/413 are the client's (ClientError)."""
    if isinstance(e, errors.SluiceError):
        return e

    def scrub(text: str) -> str:
        text = text[:300]
        return text.replace(key, "***") if key else text

    sdk = sys.modules.get("anthropic")
    httpx = sys.modules.get("httpx")
    status = getattr(e, "status_code", None)
    if (sdk is not None and isinstance(e, sdk.APITimeoutError)) or \
            (httpx is not None and isinstance(e, httpx.TimeoutException)):
        return errors.QueueTimeout("Anthropic did not answer in time")
    if status in (401, 403):
        return errors.BadGateway(f"Anthropic rejected the credentials ({status}): check ANTHROPIC_API_KEY")
    if status in (429, 529):
        what = "rate limiting" if status == 429 else "overloaded"
        return errors.Unavailable(f"Anthropic is {what} ({status}); retry shortly", retry_after=_retry_after(e))
    if relay and status in (400, 404, 413, 422):
        return ClientError(status, f"Anthropic answered {status}: {scrub(_upstream_message(e))}")
    if status is not None:
        return errors.BadGateway(f"Anthropic answered {status}: {scrub(_upstream_message(e))}")
    if (sdk is not None and isinstance(e, sdk.APIConnectionError)) or \
            (httpx is not None and isinstance(e, httpx.HTTPError)):
        return errors.BadGateway(f"cannot reach Anthropic: {scrub(str(e) or type(e).__name__)}")
    return errors.BadGateway(f"Anthropic call failed: {scrub(str(e) or type(e).__name__)}")


# ---- the CLI's one prompt -----------------------------------------------------------------------------------
def cli_form(request: dict) -> dict:
    """A Messages request as the client may write it (string contents, system blocks, tool results as
    blocks) in the one shape `flatten` and the CLI take: system a string, every content a list of blocks,
    every tool result's content a string."""
    system = request.get("system")
    if isinstance(system, list):
        system = "\n\n".join(b.get("text") or "" for b in system if isinstance(b, dict))
    msgs = []
    for i, m in enumerate(request.get("messages") or []):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not all(isinstance(b, dict) and "type" in b for b in content):
            raise errors.BadRequest("content must be a string or a list of content blocks",
                                    param=f"messages[{i}].content")
        blocks = []
        for b in content:
            if b["type"] == "tool_result" and isinstance(b.get("content"), list):
                b = {**b, "content": "\n".join(x.get("text") or "" for x in b["content"] if isinstance(x, dict))}
            blocks.append(b)
        msgs.append({"role": m.get("role"), "content": blocks})
    return {**request, "system": system or None, "messages": msgs}


def flatten(request: dict) -> str:
    """A translated request as the CLI's single prompt. One user message: its text as is. Several turns:
    `User: ...` / `Assistant: ...` paragraphs separated by blank lines, tool calls written as
    `[tool call NAME(ARGS_JSON)]` and results as `[tool result: TEXT]`. The CLI takes text only, so
    images and tool definitions need the API route (errors.BadRequest)."""
    if request.get("tools"):
        raise errors.BadRequest("tools need the Anthropic API route (set ANTHROPIC_API_KEY); the claude CLI "
                                "route is text only", param="tools")
    msgs = request["messages"]
    turns = []
    for m in msgs:
        parts = []
        for b in m["content"]:
            if b["type"] == "text":
                parts.append(b["text"])
            elif b["type"] == "tool_use":
                parts.append(f"[tool call {b['name']}({json.dumps(b['input'])})]")
            elif b["type"] == "tool_result":
                parts.append(f"[tool result: {b['content']}]")
            else:
                raise errors.BadRequest("images need the Anthropic API route (set ANTHROPIC_API_KEY); the claude "
                                        "CLI route is text only", param="messages")
        text = "\n".join(parts)
        turns.append(text if len(msgs) == 1 else f"{m['role'].capitalize()}: {text}")
    return "\n\n".join(turns)
