"""The Anthropic route for `model: "cloud"`: no gate, its own concurrency limit.

Three modes, chosen per call by `Cloud.mode()`:
  api          the `anthropic` SDK is importable and ANTHROPIC_API_KEY is set (`pip install 'sluice-llm[cloud]'`);
               ANTHROPIC_BASE_URL, when set, points it elsewhere (a proxy, a test stand-in).
  cli          otherwise the `claude` CLI, run as `claude -p --model MODEL [--system-prompt=SYSTEM] -- PROMPT`:
               client text is only ever an option's value inside one argv element or the operand after `--`,
               never an option of its own.
  unavailable  a 503 whose message says how to enable one of the two.

OpenAI chat.completions requests are translated to the Messages API and back (`to_messages`, `from_message`,
`translate_events`: pure functions), streaming included. Everything here is stdlib at import time; the SDK is
imported on the first API call.

Model choice: the configured cloud model, unless an OpenAI request names a `claude-*` model itself.
Timeouts: the `timeout` argument is the caller's whole budget: waiting for a permit plus the call. For a
stream it bounds the wait for the answer to start and then each read (a stream that keeps producing may
run longer; the caller closes it to stop).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Mapping

from sluice import errors

DEFAULT_MAX_TOKENS = 1024            # Anthropic requires max_tokens; OpenAI bodies often leave it out
RETRY_AFTER_S = 5.0                  # when Anthropic rate-limits or is overloaded without saying for how long
_STOP = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
         "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
_MODEL_NAME = re.compile(r"claude-[A-Za-z0-9._:@\[\]-]+")
_HOW_TO_ENABLE = ("pip install 'sluice-llm[cloud]' and set ANTHROPIC_API_KEY, or install the `claude` CLI "
                  "(SLUICE_CLAUDE_BIN names it when it is not on PATH)")


class Cloud:
    """The cloud route. Thread-safe; one instance serves every handler thread."""

    def __init__(self, model: str = "claude-sonnet-4-6", concurrency: int = 4, timeout_s: float = 300.0,
                 claude_bin: str = "claude", environ: Mapping[str, str] | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
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
        chunker = _Chunker(request["model"])
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

    def _api(self, request: dict, deadline: float, stream: bool):
        client = self._sdk_client()
        # Fields this SDK version has no keyword for (some releases dropped `temperature` and `top_p`)
        # travel in `extra_body`, so the API still receives them.
        kw = {k: v for k, v in request.items() if k in self._create_params}
        extra = {k: v for k, v in request.items() if k not in self._create_params}
        if extra:
            kw["extra_body"] = extra
        if stream:
            kw["stream"] = True
        try:
            return client.messages.create(**kw, timeout=max(0.001, deadline - time.monotonic()))
        except Exception as e:
            raise _map_sdk_error(e, self._env.get("ANTHROPIC_API_KEY")) from None

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
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.communicate()


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


def _map_sdk_error(e: BaseException, key: str | None = None) -> errors.SluiceError:
    """An SDK (or httpx, mid-stream) exception as the sluice error a client should see. The key never appears."""
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
    if status is not None:
        return errors.BadGateway(f"Anthropic answered {status}: {scrub(_upstream_message(e))}")
    if (sdk is not None and isinstance(e, sdk.APIConnectionError)) or \
            (httpx is not None and isinstance(e, httpx.HTTPError)):
        return errors.BadGateway(f"cannot reach Anthropic: {scrub(str(e) or type(e).__name__)}")
    return errors.BadGateway(f"Anthropic call failed: {scrub(str(e) or type(e).__name__)}")


# ---- OpenAI -> Anthropic Messages -----------------------------------------------------------------------------
def _number(body: dict, name: str, lo: float, hi: float | None) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise errors.BadRequest(f"{name} must be a number", param=name)
    if v < lo or (hi is not None and v > hi):
        raise errors.BadRequest(f"{name} must be between {lo:g} and {hi:g}, got {v}", param=name)
    return float(v)


def _text(content, param: str) -> str:
    """The text of a content that may be a string or a list of parts (system, tool messages)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise errors.BadRequest("only text parts are allowed here", param=param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise errors.BadRequest("content must be a string or a list of parts", param=param)


def _image(url, param: str) -> dict:
    if not isinstance(url, str) or not url:
        raise errors.BadRequest("image_url.url must be a non-empty string", param=param)
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        if not sep or not head.endswith(";base64"):
            raise errors.BadRequest("an image data: URL must be base64 (data:image/png;base64,...)", param=param)
        return {"type": "image", "source": {"type": "base64", "media_type": head[:-len(";base64")] or "image/png",
                                            "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise errors.BadRequest("image_url.url must be an http(s) or data: URL", param=param)


def _blocks(content, param: str) -> list[dict]:
    """User/assistant content as Anthropic blocks; empty text is left out (Anthropic rejects it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise errors.BadRequest("content must be a string or a list of parts", param=param)
    out = []
    for j, part in enumerate(content):
        p = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise errors.BadRequest("a text part needs a string `text`", param=p)
            if part["text"]:
                out.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            iu = part.get("image_url")
            out.append(_image(iu.get("url") if isinstance(iu, dict) else iu, p))
        else:
            raise errors.BadRequest(f"unsupported content part type {kind!r} for the cloud model", param=p)
    return out


def _tool_use(call, param: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
        raise errors.BadRequest("a tool call needs an `id` and a `function` with a `name`", param=param)
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise errors.BadRequest("tool call arguments must be a JSON object", param=param) from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise errors.BadRequest("tool call arguments must be a JSON object", param=param)
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": args}


def _tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise errors.BadRequest("tools must be a list", param="tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise errors.BadRequest("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                                    param=f"tools[{i}]")
        schema = fn.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise errors.BadRequest("function.parameters must be a JSON Schema object", param=f"tools[{i}]")
        tool = {"name": fn["name"], "input_schema": schema}
        if isinstance(fn.get("description"), str):
            tool["description"] = fn["description"]
        out.append(tool)
    return out


def _tool_choice(choice) -> dict:
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        return {"type": "tool", "name": choice["function"]["name"]}
    raise errors.BadRequest("tool_choice must be \"auto\", \"none\", \"required\" or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


def to_messages(body: dict, default_model: str) -> dict:
    """An OpenAI chat.completions body as an Anthropic Messages request (a dict of create() arguments).

    system/developer messages (string or text parts) -> `system` (joined by blank lines); user/assistant turns
    kept in order, consecutive same-role turns merged (Anthropic wants them alternating); assistant
    `tool_calls` -> `tool_use` blocks; `tool` messages -> user `tool_result` blocks; image_url parts -> image
    blocks (data: URLs as base64, http(s) as url). `max_completion_tokens` or `max_tokens` (default 1024),
    `temperature` clamped from OpenAI's 0..2 to Anthropic's 0..1, `top_p`, `stop` -> `stop_sequences`,
    function `tools`, `tool_choice`, `parallel_tool_calls: false`, `user` -> metadata.user_id. The model is
    `default_model` unless the body names a `claude-*` model. Raises errors.BadRequest with `param`."""
    if not isinstance(body, dict):
        raise errors.BadRequest("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise errors.BadRequest("messages must be a non-empty list", param="messages")
    system: list[str] = []
    out: list[dict] = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise errors.BadRequest("each message must be an object", param=p)
        role, content = m.get("role"), m.get("content")
        if role in ("system", "developer"):
            text = _text(content, p)
            if text:
                system.append(text)
            continue
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
                raise errors.BadRequest("a tool message needs its tool_call_id", param=f"{p}.tool_call_id")
            role, blocks = "user", [{"type": "tool_result", "tool_use_id": m["tool_call_id"],
                                     "content": _text(content, p)}]
        elif role == "assistant":
            blocks = _blocks(content, p)
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise errors.BadRequest("tool_calls must be a list", param=f"{p}.tool_calls")
            blocks += [_tool_use(c, f"{p}.tool_calls[{j}]") for j, c in enumerate(calls)]
        elif role == "user":
            blocks = _blocks(content, p)
        else:
            raise errors.BadRequest(f"unknown message role {role!r}", param=f"{p}.role")
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    if not out:
        raise errors.BadRequest("messages need at least one non-empty user or assistant message", param="messages")

    model = body.get("model")
    if isinstance(model, str) and model.startswith("claude-"):
        if not _MODEL_NAME.fullmatch(model):
            raise errors.BadRequest(f"invalid model name {model!r}", param="model")
    else:
        model = default_model
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise errors.BadRequest(f"{name} must be an integer >= 1", param=name)
    req: dict[str, Any] = {"model": model, "messages": out, "max_tokens": max_tokens}
    if system:
        req["system"] = "\n\n".join(system)
    temperature = _number(body, "temperature", 0, 2)
    if temperature is not None:
        req["temperature"] = min(1.0, temperature)
    top_p = _number(body, "top_p", 0, 1)
    if top_p is not None:
        req["top_p"] = top_p
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise errors.BadRequest("stop must be a string or a list of strings", param="stop")
        if any(s for s in stop):
            req["stop_sequences"] = [s for s in stop if s]
    n = body.get("n")
    if n is not None and n != 1:
        raise errors.BadRequest("the cloud model answers with one choice (n = 1)", param="n")
    if body.get("tools"):
        req["tools"] = _tools(body["tools"])
        choice = _tool_choice(body["tool_choice"]) if body.get("tool_choice") is not None else None
        if body.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if choice is not None:
            req["tool_choice"] = choice
    if isinstance(body.get("user"), str) and body["user"]:
        req["metadata"] = {"user_id": body["user"]}
    return req


# ---- Anthropic -> OpenAI ----------------------------------------------------------------------------------
def _usage(u: dict | None) -> dict:
    u = u or {}
    prompt = sum(u.get(k) or 0 for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    completion = u.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(stop_reason: str | None) -> str:
    return _STOP.get(stop_reason or "", "stop")


def from_message(msg: dict, model: str) -> dict:
    """An Anthropic message as an OpenAI chat.completion: text blocks joined into `content`, tool_use blocks
    as `tool_calls` (arguments a JSON string), the stop reason as `finish_reason`, usage renamed."""
    blocks = [b for b in msg.get("content") or [] if isinstance(b, dict)]
    text = "".join(b.get("text") or "" for b in blocks if b.get("type") == "text")
    calls = [{"id": b.get("id"), "type": "function",
              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input") or {})}}
             for b in blocks if b.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": msg.get("model") or model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(msg.get("stop_reason"))}],
            "usage": _usage(msg.get("usage"))}


class _Chunker:
    """Makes the chunks of one streamed answer: one id, one created time, one model."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.model = model
        self.created = int(time.time())

    def make(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model}
        if usage is not None:               # OpenAI's include_usage chunk: no choices, the usage
            chunk["choices"] = []
            chunk["usage"] = usage
        else:
            chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return chunk


def translate_events(events: Iterable[dict], chunk: _Chunker, include_usage: bool) -> Iterator[dict]:
    """Anthropic stream events (as dicts) -> OpenAI chunks: a role chunk at message_start, text deltas as
    content, each tool_use block as a tool_calls chunk with id and name followed by argument deltas, the
    finish reason at message_delta, then a usage chunk when the request asked for one."""
    tool_index: dict[int, int] = {}
    usage: dict = {}
    finished = False
    for ev in events:
        kind = ev.get("type")
        if kind == "message_start":
            usage.update((ev.get("message") or {}).get("usage") or {})
            yield chunk.make({"role": "assistant", "content": ""})
        elif kind == "content_block_start":
            block = ev.get("content_block") or {}
            if block.get("type") == "tool_use":
                tool_index[ev.get("index", 0)] = i = len(tool_index)
                yield chunk.make({"tool_calls": [{"index": i, "id": block.get("id"), "type": "function",
                                                  "function": {"name": block.get("name"), "arguments": ""}}]})
            elif block.get("type") == "text" and block.get("text"):
                yield chunk.make({"content": block["text"]})
        elif kind == "content_block_delta":
            d = ev.get("delta") or {}
            if d.get("type") == "text_delta":
                yield chunk.make({"content": d.get("text", "")})
            elif d.get("type") == "input_json_delta" and ev.get("index", 0) in tool_index:
                yield chunk.make({"tool_calls": [{"index": tool_index[ev.get("index", 0)],
                                                  "function": {"arguments": d.get("partial_json", "")}}]})
        elif kind == "message_delta":
            usage.update({k: v for k, v in (ev.get("usage") or {}).items() if v is not None})
            finished = True
            yield chunk.make({}, finish=finish_reason((ev.get("delta") or {}).get("stop_reason")))
        elif kind == "error":
            err = ev.get("error") or {}
            raise errors.BadGateway(f"Anthropic stream error: {err.get('type')}: {err.get('message')}")
    if not finished:
        raise errors.BadGateway("the Anthropic stream ended before its last event")
    if include_usage:
        yield chunk.make({}, usage=_usage(usage))


# ---- the CLI's one prompt -----------------------------------------------------------------------------------
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
