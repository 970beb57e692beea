"""OpenAI chat.completions <-> Anthropic Messages: the helpers both directions share, and the /v1/messages
ingress on local backends (sluice/api_anthropic.py), Anthropic -> OpenAI: `to_chat` (request), `to_message`
(answer); its stream is translate_stream.py's `MessagesStream`.
The cloud route's direction, OpenAI -> Anthropic (`to_messages`, `from_message`), is in translate_cloud.py;
its stream is translate_stream.py's `translate_events`.

Pure functions over dicts; bad input raises errors.BadRequest naming the field (`param`).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from sluice import errors

_STOP = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
         "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
CLAUDE_MODEL = re.compile(r"claude-[A-Za-z0-9._:@\[\]-]+")   # goes to Anthropic when no local model has it


# ---- shared by both directions ----------------------------------------------------------------------------
def number(body: dict, name: str, lo: float, hi: float | None) -> float | None:
    """body[name] as a float within lo..hi (hi None: no upper bound), None when absent; else BadRequest."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise errors.BadRequest(f"{name} must be a number", param=name)
    if v < lo or (hi is not None and v > hi):
        raise errors.BadRequest(f"{name} must be between {lo:g} and {hi:g}, got {v}", param=name)
    return float(v)


def openai_usage(u: dict | None) -> dict:
    """Anthropic usage as OpenAI's (cache reads and writes count as prompt tokens)."""
    u = u or {}
    prompt = sum(u.get(k) or 0 for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    completion = u.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(stop_reason: str | None) -> str:
    return _STOP.get(stop_reason or "", "stop")


def message_usage(u: dict | None) -> dict:
    u = u if isinstance(u, dict) else {}
    return {"input_tokens": u.get("prompt_tokens") or 0, "output_tokens": u.get("completion_tokens") or 0}


def random_id(prefix: str) -> str:
    """An id of the shape the APIs' own servers give (`msg_`, `toolu_`, `chatcmpl-`, `resp_` + 24 hex digits)."""
    return prefix + uuid.uuid4().hex[:24]


def new_message_id() -> str:
    return random_id("msg_")


def tool_id() -> str:
    return random_id("toolu_")


def first_choice(obj: dict, part: str) -> tuple[dict, dict]:
    """A chat.completion's (or chunk's) first choice and its `part` ("message", "delta"); {} for what is missing."""
    choices = obj.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    return choice, choice.get(part) if isinstance(choice.get(part), dict) else {}


def reply_text(msg: dict):
    """A chat answer message's content, its parts joined when it came as a list of them."""
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content


# ---- Anthropic Messages -> OpenAI (the /v1/messages ingress on local backends) -----------------------------------
_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
           "content_filter": "refusal"}
_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}


def _image_url(block: dict, param: str) -> dict:
    """An Anthropic image block as an OpenAI image_url part: base64 sources as a data: URL, url sources as is."""
    src = block.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    if kind == "base64" and isinstance(src.get("data"), str) and src["data"] \
            and isinstance(src.get("media_type"), str) and src["media_type"]:
        return {"type": "image_url", "image_url": {"url": f"data:{src['media_type']};base64,{src['data']}"}}
    if kind == "url" and isinstance(src.get("url"), str) and src["url"].startswith(("http://", "https://")):
        return {"type": "image_url", "image_url": {"url": src["url"]}}
    raise errors.BadRequest("an image block needs source {\"type\": \"base64\", \"media_type\": ..., \"data\": ...} "
                            "or {\"type\": \"url\", \"url\": \"https://...\"}", param=f"{param}.source")


