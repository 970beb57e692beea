"""Ollama's native API <-> OpenAI's: requests to /v1/chat/completions or /v1/completions bodies, answers (whole
or streamed chunks) back to Ollama's shapes. Pure functions and one accumulator; api_ollama.py serves them.

/api/chat and /api/generate become chat requests (generate's prompt is one user turn after its `system`, as
Ollama's own template makes it); a generate with `raw` or `suffix` goes to /v1/completions as written.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from sluice import errors
from sluice.jobs import answered, bool_field, int_field, num_field, show
from sluice.translate import first_choice

_ROLES = ("system", "user", "assistant", "tool")
_IMAGE_TYPES = (("/9j/", "image/jpeg"), ("iVBOR", "image/png"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp"))
_DONE = {"tool_calls": "stop", "function_call": "stop", "content_filter": "stop", None: "stop"}
DETAILS = {"parent_model": "", "format": "", "family": "", "families": None, "parameter_size": "",
            "quantization_level": ""}


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def bad(message: str, param: str | None = None) -> errors.BadRequest:
    return errors.BadRequest(message, param=param)


def _status_error(status: int, message: str) -> errors.SluiceError:
    """An error with the backend's own 4xx status (Ollama clients show the status and the message)."""
    err = errors.SluiceError(message)
    err.status = status
    return err


# ---- Ollama request -> OpenAI request ---------------------------------------------------------------------
def options(body: dict, max_tokens: int) -> dict:
    """Ollama's `options` as OpenAI sampling fields; options with no OpenAI meaning (num_ctx, mirostat, ...)
    are ignored, as Ollama ignores options a model does not take."""
    opts = body.get("options")
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise bad(f"options must be an object, got {show(opts)}", "options")
    try:
        out = {"temperature": num_field(opts, "temperature", 0, 2), "top_p": num_field(opts, "top_p", 0, 1),
               "top_k": int_field(opts, "top_k", 0, 1 << 20),
               "seed": int_field(opts, "seed", -(1 << 63), (1 << 63) - 1),
               "presence_penalty": num_field(opts, "presence_penalty", -2, 2),
               "frequency_penalty": num_field(opts, "frequency_penalty", -2, 2)}
        predict = int_field(opts, "num_predict", -2, max_tokens)
    except errors.BadRequest as e:
        raise bad(f"options.{e.message}", f"options.{e.param}") from None
    if predict is not None and predict > 0:          # -1 (no limit) and -2 (fill the context): the backend's own
        out["max_tokens"] = predict
    elif predict == 0:
        raise bad("options.num_predict must be -1, -2 or a positive number of tokens", "options.num_predict")
    stop = opts.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("options.stop must be a string or a list of strings", "options.stop")
        out["stop"] = stop
    if out["seed"] is not None and out["seed"] < 0:  # Ollama's -1: a random seed, which is the backend's default
        out["seed"] = None
    return {k: v for k, v in out.items() if v is not None}


def _format(body: dict) -> dict:
    fmt = body.get("format")
    if fmt in (None, ""):
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}}
    raise bad(f'format must be "json" or a JSON schema object, got {show(fmt)}', "format")


