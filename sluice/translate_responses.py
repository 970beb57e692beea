"""OpenAI Responses <-> chat.completions, for POST /v1/responses on backends that speak only chat completions
(mlx_lm.server): `to_chat` (request), `to_response` (answer), `ResponsesStream` (chat chunks -> Responses
events). Pure functions over dicts; bad input raises errors.BadRequest naming the field (`param`).

What translation cannot do, it refuses with a 400 that names the field, rather than quietly doing something
else: sluice keeps no responses, so `previous_response_id`, `conversation`, `item_reference` input items,
`background: true` and stored `prompt` templates have nothing to refer to. `store` defaults to true on
OpenAI's side, but the SDKs send it only when the caller sets it: an absent `store` or `store: false` is
accepted (nothing is stored either way), an explicit `store: true` is refused, because that caller means to
fetch the answer or continue from it later and would otherwise find out only then.

Function tools are translated, and so are the function tools of a `namespace` tool (under their own names;
a call comes back naming its namespace). Hosted tools (web_search, file_search, code_interpreter, ...) are
left out, since nothing local can run them: Codex sends web_search with every request, and refusing it
would refuse Codex (the answer names them in X-Sluice-Tools-Left-Out). A `tool_choice` that forces a
hosted tool, and `custom` (freeform) tools, are refused. `reasoning`, `include`, `metadata`, `truncation`,
`user` and the like are accepted and ignored; so are `reasoning` input items (a past turn's). Reasoning text
a backend returns is not passed on (Responses reasoning items are opaque summaries; chat backends give raw
text).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from sluice import errors
from sluice.translate import first_choice, random_id, reply_text
from sluice.translate_stream import ChunkStream, sse, tool_arguments

_STORED = {"previous_response_id": "send the whole conversation in `input` instead",
           "conversation": "send the whole conversation in `input` instead",
           "prompt": "send the prompt's text as `instructions` and `input` instead"}
# Tool types translation handles (custom tools are refused); any other type is a hosted tool, left out.
_LOCAL_TOOLS = ("function", "namespace", "custom")
_TOOL_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _bad(msg: str, param: str) -> errors.BadRequest:
    return errors.BadRequest(msg, param=param)


def refuse_stored(body: dict) -> None:
    """The 400 for what needs responses stored server-side (see the module docstring)."""
    for name, instead in _STORED.items():
        if body.get(name) is not None:
            raise _bad(f"{name} is not supported: sluice stores no responses or prompts; {instead}", name)
    if body.get("store") is True:
        raise _bad("store: true is not supported: sluice stores no responses; leave store out or set it to "
                   "false, and send the whole conversation in `input`", "store")
    if body.get("background") is True:
        raise _bad("background: true is not supported: sluice stores no responses to poll; leave it out",
                   "background")


def _parts(content, param: str, role: str) -> str | list[dict]:
    """Message content as chat content: a string stays a string; input_text/output_text parts -> text parts,
    input_image -> image_url parts (user turns only). Assistant and system turns get their text joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("content must be a string or a list of content parts", param)
    out: list[dict] = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise _bad(f"a {kind} part needs a string `{'refusal' if kind == 'refusal' else 'text'}`", p)
            out.append({"type": "text", "text": text})
        elif kind == "input_image":
            if role != "user":
                raise _bad("images go in user messages", p)
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:")):
                raise _bad("an input_image needs `image_url`: an http(s) or data: URL (file_id is not "
                           "supported: sluice stores no files)", p)
            image: dict[str, Any] = {"url": url}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            out.append({"type": "image_url", "image_url": image})
        else:
            raise _bad(f"content part type {kind!r} is not supported here; use input_text or input_image", p)
    if role == "user":
        return out
    return ("\n\n" if role == "system" else "").join(p["text"] for p in out)


