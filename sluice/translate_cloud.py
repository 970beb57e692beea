"""OpenAI chat.completions -> Anthropic Messages, the cloud route's request and answer (sluice/cloud.py):
`to_messages` (request), `from_message` (answer); its stream is translate_stream.py's `translate_events`. The
helpers both directions share (ids, usage, stop reasons, number checks) are in translate.py.

Pure functions over dicts; bad input raises errors.BadRequest naming the field (`param`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from sluice import errors
from sluice.translate import CLAUDE_MODEL, finish_reason, number, openai_usage, random_id

DEFAULT_MAX_TOKENS = 1024            # Anthropic requires max_tokens; OpenAI bodies often leave it out


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
        if not CLAUDE_MODEL.fullmatch(model):
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
    temperature = number(body, "temperature", 0, 2)
    if temperature is not None:
        req["temperature"] = min(1.0, temperature)
    top_p = number(body, "top_p", 0, 1)
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
    return {"id": random_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
            "model": msg.get("model") or model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(msg.get("stop_reason"))}],
            "usage": openai_usage(msg.get("usage"))}