def _image_part(image, param: str) -> dict:
    if not isinstance(image, str) or not image:
        raise bad(f"{param} must be a base64-encoded image (a non-empty string)", param)
    if image.startswith("data:"):
        return {"type": "image_url", "image_url": {"url": image}}
    mime = next((t for prefix, t in _IMAGE_TYPES if image.startswith(prefix)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{image}"}}


def _content(m: dict, key: str, param: str):
    """`m[key]` (the text) with `m["images"]`: a string, or OpenAI content parts (text first)."""
    text = m.get(key)
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise bad(f"{param}{key} must be a string, got {show(text)}", f"{param}{key}")
    images = m.get("images")
    if images is None or images == []:
        return text
    if not isinstance(images, list):
        raise bad(f"{param}images must be a list of base64-encoded images", f"{param}images")
    parts = [_image_part(x, f"{param}images[{i}]") for i, x in enumerate(images)]
    text_part = [{"type": "text", "text": text}] if text else []
    keys = list(m)
    text_first = key in m and keys.index(key) < keys.index("images")
    return text_part + parts if text_first else parts + text_part


def _tool_calls(calls, param: str, turn: int) -> list[tuple[str, str, dict]]:
    if not isinstance(calls, list):
        raise bad(f"{param}.tool_calls must be a list", f"{param}.tool_calls")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or not name:
            raise bad(f"{param}.tool_calls[{j}].function.name must be a non-empty string",
                       f"{param}.tool_calls[{j}]")
        args = f.get("arguments", {})
        if isinstance(args, str):         # some clients send the JSON text, as OpenAI does
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise bad(f"{param}.tool_calls[{j}].function.arguments must be an object "
                       "(or its JSON text)", f"{param}.tool_calls[{j}]")
        out.append((f"call_{turn}_{j}", name, {"id": f"call_{turn}_{j}", "type": "function",
                                               "function": {"name": name, "arguments": json.dumps(args)}}))
    return out


def _messages(msgs) -> list[dict]:
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise bad("messages must be a list of message objects", "messages")
    out, pending = [], []             # pending: (id, name) of the last assistant turn's unanswered tool calls
    for i, m in enumerate(msgs):
        param = f"messages[{i}]"
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"{param}.role must be one of {', '.join(_ROLES)}, got {show(role)}", f"{param}.role")
        msg = {"role": role, "content": _content(m, "content", param + ".")}
        if role == "assistant" and m.get("tool_calls"):
            calls = _tool_calls(m["tool_calls"], param, i)
            msg["tool_calls"] = [c[2] for c in calls]
            pending = [(c[0], c[1]) for c in calls]
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            pick = next((c for c in pending if c[1] == name), pending[0] if pending else None)
            if pick is not None:
                pending.remove(pick)
            msg["tool_call_id"] = pick[0] if pick else f"call_{name or i}"
        out.append(msg)
    return out


def _tools(body: dict) -> dict:
    tools = body.get("tools")
    if tools is None or tools == []:
        return {}
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              for t in tools):
        raise bad('tools must be a list of {"type": "function", "function": {...}} objects', "tools")
    return {"tools": [{"type": "function", **t} for t in tools]}