def _output_text(output, param: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = [p.get("text") for p in output if isinstance(p, dict) and p.get("type") in ("input_text", "text")]
        if len(texts) == len(output) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise _bad("function_call_output.output must be a string or a list of input_text parts", param)


def _messages(body: dict) -> list[dict]:
    msgs: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions must be a string", "instructions")
    if instructions:
        msgs.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("input is required: a string, or a non-empty list of input items", "input")
    for i, item in enumerate(items):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad("each input item must be an object", p)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad("a message needs role user, assistant, system or developer", f"{p}.role")
            role = "system" if role == "developer" else role   # chat templates know `system`
            content = _parts(item.get("content"), f"{p}.content", role)
            if role == "system" and msgs and msgs[-1]["role"] == "system":
                msgs[-1]["content"] += "\n\n" + content       # many chat templates allow one system turn
            else:
                msgs.append({"role": role, "content": content})
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise _bad(f"a function_call item needs a string `{name}`", f"{p}.{name}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if msgs and msgs[-1]["role"] == "assistant":      # one assistant turn: its text, then its calls
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad("a function_call_output item needs a string `call_id`", f"{p}.call_id")
            msgs.append({"role": "tool", "tool_call_id": item["call_id"],
                         "content": _output_text(item.get("output"), f"{p}.output")})
        elif kind == "reasoning":
            continue                      # a previous turn's reasoning: chat backends take no such input
        elif kind == "item_reference":
            raise _bad("item_reference is not supported: sluice stores no items; send the item itself", p)
        else:
            raise _bad(f"input item type {kind!r} is not supported by sluice's translation to chat completions; "
                       f"use message, function_call or function_call_output items", f"{p}.type")
    return msgs


def hosted_tools(body: dict) -> list[str]:
    """The types of the request's tools that only OpenAI can run (web_search, file_search, ...): translation
    leaves them out."""
    tools = body.get("tools")
    return [t["type"] for t in tools if isinstance(t, dict) and isinstance(t.get("type"), str)
            and t["type"] not in _LOCAL_TOOLS] if isinstance(tools, list) else []


def tool_names_header(types: list[str]) -> str:
    """The left-out tool types for a response header: client text, so only plain names (no CR/LF, nothing
    outside ASCII), each once, at most 10."""
    names = [t for t in dict.fromkeys(types) if _TOOL_TYPE.fullmatch(t)][:10]
    return ", ".join(names) or "(unnamed)"


def _function(t: dict, p: str) -> dict:
    fn = t["function"] if isinstance(t.get("function"), dict) else t    # the chat shape, sent by mistake
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _bad("a function tool needs a `name`", f"{p}.name")
    out: dict[str, Any] = {"name": fn["name"]}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    if fn.get("parameters") is not None:
        if not isinstance(fn["parameters"], dict):
            raise _bad("parameters must be a JSON Schema object", f"{p}.parameters")
        out["parameters"] = fn["parameters"]
    if isinstance(fn.get("strict"), bool):
        out["strict"] = fn["strict"]
    return {"type": "function", "function": out}


def _tools(tools) -> tuple[list[dict], dict[str, str]]:
    """Function tools in the chat shape, a namespace's tools among them under their own names; and the
    namespace of each of those names (a call to one names its namespace again)."""
    if not isinstance(tools, list):
        raise _bad("tools must be a list", "tools")
    out, spaces = [], {}
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "function":
            out.append(_function(t, p))
        elif kind == "namespace":
            if not isinstance(t.get("name"), str) or not isinstance(t.get("tools"), list):
                raise _bad("a namespace tool needs a string `name` and a list of `tools`", p)
            for j, inner in enumerate(t["tools"]):
                if not isinstance(inner, dict) or inner.get("type") != "function":
                    raise _bad("a namespace's tools must be function tools", f"{p}.tools[{j}]")
                out.append(_function(inner, f"{p}.tools[{j}]"))
                spaces[out[-1]["function"]["name"]] = t["name"]
        elif kind in _LOCAL_TOOLS or not isinstance(kind, str):       # custom, or no type at all
            raise _bad(f"tool type {kind!r} is not supported by translation: local models take function tools "
                       f"({{\"type\": \"function\", \"name\": ..., \"parameters\": {{...}}}})", p)
    return out, spaces


def tool_namespaces(body: dict) -> dict[str, str]:
    """The namespace of each namespaced function tool's name (a request to_chat accepted)."""
    return _tools(body["tools"])[1] if body.get("tools") else {}


def _tool_choice(choice):
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"name\": ...}",
               "tool_choice")


def _response_format(text) -> dict | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if text is None or fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise _bad("text.format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
               "{\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}", "text.format")


def to_chat(body: dict, model: str, cap: int | None = None) -> dict:
    """A Responses request as a chat.completions body for `model`: `instructions` -> a system message, then
    `input` (a string -> one user message; message items in order, developer -> system; function_call items
    -> the assistant turn's tool_calls; function_call_output -> tool messages); `max_output_tokens` ->
    `max_tokens` (at most `cap`, which also applies when none is asked), `temperature`, `top_p`,
    `parallel_tool_calls` as they are; function `tools`, `tool_choice`; `text.format` -> `response_format`;
    `stream` with usage asked for. Field ranges are the caller's to check."""
    refuse_stored(body)
    req: dict[str, Any] = {"model": model, "messages": _messages(body)}
    asked = body.get("max_output_tokens")
    if cap is not None:
        asked = min(asked or cap, cap)
    if asked is not None:
        req["max_tokens"] = asked
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            req[name] = body[name]
    if body.get("tools"):
        tools, _ = _tools(body["tools"])
        if tools:
            req["tools"] = tools
    if body.get("tool_choice") is not None:
        choice = _tool_choice(body["tool_choice"])
        if "tools" in req or choice == "none":      # a choice among no tools is an error to some backends
            req["tool_choice"] = choice
    if isinstance(body.get("parallel_tool_calls"), bool):
        req["parallel_tool_calls"] = body["parallel_tool_calls"]
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        req["response_format"] = fmt
    if body.get("stream") is True:
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    return req


# ---- the answer ---------------------------------------------------------------------------------------------
def shell(body: dict, model: str) -> dict:
    """A Response object for this request, not yet answered: the request's settings echoed, no output."""
    return {"id": random_id("resp_"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
            "reasoning": body.get("reasoning"), "store": False, "temperature": body.get("temperature"),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p"), "truncation": "disabled",
            "usage": None, "metadata": body.get("metadata") or {}}


def usage(u: dict | None) -> dict:
    """chat.completions usage as a Response's."""
    u = u if isinstance(u, dict) else {}
    details = u.get("prompt_tokens_details")
    inp, out = _count(u.get("prompt_tokens")), _count(u.get("completion_tokens"))
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": _count(u.get("total_tokens")) or inp + out}


def _count(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def chat_usage(u: dict | None) -> dict | None:
    """A Response's usage as chat.completions usage (what the request log records for every API)."""
    if not isinstance(u, dict):
        return None
    inp, out = _count(u.get("input_tokens")), _count(u.get("output_tokens"))
    return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": _count(u.get("total_tokens")) or inp + out}


def _message(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": random_id("msg_"), "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call(call_id: str | None, name: str, arguments: str, spaces: dict[str, str],
          status: str = "completed") -> dict:
    item = {"type": "function_call", "id": random_id("fc_"), "call_id": call_id or random_id("call_"), "name": name,
            "arguments": arguments, "status": status}
    if name in spaces:
        item["namespace"] = spaces[name]
    return item


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _str(v) -> str:
    return v if isinstance(v, str) else ""


def _finish(resp: dict, finish, u: dict | None) -> dict:
    reason = _INCOMPLETE.get(finish) if isinstance(finish, str) else None
    resp.update(status="incomplete" if reason else "completed", usage=usage(u),
                incomplete_details={"reason": reason} if reason else None)
    return resp


def to_response(obj: dict, resp: dict, spaces: dict[str, str] | None = None) -> dict:
    """A chat.completion as the Response `resp` (from `shell`): the text as a message item, each tool call as
    a function_call item (with its `namespace` from `spaces`, tool_namespaces); finish_reason length ->
    status incomplete (max_output_tokens); usage renamed."""
    choice, msg = first_choice(obj, "message")
    content = reply_text(msg)
    output = [_message(content)] if isinstance(content, str) and content else []
    for call in _list(msg.get("tool_calls")):
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            output.append(_call(_str(call.get("id")), fn["name"], tool_arguments(fn.get("arguments")), spaces or {}))
    resp["output"] = output or [_message("")]
    return _finish(resp, choice.get("finish_reason"), obj.get("usage"))


class ResponsesStream(ChunkStream):
    """One streamed chat.completion in the Responses event grammar. `start()` gives response.created and
    response.in_progress; `feed(chunk)` the events for one chat chunk: a message item opens on the first
    text (output_item.added, content_part.added, then output_text.delta), a function_call item on each new
    tool call index (output_item.added, then function_call_arguments.delta); a new item closes the open one
    (output_text.done / content_part.done or function_call_arguments.done, then output_item.done).
    `end()` closes it and sends response.completed (or response.incomplete) with usage; `fail(message)`
    sends response.failed. Every event has its `sequence_number`."""

    def __init__(self, resp: dict, spaces: dict[str, str] | None = None):
        super().__init__()
        self.resp = resp
        self.spaces = spaces or {}
        self.seq = 0
        self.item: dict | None = None     # the output item now open
        self.key: str | None = None       # "text" or "tool:<chat tool call index>"

    def _event(self, kind: str, **data) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse(kind, data)

    def _snapshot(self) -> dict:
        return json.loads(json.dumps(self.resp))

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self._event("response.created", response=self._snapshot()) + \
            self._event("response.in_progress", response=self._snapshot())

    def _open(self, key: str, item: dict) -> bytes:
        out = self._close()
        self.item, self.key = item, key
        index = len(self.resp["output"])
        out += self._event("response.output_item.added", output_index=index, item=dict(item))
        if item["type"] == "message":
            out += self._event("response.content_part.added", item_id=item["id"], output_index=index,
                               content_index=0, part=_text_part(""))
            item["text"] = ""
        return out

    def _close(self) -> bytes:
        item = self.item
        if item is None:
            return b""
        self.item = self.key = None
        index = len(self.resp["output"])
        if item["type"] == "message":
            text = item.pop("text")
            part = _text_part(text)
            out = self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=text, logprobs=[])
            out += self._event("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part=part)
            item["content"] = [part]
        else:
            out = self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                              arguments=item["arguments"])
        item["status"] = "completed"
        self.resp["output"].append(item)
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def text(self, text: str) -> bytes:
        out = self._open("text", _message("", status="in_progress")) if self.key != "text" else b""
        self.item["text"] += text
        return out + self._event("response.output_text.delta", item_id=self.item["id"],
                                 output_index=len(self.resp["output"]), content_index=0, delta=text, logprobs=[])

    def tool(self, key: str, call: dict, fn: dict, arguments: str) -> bytes:
        out = b""
        if self.key != key:
            out = self._open(key, _call(_str(call.get("id")), _str(fn.get("name")), "", self.spaces,
                                        status="in_progress"))
        if arguments:
            self.item["arguments"] += arguments
            out += self._event("response.function_call_arguments.delta", item_id=self.item["id"],
                               output_index=len(self.resp["output"]), delta=arguments)
        return out

    def end(self) -> bytes:
        """The closing events; call once the upstream said [DONE] or ended after its finish_reason."""
        out = self.start()
        if not self.resp["output"] and self.item is None:       # as to_response: never an empty output
            out += self._open("text", _message("", status="in_progress"))
        out += self._close()
        _finish(self.resp, self.finish, self.usage)
        kind = "response.incomplete" if self.resp["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=self.resp)

    def fail(self, message: str, code: str = "server_error") -> bytes:
        out = self.start()
        self.resp.update(status="failed", error={"code": code, "message": message})
        return out + self._event("response.failed", response=self.resp)