def _block_list(content, param: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise errors.BadRequest("content must be a string or a list of content blocks", param=param)
    for j, b in enumerate(content):
        if b.get("type") == "text" and not isinstance(b.get("text"), str):
            raise errors.BadRequest("a text block needs a string `text`", param=f"{param}[{j}].text")
    return content


def _system(system, param: str = "system") -> str | None:
    if system is None:
        return None
    blocks = _block_list(system, param)
    if any(b.get("type") != "text" for b in blocks):
        raise errors.BadRequest("system must be a string or a list of text blocks", param=param)
    return "\n\n".join(b["text"] for b in blocks) if isinstance(system, list) else system


def _tool_result(block: dict, param: str) -> tuple[dict, list[dict]]:
    """A tool_result block as an OpenAI tool message, plus the image parts it carried (OpenAI's tool messages
    are text only: those go in a user message right after)."""
    if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
        raise errors.BadRequest("a tool_result block needs its tool_use_id", param=f"{param}.tool_use_id")
    content, images = block.get("content"), []
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for k, b in enumerate(_block_list(content, f"{param}.content")):
            if b.get("type") == "text":
                texts.append(b["text"])
            elif b.get("type") == "image":
                images.append(_image_url(b, f"{param}.content[{k}]"))
            else:
                raise errors.BadRequest(f"a tool_result may hold text and image blocks, not {b.get('type')!r}",
                                        param=f"{param}.content[{k}]")
        text = "\n".join(texts)
    if block.get("is_error") is True:
        text = "Error: " + text           # OpenAI has no error flag on tool results: the model reads it here
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}, images


def _user(content, param: str) -> list[dict]:
    """One Anthropic user turn as OpenAI messages: its tool_results first (as `tool` messages, which must
    follow the assistant's tool_calls), then a user message with its text and image parts."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools, parts = [], []
    for j, b in enumerate(_block_list(content, param)):
        p, kind = f"{param}[{j}]", b.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            parts.append(_image_url(b, p))
        elif kind == "tool_result":
            msg, images = _tool_result(b, p)
            tools.append(msg)
            parts.extend(images)
        else:
            raise errors.BadRequest(f"content block type {kind!r} is not supported by local models "
                                    "(text, image, tool_use, tool_result are)", param=f"{p}.type")
    return tools + ([{"role": "user", "content": parts}] if parts else [])


def _assistant(content, param: str) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, calls = [], []
    for j, b in enumerate(_block_list(content, param)):
        p, kind = f"{param}[{j}]", b.get("type")
        if kind == "text":
            texts.append(b["text"])
        elif kind == "tool_use":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or not b["name"]:
                raise errors.BadRequest("a tool_use block needs an `id` and a `name`", param=p)
            if not isinstance(b.get("input"), dict):
                raise errors.BadRequest("a tool_use block's input must be an object", param=f"{p}.input")
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b["input"])}})
        elif kind not in ("thinking", "redacted_thinking"):    # the model's own reasoning: not replayed
            raise errors.BadRequest(f"content block type {kind!r} is not supported in an assistant turn "
                                    "(text, tool_use are)", param=f"{p}.type")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _chat_tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise errors.BadRequest("tools must be a list", param="tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") not in (None, "custom") \
                or not isinstance(t.get("name"), str) or not t["name"]:
            kind = t.get("type") if isinstance(t, dict) else None
            raise errors.BadRequest("each tool must be a client tool {\"name\": ..., \"input_schema\": {...}}"
                                    + (f"; server tool {kind!r} is not available on local models" if kind else ""),
                                    param=f"tools[{i}]")
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise errors.BadRequest("a tool's input_schema must be a JSON Schema object",
                                    param=f"tools[{i}].input_schema")
        fn = {"name": t["name"], "parameters": schema}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice) -> tuple[Any, bool]:
    """(OpenAI tool_choice, parallel tool calls allowed)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = not (isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True)
    if kind in _TOOL_CHOICE:
        return _TOOL_CHOICE[kind], parallel
    if kind == "tool" and isinstance(choice.get("name"), str) and choice["name"]:
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise errors.BadRequest("tool_choice must be {\"type\": \"auto\" | \"any\" | \"none\"} or "
                            "{\"type\": \"tool\", \"name\": ...}", param="tool_choice")


