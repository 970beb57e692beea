"""A stdlib stand-in of the Anthropic Messages API on 127.0.0.1, for the real `anthropic` SDK to talk to.

Accepts the key as `x-api-key` or `Authorization: Bearer`; records every request; answers text or a
tool_use, streamed (the real event names and shapes) or not; can be told to fail or to hang.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "test-anthropic-key"


class FakeAnthropic:
    def __init__(self):
        self.requests: list[dict] = []
        self.status = 200             # answer this status instead (429, 529, 500...)
        self.reply = "Hello from Claude"
        self.tool: dict | None = None  # {"name":..., "input": {...}}: answer with a tool_use block
        self.hanging = False           # requests wait for `release` while this is true
        self.release = threading.Event()
        self.arrived = threading.Semaphore(0)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                auth = self.headers.get("x-api-key") or (self.headers.get("Authorization") or "")[7:]
                outer.requests.append({"headers": dict(self.headers), "body": body})
                outer.arrived.release()
                if auth != KEY:
                    return self._json(401, {"type": "error", "error": {"type": "authentication_error",
                                                                       "message": "invalid x-api-key"}})
                if outer.hanging:
                    outer.release.wait(30)
                if outer.status != 200:
                    return self._json(outer.status, {"type": "error", "error": {"type": "overloaded_error",
                                                                                "message": "busy"}})
                if body.get("stream"):
                    return self._stream(body)
                self._json(200, outer.message(body))

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for name, data in outer.events(body):
                    self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                    self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def message(self, body: dict) -> dict:
        content = [{"type": "text", "text": self.reply}]
        stop = "end_turn"
        if self.tool:
            content = [{"type": "tool_use", "id": "toolu_01", "name": self.tool["name"], "input": self.tool["input"]}]
            stop = "tool_use"
        return {"id": "msg_01", "type": "message", "role": "assistant", "model": body["model"], "content": content,
                "stop_reason": stop, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 7}}

    def events(self, body: dict):
        yield "message_start", {"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 1}}}
        if self.tool:
            yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_01", "name": self.tool["name"], "input": {}}}
            js = json.dumps(self.tool["input"])
            for part in (js[:len(js) // 2], js[len(js) // 2:]):
                yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "input_json_delta", "partial_json": part}}
            stop = "tool_use"
        else:
            yield "content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}
            yield "ping", {"type": "ping"}
            for word in self.reply.split(" "):
                yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": word + " "}}
            stop = "end_turn"
        yield "content_block_stop", {"type": "content_block_stop", "index": 0}
        yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                "usage": {"output_tokens": 7}}
        yield "message_stop", {"type": "message_stop"}

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
