"""The Anthropic route for `model: "cloud"`: no gate, its own concurrency limit.

Uses the `anthropic` SDK when it is importable and ANTHROPIC_API_KEY is set (`pip install
'sluice-llm[cloud]'`), else the `claude` CLI (client text only ever after `--`), else a 503 that says how
to enable it. OpenAI chat requests are translated to the Messages API and back, streaming included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from typing import Any, Iterator, Mapping

from sluice import errors

DEFAULT_MAX_TOKENS = 1024
_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


class Cloud:
    def __init__(self, model: str = "claude-sonnet-4-6", concurrency: int = 4, timeout_s: float = 300.0,
                 claude_bin: str = "claude", environ: Mapping[str, str] | None = None):
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.claude_bin = claude_bin
        self._env = os.environ if environ is None else environ
        self._permits = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._inflight = 0
        self._client = None

    # ---- state ---------------------------------------------------------------------------------------
    def mode(self) -> str:
        if self._env.get("ANTHROPIC_API_KEY") and _sdk() is not None:
            return "api"
        if self._cli_path():
            return "cli"
        return "unavailable"

    def info(self) -> dict:
        return {"mode": self.mode(), "model": self.model, "inflight": self._inflight,
                "concurrency": self.concurrency}

    def _cli_path(self) -> str | None:
        path = shutil.which(self.claude_bin, path=self._env.get("PATH"))
        return path or (self.claude_bin if os.path.isfile(self.claude_bin) and os.access(self.claude_bin, os.X_OK)
                        else None)

    def _unavailable(self) -> errors.Unavailable:
        return errors.Unavailable("the cloud model is not configured: pip install 'sluice-llm[cloud]' and set "
                                  "ANTHROPIC_API_KEY, or install the `claude` CLI (SLUICE_CLAUDE_BIN)")

    # ---- concurrency -------------------------------------------------------------------------------
    def _acquire(self, timeout: float) -> None:
        if not self._permits.acquire(timeout=timeout):
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
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        if system:
            body["messages"].insert(0, {"role": "system", "content": system})
        if temperature is not None:
            body["temperature"] = temperature
        return self.chat(body, timeout)["choices"][0]["message"]["content"] or ""

    def chat(self, body: dict, timeout: float) -> dict:
        mode = self.mode()
        if mode == "unavailable":
            raise self._unavailable()
        request = to_messages(body, self.model)
        self._acquire(timeout)
        try:
            if mode == "api":
                msg = self._call(lambda c: c.messages.create(**_sdk_kwargs(c, request), timeout=timeout))
                return from_message(_as_dict(msg), request["model"])
            text = self._cli(request, timeout)
            return from_message({"content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                 "usage": {}}, request["model"])
        finally:
            self._release()

    def chat_stream(self, body: dict, timeout: float) -> Iterator[dict]:
        """OpenAI chunk dicts. A generator: the permit is held until it is exhausted or closed."""
        mode = self.mode()
        if mode == "unavailable":
            raise self._unavailable()
        request = to_messages(body, self.model)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self._acquire(timeout)
        return self._stream(mode, request, timeout, include_usage)

    def _stream(self, mode: str, request: dict, timeout: float, include_usage: bool) -> Iterator[dict]:
        try:
            chunk = _Chunker(request["model"])
            if mode == "cli":
                yield chunk.make({"role": "assistant", "content": self._cli(request, timeout)})
                yield chunk.make({}, finish="stop")
                return
            stream = self._call(lambda c: c.messages.create(**_sdk_kwargs(c, request), stream=True,
                                                            timeout=timeout))
            try:
                yield from translate_events((_as_dict(e) for e in stream), chunk, include_usage)
            except Exception as e:   # SDK errors raised while iterating
                raise _map_sdk_error(e) from None
            finally:
                close = getattr(stream, "close", None)
                if close:
                    close()
        finally:
            self._release()

    # ---- transports ----------------------------------------------------------------------------------
    def _call(self, fn):
        sdk = _sdk()
        if self._client is None:
            kw: dict[str, Any] = {"api_key": self._env.get("ANTHROPIC_API_KEY"), "max_retries": 0}
            if self._env.get("ANTHROPIC_BASE_URL"):
                kw["base_url"] = self._env["ANTHROPIC_BASE_URL"]
            self._client = sdk.Anthropic(**kw)
        try:
            return fn(self._client)
        except Exception as e:
            raise _map_sdk_error(e) from None

    def _cli(self, request: dict, timeout: float) -> str:
        argv = [self._cli_path() or self.claude_bin, "-p", "--model", request["model"]]
        if request.get("system"):
            argv += ["--system-prompt", request["system"]]   # our own field, before `--`
        argv += ["--", flatten(request["messages"])]          # client text: after `--`, never an option
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, shell=False)
        except subprocess.TimeoutExpired:
            raise errors.QueueTimeout(f"the claude CLI did not answer within {timeout:g}s") from None
        except OSError as e:
            raise errors.BadGateway(f"cannot run the claude CLI: {e}") from None
        if r.returncode != 0:
            raise errors.BadGateway(f"the claude CLI exited {r.returncode}: "
                                    f"{r.stderr[-300:].decode('utf-8', 'replace').strip()}")
        return r.stdout.decode("utf-8", "replace").strip()


def _sdk():
    try:
        import anthropic
    except ImportError:
        return None
    return anthropic


def _sdk_kwargs(client, request: dict) -> dict:
    """Request fields as SDK keyword arguments; fields this SDK version has no parameter for (newer
    releases dropped `temperature` and `top_p`) travel in `extra_body`, so the API still receives them."""
    import inspect
    known = set(inspect.signature(client.messages.create).parameters)
    kw = {k: v for k, v in request.items() if k in known}
    extra = {k: v for k, v in request.items() if k not in known}
    if extra:
        kw["extra_body"] = extra
    return kw


def _as_dict(obj) -> dict:
    return obj if isinstance(obj, dict) else obj.model_dump()


def _map_sdk_error(e: Exception) -> errors.SluiceError:
    if isinstance(e, errors.SluiceError):
        return e
    sdk = _sdk()
    status = getattr(e, "status_code", None)
    if sdk is not None and isinstance(e, sdk.APITimeoutError):
        return errors.QueueTimeout("Anthropic did not answer in time")
    if status in (401, 403):
        return errors.BadGateway(f"Anthropic refused the key ({status}); check ANTHROPIC_API_KEY")
    if status in (429, 529):
        return errors.Unavailable(f"Anthropic is rate limiting or overloaded ({status}); retry shortly",
                                  retry_after=5)
    if sdk is not None and isinstance(e, sdk.APIConnectionError):
        return errors.BadGateway(f"cannot reach Anthropic: {e}")
    return errors.BadGateway(f"Anthropic error{f' {status}' if status else ''}: {str(e)[:300]}")


# ---- OpenAI <-> Anthropic Messages ------------------------------------------------------------------------
def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _blocks(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    out = []
    for part in content or []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            out.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                out.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                out.append({"type": "image", "source": {"type": "url", "url": url}})
    return out


def to_messages(body: dict, default_model: str) -> dict:
    """An OpenAI chat.completions body as an Anthropic Messages request."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise errors.BadRequest("messages must be a non-empty list", param="messages")
    system, out = [], []
    for m in msgs:
        if not isinstance(m, dict):
            raise errors.BadRequest("each message must be an object", param="messages")
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(m.get("content")))
            continue
        if role == "tool":
            role, blocks = "user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id", ""),
                                     "content": _text_of(m.get("content"))}]
        elif role == "assistant":
            blocks = _blocks(m.get("content")) if m.get("content") else []
            for call in m.get("tool_calls") or []:
                fn = call.get("function", {})
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    args = {}
                blocks.append({"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""),
                               "input": args})
        elif role == "user":
            blocks = _blocks(m.get("content"))
        else:
            raise errors.BadRequest(f"unknown message role {role!r}", param="messages")
        if out and out[-1]["role"] == role:          # Anthropic wants alternating roles: merge
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    model = body.get("model")
    req: dict[str, Any] = {"model": model if isinstance(model, str) and model.startswith("claude-") else default_model,
                           "messages": out,
                           "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
                           or DEFAULT_MAX_TOKENS}
    if system:
        req["system"] = "\n\n".join(system)
    if body.get("temperature") is not None:
        req["temperature"] = min(1.0, max(0.0, float(body["temperature"])))
    if body.get("top_p") is not None:
        req["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        req["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("tools"):
        req["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                         "input_schema": t["function"].get("parameters") or {"type": "object"}}
                        for t in body["tools"] if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice")
    if choice == "auto":
        req["tool_choice"] = {"type": "auto"}
    elif choice == "required":
        req["tool_choice"] = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("function"):
        req["tool_choice"] = {"type": "tool", "name": choice["function"].get("name")}
    return req


def from_message(msg: dict, model: str) -> dict:
    """An Anthropic message as an OpenAI chat.completion."""
    text = "".join(b.get("text", "") for b in msg.get("content", []) if b.get("type") == "text")
    calls = [{"id": b.get("id"), "type": "function",
              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input") or {})}}
             for b in msg.get("content", []) if b.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    u = msg.get("usage") or {}
    pt, ct = u.get("input_tokens", 0) or 0, u.get("output_tokens", 0) or 0
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": msg.get("model", model),
            "choices": [{"index": 0, "message": message, "finish_reason": _STOP.get(msg.get("stop_reason"), "stop")}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


class _Chunker:
    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.model = model
        self.created = int(time.time())

    def make(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            chunk["usage"] = usage
        return chunk


def translate_events(events, chunk: _Chunker, include_usage: bool) -> Iterator[dict]:
    """Anthropic stream events -> OpenAI chunks: text deltas, tool calls (id/name, then argument deltas),
    the finish reason, and a usage chunk when the request asked for one."""
    tool_index: dict[int, int] = {}
    usage = {"input_tokens": 0, "output_tokens": 0}
    for ev in events:
        kind = ev.get("type")
        if kind == "message_start":
            usage.update({k: v for k, v in (ev.get("message", {}).get("usage") or {}).items() if isinstance(v, int)})
            yield chunk.make({"role": "assistant", "content": ""})
        elif kind == "content_block_start" and ev.get("content_block", {}).get("type") == "tool_use":
            block = ev["content_block"]
            tool_index[ev.get("index", 0)] = i = len(tool_index)
            yield chunk.make({"tool_calls": [{"index": i, "id": block.get("id"), "type": "function",
                                              "function": {"name": block.get("name"), "arguments": ""}}]})
        elif kind == "content_block_delta":
            d = ev.get("delta", {})
            if d.get("type") == "text_delta":
                yield chunk.make({"content": d.get("text", "")})
            elif d.get("type") == "input_json_delta":
                yield chunk.make({"tool_calls": [{"index": tool_index.get(ev.get("index", 0), 0),
                                                  "function": {"arguments": d.get("partial_json", "")}}]})
        elif kind == "message_delta":
            usage.update({k: v for k, v in (ev.get("usage") or {}).items() if isinstance(v, int)})
            yield chunk.make({}, finish=_STOP.get(ev.get("delta", {}).get("stop_reason"), "stop"))
        elif kind == "error":
            raise errors.BadGateway(f"Anthropic stream error: {ev.get('error')}")
    if include_usage:
        pt, ct = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
        yield chunk.make({}, usage={"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct})


def flatten(messages: list[dict]) -> str:
    """Messages as one CLI prompt: `User: ...` / `Assistant: ...` turns separated by blank lines."""
    turns = []
    for m in messages:
        text = "".join(b.get("text", "") for b in m["content"] if b.get("type") == "text") or \
               "".join(str(b.get("content", "")) for b in m["content"] if b.get("type") == "tool_result")
        turns.append(f"{m['role'].capitalize()}: {text}" if len(messages) > 1 else text)
    return "\n\n".join(turns)