def to_chat(body: dict, model: str) -> dict:
    """An Anthropic Messages request as an OpenAI chat.completions body for `model`.

    `system` (string or text blocks, joined by blank lines) -> a system message; user turns -> `tool` messages
    for their tool_result blocks (an image inside one follows in a user message) then a user message whose
    text/image blocks are parts (a string stays a string); assistant turns -> text joined into `content`,
    tool_use -> `tool_calls` (thinking blocks dropped); image sources base64/url -> image_url parts;
    `max_tokens`, `stop_sequences` -> `stop`, `temperature`/`top_p`/`top_k` as they are; `tools`,
    `tool_choice` (any -> required, tool -> function, disable_parallel_tool_use -> parallel_tool_calls
    false); `stream` with usage asked for. `metadata`, `thinking`, `service_tier` are ignored. A `system`
    message among the turns (Claude Code sends them) joins the system message at the start.
    Raises errors.BadRequest with `param`."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise errors.BadRequest("messages must be a non-empty list", param="messages")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise errors.BadRequest("max_tokens is required: an integer >= 1", param="max_tokens")
    out: list[dict] = []
    system = [_system(body.get("system"))]
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise errors.BadRequest("each message must be {\"role\": \"user\" | \"assistant\", \"content\": ...}",
                                    param=f"{p}.role")
        if m["role"] == "user":
            out.extend(_user(m.get("content"), f"{p}.content"))
        elif m["role"] == "assistant":
            out.append(_assistant(m.get("content"), f"{p}.content"))
        else:     # Claude Code's mid-conversation system text: many chat templates allow a system message first only
            system.append(_system(m.get("content"), f"{p}.content"))
    if any(system):
        out.insert(0, {"role": "system", "content": "\n\n".join(t for t in system if t)})
    req: dict[str, Any] = {"model": model, "messages": out, "max_tokens": max_tokens}
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise errors.BadRequest("stop_sequences must be a list of strings", param="stop_sequences")
        if stop:
            req["stop"] = list(stop)
    for name, hi in (("temperature", 1), ("top_p", 1)):
        if number(body, name, 0, hi) is not None:
            req[name] = body[name]
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise errors.BadRequest(f"top_k must be an integer >= 0, got {top_k!r}"[:80], param="top_k")
        req["top_k"] = top_k
    if body.get("tools"):
        req["tools"] = _chat_tools(body["tools"])
    if body.get("tool_choice") is not None:
        choice, parallel = _chat_tool_choice(body["tool_choice"])
        if "tools" in req or choice == "none":
            req["tool_choice"] = choice
            if not parallel:
                req["parallel_tool_calls"] = False
    if body.get("stream") is True:
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return req


def stop_reason(finish: str | None, choice: dict, stop_sequences: list | None, tools: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for an OpenAI finish. A stop at a stop sequence is told apart from the end
    of the turn where the backend says which one matched (vLLM `stop_reason`, SGLang `matched_stop`)."""
    matched = choice.get("stop_reason", choice.get("matched_stop"))
    if finish == "stop" and isinstance(matched, str) and stop_sequences and matched in stop_sequences:
        return "stop_sequence", matched
    if tools and finish in (None, "stop"):
        return "tool_use", None
    return _FINISH.get(finish or "stop", "end_turn"), None


def tool_input(arguments) -> dict:
    """Tool arguments (a JSON string, or already an object) as an Anthropic `input` object; what is not a JSON
    object is kept whole under "_raw" rather than lost."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        value = None
    return value if isinstance(value, dict) else {"_raw": arguments}


def to_message(obj: dict, model: str, stop_sequences: list | None = None) -> dict:
    """An OpenAI chat.completion as an Anthropic message naming `model`: the text as one text block, then a
    tool_use block per tool call (arguments parsed), the finish as stop_reason, usage renamed."""
    choice, msg = first_choice(obj, "message")
    content = reply_text(msg)
    blocks: list[dict] = [{"type": "text", "text": content}] if isinstance(content, str) and content else []
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            blocks.append({"type": "tool_use", "id": call.get("id") or tool_id(), "name": fn["name"],
                           "input": tool_input(fn.get("arguments"))})
    tools = any(b["type"] == "tool_use" for b in blocks)
    reason, seq = stop_reason(choice.get("finish_reason"), choice, stop_sequences, tools)
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model,
            "content": blocks or [{"type": "text", "text": ""}], "stop_reason": reason, "stop_sequence": seq,
            "usage": message_usage(obj.get("usage"))}
