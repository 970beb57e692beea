"""A stdlib stand-in of the Anthropic Messages API (`POST /v1/messages`) on 127.0.0.1, port 0, in a thread,
for the real `anthropic` SDK to talk to (point ANTHROPIC_BASE_URL at `.url`).

Accepts the key as `x-api-key` or `Authorization: Bearer` (401 in Anthropic's error shape otherwise),
records every request, answers text and/or tool_use blocks, as one JSON message or as an SSE stream with the
real event names and shapes (message_start, content_block_start, ping, content_block_delta,
content_block_stop, message_delta, message_stop). Knobs, set between requests:

    status        answer this HTTP status with Anthropic's error body instead (429, 529, 500, ...)
    retry_after   a Retry-After header on that error
    reply         the text answered
    tool          {"name": ..., "input": {...}}: answer with this tool_use block (after `reply` if preamble)
    preamble      with `tool`: a text block before the tool_use block
    stop_reason   the stop reason when no tool is used ("end_turn", "max_tokens", "stop_sequence")
    hang          requests wait (before answering) until `release` is set
    hold_stream   streams stop after their first text delta until `release` is set or the client hangs up
                  (then `disconnected` is set)
"""

from __future__ import annotations

import json
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler

from fakes import QuietServer

KEY = "sk-ant-test-0123456789"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                529: "overloaded_error"}


class FakeAnthropic:
    def __init__(self, key: str = KEY):
        self.key = key
        self.requests: list[dict] = []          # {"path", "headers" (lower-case), "body", "peer"} in arrival order
        self.status = 200
        self.retry_after: str | None = None
        self.reply = "Hello from Claude"
        self.tool: dict | None = None
        self.preamble = False
        self.stop_reason = "end_turn"
        self.hang = False
        self.hold_stream = False
        self.release = threading.Event()
        self.disconnected = threading.Event()
        self.arrived = threading.Semaphore(0)   # one release per request received
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with outer._lock:
                    outer.requests.append({"path": self.path, "body": body, "peer": self.client_address,
                                           "headers": {k.lower(): v for k, v in self.headers.items()}})
                outer.arrived.release()
                auth = self.headers.get("x-api-key")
                bearer = self.headers.get("Authorization") or ""
                if auth is None and bearer.startswith("Bearer "):
                    auth = bearer[len("Bearer "):]
                if auth != outer.key:
                    return self._error(401, "invalid x-api-key")
                if self.path.split("?")[0] != "/v1/messages":
                    return self._error(404, f"no route {self.path}")
                if not isinstance(body, dict) or not isinstance(body.get("max_tokens"), int):
                    return self._error(400, "max_tokens: Field required")
                if outer.hang:
                    outer.release.wait(30)
                if outer.status != 200:
                    return self._error(outer.status, "simulated failure")
                if body.get("stream"):
                    return self._stream(body)
                self._json(200, outer.message(body))

            def _error(self, status, message):
                headers = {"retry-after": outer.retry_after} if outer.retry_after and status in (429, 529) else {}
                self._json(status, {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"),
                                                               "message": message}}, headers)

            def _json(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("request-id", "req_fake")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                held = False
                try:
                    for name, data in outer.events(body):
                        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                        self.wfile.flush()
                        if outer.hold_stream and not held and data.get("delta", {}).get("type") == "text_delta":
                            held = True
                            if self._hold():
                                return
                except OSError:
                    outer.disconnected.set()

            def _hold(self) -> bool:
                """Wait for `release` or the client hanging up (True)."""
                while not outer.release.is_set():
                    readable, _, _ = select.select([self.connection], [], [], 0.02)
                    if readable:
                        try:
                            gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                        except OSError:
                            gone = True
                        if gone:
                            outer.disconnected.set()
                            return True
                return False

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def last(self) -> dict:
        return self.requests[-1]

    def content(self) -> list[dict]:
        blocks = []
        if not self.tool or self.preamble:
            blocks.append({"type": "text", "text": self.reply})
        if self.tool:
            blocks.append({"type": "tool_use", "id": "toolu_01", "name": self.tool["name"],
                           "input": self.tool["input"]})
        return blocks

    def _stop(self) -> str:
        return "tool_use" if self.tool else self.stop_reason

    def message(self, body: dict) -> dict:
        return {"id": "msg_01", "type": "message", "role": "assistant", "model": body["model"],
                "content": self.content(), "stop_reason": self._stop(), "stop_sequence": None,
                "usage": {"input_tokens": 11, "output_tokens": 7}}

    def events(self, body: dict):
        yield "message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 1}}}
        for i, block in enumerate(self.content()):
            if block["type"] == "text":
                yield "content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {"type": "text", "text": ""}}
                yield "ping", {"type": "ping"}
                words = block["text"].split(" ")
                for j, word in enumerate(words):
                    text = word if j == len(words) - 1 else word + " "
                    yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "text_delta", "text": text}}
            else:
                yield "content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}
                js = json.dumps(block["input"])
                for part in (js[:len(js) // 2], js[len(js) // 2:]):
                    yield "content_block_delta", {"type": "content_block_delta", "index": i,
                                                  "delta": {"type": "input_json_delta", "partial_json": part}}
            yield "content_block_stop", {"type": "content_block_stop", "index": i}
        yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": self._stop(), "stop_sequence": None},
                                "usage": {"output_tokens": 7}}
        yield "message_stop", {"type": "message_stop"}

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
