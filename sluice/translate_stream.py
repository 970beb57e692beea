"""Streams, both directions: Anthropic Messages events -> OpenAI chat chunks (`translate_events`, the cloud
route) and OpenAI chat chunks -> Messages events (`MessagesStream`, the /v1/messages ingress). The
request/answer halves are in translate_cloud.py (cloud route) and translate.py (ingress).
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Iterator

from sluice import errors
from sluice.translate import (finish_reason, first_choice, message_usage, new_message_id, openai_usage, random_id,
                              stop_reason, tool_id)


class Chunker:
    """Makes the chunks of one streamed answer: one id, one created time, one model."""

    def __init__(self, model: str):
        self.id = random_id("chatcmpl-")
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


def translate_events(events: Iterable[dict], chunk: Chunker, include_usage: bool) -> Iterator[dict]:
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
        yield chunk.make({}, usage=openai_usage(usage))


# ---- OpenAI chat chunks -> Anthropic Messages events --------------------------------------------------------------
def sse(name: str, data: dict) -> bytes:
    """One Anthropic SSE event."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def sse_data(events: bytes) -> Iterator[bytes]:
    """The `data:` payloads of a run of complete SSE events (upstream.Exchange.events), in order."""
    for line in events.split(b"\n"):
        if line.startswith(b"data:"):
            yield line[5:].strip()


def chat_chunks(events: bytes, backend: str | None) -> tuple[list[dict], bool]:
    """The chat chunks in a run of a backend's SSE events, and whether the run ended the stream ([DONE]). An
    event that is not JSON, or an error event, is a 502: the answer cannot be translated on."""
    chunks = []
    for data in sse_data(events):
        if data == b"[DONE]":
            return chunks, True
        try:
            chunk = json.loads(data)
        except ValueError:
            raise errors.BadGateway(f"backend {backend!r} sent a stream event that is not JSON: "
                                    f"{data[:200].decode('utf-8', 'replace')}") from None
        if isinstance(chunk, dict):
            if isinstance(chunk.get("error"), dict):
                raise errors.BadGateway(f"backend {backend!r} failed mid-stream: {chunk['error'].get('message')}")
            chunks.append(chunk)
    return chunks, False


def tool_arguments(args) -> str:
    """A tool call's arguments as JSON text: some servers send the whole object at once."""
    return json.dumps(args) if isinstance(args, dict) else args if isinstance(args, str) else ""


class ChunkStream:
    """What the chat-chunk translators (MessagesStream here, translate_responses.ResponsesStream) share:
    `feed(chunk)` notes the chunk's usage and finish_reason and hands its text to `text(text)` and each
    tool-call delta to `tool(key, call, fn, arguments)` (key: "tool:<index>"); they make the events."""

    def __init__(self):
        self.started = False
        self.finish: str | None = None
        self.choice: dict = {}            # the choice that carried the finish_reason
        self.usage: dict | None = None    # chat-style, for the job's log

    def feed(self, chunk: dict) -> bytes:
        out = self.start()
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choice, delta = first_choice(chunk, "delta")
        text = delta.get("content")
        if isinstance(text, str) and text:
            out += self.text(text)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict):
                fn = call.get("function") if isinstance(call.get("function"), dict) else {}
                out += self.tool(f"tool:{call.get('index', 0)}", call, fn, tool_arguments(fn.get("arguments")))
        if isinstance(choice.get("finish_reason"), str) and choice["finish_reason"]:
            self.finish, self.choice = choice["finish_reason"], choice
        return out


class MessagesStream(ChunkStream):
    """Turns one streamed chat.completion into Anthropic's event grammar: message_start, then per block
    content_block_start / content_block_delta (text_delta, input_json_delta) / content_block_stop, then
    message_delta (stop_reason, usage) and message_stop. `feed(chunk)` and `end()` return the SSE bytes to send.
    A text block opens on the first content, a tool_use block on each new tool call index (its arguments as
    input_json_delta); a new kind of block closes the open one."""

    def __init__(self, model: str, stop_sequences: list | None = None):
        super().__init__()
        self.model = model
        self.stop_sequences = stop_sequences
        self.index = -1                   # the Anthropic block now open (-1: none)
        self.open: str | None = None      # "text" or "tool:<OpenAI tool index>"
        self.tools = False
        self.ended = False

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return sse("message_start", {"type": "message_start", "message": {
            "id": new_message_id(), "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _begin(self, key: str, block: dict) -> bytes:
        out = self._close()
        self.index += 1
        self.open = key
        return out + sse("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})

    def text(self, text: str) -> bytes:
        out = self._begin("text", {"type": "text", "text": ""}) if self.open != "text" else b""
        return out + sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                 "delta": {"type": "text_delta", "text": text}})

    def tool(self, key: str, call: dict, fn: dict, arguments: str) -> bytes:
        out = b""
        if self.open != key:
            self.tools = True
            out = self._begin(key, {"type": "tool_use", "id": call.get("id") or tool_id(),
                                    "name": fn.get("name") or "", "input": {}})
        if arguments:
            out += sse("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                               "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return out

    def end(self) -> bytes:
        """The closing events; call once the upstream said [DONE] or ended after its finish_reason."""
        self.ended = True
        out = self.start() + self._close()
        reason, seq = stop_reason(self.finish, self.choice, self.stop_sequences, self.tools)
        usage = message_usage(self.usage)
        return out + sse("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": reason, "stop_sequence": seq},
                                           "usage": usage}) + sse("message_stop", {"type": "message_stop"})


def message_events(msg: dict) -> Iterator[dict]:
    """A whole Messages answer as the events of a stream that carried it (for a route that cannot stream,
    the claude CLI): message_start, each block whole in one delta, message_delta, message_stop."""
    yield {"type": "message_start", "message": {**msg, "content": [], "stop_reason": None, "stop_sequence": None}}
    for i, block in enumerate(msg.get("content") or []):
        if block.get("type") == "tool_use":
            yield {"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block.get("input") or {})}
        else:
            yield {"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}
            delta = {"type": "text_delta", "text": block.get("text") or ""}
        yield {"type": "content_block_delta", "index": i, "delta": delta}
        yield {"type": "content_block_stop", "index": i}
    yield {"type": "message_delta", "delta": {"stop_reason": msg.get("stop_reason"),
                                              "stop_sequence": msg.get("stop_sequence")},
           "usage": {"output_tokens": (msg.get("usage") or {}).get("output_tokens", 0)}}
    yield {"type": "message_stop"}


def event_name(event: bytes) -> bytes:
    """The `event:` name of one SSE event (b"" when it has none)."""
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip()
    return b""


def split_events(events: bytes) -> list[bytes]:
    """A run of complete SSE events (upstream.Exchange.events) as single events, each with its blank line."""
    return [e + b"\n\n" for e in events.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