def _string(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad(f"{name} must be a string, got {show(v)}", name)
    return v


# ---- OpenAI answer -> Ollama answer -----------------------------------------------------------------------
class Answer:
    """One answer in Ollama's shape, built from an OpenAI chat.completion / completion, whole or in chunks.

    Durations: load_duration is the time queued in sluice (a model switch included), prompt_eval_duration
    from the grant to the first token (0 when not streamed), eval_duration from then to the end."""

    def __init__(self, kind: str, model: str, t0: float):
        self.kind, self.model, self.t0 = kind, model, t0
        self.t_grant = self.t_first = None
        self.finish = None
        self.usage: dict | None = None
        self.chunks = 0
        self.calls: dict[int, dict] = {}     # streamed tool calls by index: name, argument text

    def line(self, content: str = "", thinking: str | None = None, tool_calls: list | None = None,
             done: bool = False) -> dict:
        out = {"model": self.model, "created_at": now()}
        if self.kind == "chat":
            msg = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if tool_calls:
                msg["tool_calls"] = tool_calls
            out["message"] = msg
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        out["done"] = done
        return out

    def _note(self, choice: dict, usage) -> None:
        if isinstance(usage, dict):
            self.usage = usage
        if isinstance(choice, dict) and choice.get("finish_reason"):
            self.finish = choice["finish_reason"]

    def whole(self, obj: dict) -> dict:
        """The non-streamed answer."""
        choice, msg = first_choice(obj, "message")
        self._note(choice, obj.get("usage"))
        text = (msg.get("content") if msg else choice.get("text")) or ""
        calls = [_ollama_call(c.get("function")) for c in msg.get("tool_calls") or [] if isinstance(c, dict)]
        self.t_first = self.t_grant
        self.chunks = 1 if text else 0
        return {**self.line(text, msg.get("reasoning_content") or msg.get("reasoning"), calls, True), **self.stats()}

    def chunk(self, obj: dict) -> dict | None:
        """One streamed chunk as a line to send, or None when it carries nothing to show yet."""
        choice, delta = first_choice(obj, "delta")
        self._note(choice, obj.get("usage"))
        text = (delta.get("content") if delta else choice.get("text")) or ""
        thinking = delta.get("reasoning_content") or delta.get("reasoning")
        for c in delta.get("tool_calls") or []:
            if isinstance(c, dict):
                call = self.calls.setdefault(c.get("index", len(self.calls)), {"name": "", "arguments": ""})
                f = c.get("function") or {}
                call["name"] += f.get("name") or ""
                call["arguments"] += f.get("arguments") or ""
        if not text and not thinking:
            return None
        if self.t_first is None:
            self.t_first = time.monotonic()
        self.chunks += 1
        return self.line(text, thinking)

    def tail(self) -> list[dict]:
        """The stream's last lines: the tool calls (Ollama sends them whole), then the `done` line."""
        calls = [_ollama_call(c) for _, c in sorted(self.calls.items())]
        head = [self.line(tool_calls=calls)] if calls else []
        return head + [{**self.line(done=True), **self.stats()}]

    def stats(self) -> dict:
        end = time.monotonic()
        grant = self.t_grant if self.t_grant is not None else end
        first = self.t_first if self.t_first is not None else grant
        u = self.usage or {}
        out = {"done_reason": _DONE.get(self.finish, self.finish), "total_duration": ns(end - self.t0),
               "load_duration": ns(grant - self.t0)}
        if isinstance(u.get("prompt_tokens"), int):
            out["prompt_eval_count"] = u["prompt_tokens"]
        out["prompt_eval_duration"] = ns(first - grant) if self.t_first is not None and first > grant else 0
        count = u.get("completion_tokens")
        out["eval_count"] = count if isinstance(count, int) else self.chunks
        out["eval_duration"] = ns(end - first)
        return out


def _ollama_call(f) -> dict:
    f = f if isinstance(f, dict) else {}
    args = f.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            args = {"arguments": args}      # a model's broken JSON: kept, not lost
    return {"function": {"name": f.get("name") or "", "arguments": args if isinstance(args, dict) else {}}}


def request(body: dict, kind: str) -> tuple[dict | None, str]:
    """The OpenAI body for a /api/chat or /api/generate body (model still to fill in, options apart) and the
    backend path; None when there is nothing to answer (no prompt: Ollama's "load the model" call)."""
    if kind == "chat":
        msgs = body.get("messages")
        if msgs is None or msgs == []:
            return None, ""
        return {"messages": _messages(msgs), **_tools(body), **_format(body)}, "/chat/completions"
    prompt, system, suffix = _string(body, "prompt"), _string(body, "system"), _string(body, "suffix")
    raw = bool_field(body, "raw", False)
    if not prompt and not body.get("images"):
        return None, ""
    if raw or suffix is not None:
        if body.get("images"):
            raise bad("images need the chat template: drop raw and suffix to send them", "images")
        out = {"prompt": prompt or ""}
        if suffix is not None:
            out["suffix"] = suffix
        return {**out, **_format(body)}, "/completions"
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": _content(body, "prompt", "")})
    return {"messages": msgs, **_format(body)}, "/chat/completions"


def upstream_error(backend: str, status: int, data: bytes) -> errors.SluiceError:
    """A backend's error: its 4xx passed on with its message (Ollama clients show it), 5xx as 502."""
    text = data[:300].decode("utf-8", "replace")
    try:
        obj = json.loads(data)
        err = obj.get("error") if isinstance(obj, dict) else None
        text = (err.get("message") if isinstance(err, dict) else err) or text
    except ValueError:
        pass
    if status >= 500 or status < 400:
        return errors.BadGateway(answered(backend, status, text))
    return _status_error(status, answered(backend, status, text))
