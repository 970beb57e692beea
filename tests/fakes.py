"""A real HTTP stand-in for an OpenAI-compatible backend, for fault injection and counting.

It runs on 127.0.0.1 port 0 in a thread, records what arrives (in order), counts concurrent requests and
fails loudly when more than `limit` are in flight at once. Behaviour is set per backend (`mode`) or per
request: a user message (or prompt) starting with `!` names the mode for that request, e.g. `!hang`.

Modes: ok, error500, garbage (200 with invalid JSON), notobject (200 with a JSON list), reset (RST after
reading the request), hang (no answer until the client leaves), stream_die (two SSE events then the
connection drops), slow (each SSE event `chunk_delay` apart), ragged (SSE framed awkwardly: RAGGED_PIECES).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What the `ragged` mode sends, piece by piece (each piece one HTTP chunk)
RAGGED_PIECES = [b"data: {\"n\": 1}\r\n", b"\r\ndata: {\"n\"", b": 2}\n\n: a comment\n\ndata: {\"n\": 3}\n\n",
                 b"data: {\"n\": 4}\r\n\r\ndata: {\"n\": 5, \"text\": \"data: [DONE] is not the end\"}\n\n",
                 b"data: {\"n\": 6}"]


# Fault tests hang up on purpose before the answer is written; the traceback socketserver would print for
# that buries the output that matters. Anything else still goes through the default handler and is printed.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class QuietServer(ThreadingHTTPServer):
    """The stand-ins' HTTP server: one thread per connection, silent when the client went away."""
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], CLIENT_GONE):
            return
        super().handle_error(request, client_address)


class ScriptedHandler(BaseHTTPRequestHandler):
    """The base of a test's own scripted stand-in handler: HTTP/1.1, silent, `send_body` for a whole answer."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_body(self, status: int, data: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Served:
    """A handler class served on 127.0.0.1 port 0 in a thread until close(); `url` is its /v1 base."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.server = QuietServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeClock:
    """An injected clock that moves only when a test says (`advance`); read from several threads."""

    def __init__(self):
        self.t = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.t

    def advance(self, dt: float) -> None:
        with self._lock:
            self.t += dt


class FakeBackend:
    def __init__(self, model: str = "fake-model", mode: str = "ok", limit: int | None = None,
                 chunks: int = 3, chunk_delay: float = 0.0):
        self.model = model
        self.mode = mode
        self.limit = limit
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.arrivals: list[dict] = []        # request bodies in arrival order
        self.raw_arrivals: list[bytes] = []   # the same, as the bytes that came
        self.current = 0
        self.max_seen = 0
        self.violations: list[str] = []
        self.disconnects: list[float] = []    # monotonic times at which a client was seen to leave
        self.event_times: list[float] = []    # when each SSE event was written
        self.holding = False                  # when True, requests wait for release()
        self.sleeping = False                 # vLLM sleep mode
        self.control_calls: list[tuple[float, str]] = []   # (time, "POST /sleep?level=1"), in order
        self.fail_control: set[str] = set()   # paths (without query) that answer 500
        self.hang_control: set[str] = set()   # paths (without query) that answer only after release_control()
        self.shared_log: list | None = None   # several fakes can share one log to check cross-server order
        self.reply_after_wake: str | None = None   # answer differently once woken (a broken wake)
        self.woken = False
        self.manifest: list[str] | None = None   # what GET /v1/models lists (None: just `model`); change at will
        self.manifest_status = 200               # answer GET /v1/models with this (500: a failing manifest)
        self.manifest_reads = 0                  # GET /v1/models answered so far
        self._released = 0
        self._cond = threading.Condition()
        self._stopping = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/is_sleeping":
                    return self._json(200, {"is_sleeping": outer.sleeping})
                if self.path == "/health":
                    self._json(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    ids = [outer.model] if outer.manifest is None else list(outer.manifest)
                    status = outer.manifest_status
                    self._json(status, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}
                               if status == 200 else {"error": "manifest failed"})
                    with outer._cond:
                        outer.manifest_reads += 1
                        outer._cond.notify_all()
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(n)
                outer.raw_arrivals.append(raw)
                body = json.loads(raw or b"{}")
                if not self.path.startswith("/v1/"):
                    return outer._control(self, self.path, body)
                if outer.sleeping:
                    outer.violations.append(f"request for {body.get('model')} while asleep")
                    return self._json(503, {"error": "asleep"})
                outer._enter(self.path, body)
                self.in_flight = True
                try:
                    outer._serve(self, body)
                finally:
                    self.done()

            def done(self):
                """The request stops counting as in flight just before its last bytes go out: a client
                cannot send its next request before it has them all, so any overlap seen is real."""
                if getattr(self, "in_flight", False):
                    self.in_flight = False
                    outer._leave()

            def _json(self, status, obj, raw=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.done()
                self.wfile.write(data)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    # ---- control -----------------------------------------------------------------------------------------
    def release(self, n: int = 1) -> None:
        with self._cond:
            self._released += n
            self._cond.notify_all()

    def release_control(self) -> None:
        """Let the control calls held by `hang_control` answer."""
        with self._cond:
            self.hang_control.clear()
            self._cond.notify_all()

    def release_all(self) -> None:
        """Let every held request and all later ones through."""
        with self._cond:
            self.holding = False
            self._cond.notify_all()

    def _wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_arrivals(self, n: int, timeout: float = 5.0) -> bool:
        return self._wait_for(lambda: len(self.arrivals) >= n, timeout)

    def wait_disconnects(self, n: int = 1, timeout: float = 5.0) -> bool:
        return self._wait_for(lambda: len(self.disconnects) >= n, timeout)

    def wait_manifest_reads(self, n: int, timeout: float = 5.0) -> bool:
        return self._wait_for(lambda: self.manifest_reads >= n, timeout)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        return self._wait_for(lambda: self.current == 0, timeout)

    def prompts(self) -> list[str]:
        return [_text(b) for b in self.arrivals]

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._released += 10 ** 6
            self._cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # ---- serving -----------------------------------------------------------------------------------------
    def _enter(self, path: str, body: dict) -> None:
        with self._cond:
            body = dict(body, _path=path)
            self.arrivals.append(body)
            self.current += 1
            self.max_seen = max(self.max_seen, self.current)
            if self.limit is not None and self.current > self.limit:
                self.violations.append(f"{self.current} requests in flight at once (limit {self.limit})")
            self._cond.notify_all()
            while self.holding and self._released <= 0 and not self._stopping:
                self._cond.wait()
            if self.holding:
                self._released -= 1

    def _control(self, h, path: str, body: dict) -> None:
        """vLLM's dev-mode endpoints: /sleep?level=N, /wake_up, /collective_rpc, /reset_prefix_cache."""
        entry = (time.monotonic(), f"POST {path}" + (f" {body.get('method')}" if body.get("method") else ""))
        with self._cond:
            self.control_calls.append(entry)
            if self.shared_log is not None:
                self.shared_log.append((self.model, entry[1]))
            if self.current and path.startswith("/sleep"):
                self.violations.append(f"put to sleep with {self.current} request(s) in flight")
        with self._cond:
            while path.split("?")[0] in self.hang_control and not self._stopping:
                self._cond.wait()
        if path.split("?")[0] in self.fail_control:
            return h._json(500, {"error": "control failed"})
        if path.startswith("/sleep"):
            self.sleeping = True
        elif path == "/wake_up":
            self.sleeping = False
            self.woken = True
        h._json(200, {})

    def _leave(self) -> None:
        with self._cond:
            self.current -= 1
            self._cond.notify_all()

    def _client_left(self) -> None:
        with self._cond:
            self.disconnects.append(time.monotonic())
            self._cond.notify_all()

    def _serve(self, h, body: dict) -> None:
        text = _text(body)
        mode = text[1:].split()[0] if text.startswith("!") else self.mode
        if mode == "error500":
            return h._json(500, {"error": {"message": "boom"}})
        if mode == "garbage":
            return h._json(200, None, raw=b"{not json")
        if mode == "notobject":
            return h._json(200, [1, 2])
        if mode == "html":
            data = b"<html><body>502 Bad Gateway from some proxy</body></html>"
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if mode == "endless":
            return self._endless(h)
        if mode == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if mode == "hang":
            return self._hang(h)
        if mode == "ragged":
            return self._ragged(h)
        if body.get("stream"):
            return self._stream(h, body, mode)
        if h.path.endswith("/embeddings"):
            return h._json(200, {"object": "list", "data": [{"object": "embedding", "index": 0,
                                                             "embedding": [0.1, 0.2]}], "model": body.get("model")})
        reply = self.reply_after_wake if self.woken and self.reply_after_wake else f"echo: {text}"
        h._json(200, {"id": "cmpl-1", "object": "chat.completion", "model": body.get("model"),
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})

    def _hang(self, h) -> None:
        """Answer nothing; notice when the client goes away."""
        h.close_connection = True
        h.connection.settimeout(0.05)
        while not self._stopping:
            try:
                if h.connection.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        self._client_left()

    def _stream(self, h, body: dict, mode: str) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        n = 2 if mode == "stream_die" else self.chunks
        delay = self.chunk_delay if mode in ("slow", "ok") else 0.0
        try:
            self._chunk(h, b": keepalive 1/1\n\n")
            for i in range(n):
                if delay and i:
                    if self._wait_or_leave(h, delay):
                        return
                event = {"id": "c1", "object": "chat.completion.chunk", "model": body.get("model"),
                         "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
                self._chunk(h, b"data: " + json.dumps(event).encode() + b"\n\n")
            if mode == "stream_die":
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            usage = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
                     "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}
            self._chunk(h, b"data: " + json.dumps(usage).encode() + b"\n\n")
            self._chunk(h, b"data: [DONE]\n\n")
            h.done()
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            self._client_left()

    def _endless(self, h) -> None:
        """An SSE stream that never ends: an event every 20 ms until the client goes away."""
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            while not self._stopping:
                self._chunk(h, b'data: {"choices":[{"delta":{"content":"la "}}]}\n\n')
                if self._wait_or_leave(h, 0.02):
                    return
        except OSError:
            self._client_left()

    def _wait_or_leave(self, h, delay: float) -> bool:
        """Sleep `delay` between events while watching the socket; True if the client left meanwhile."""
        end = time.monotonic() + delay
        h.connection.settimeout(0.01)
        try:
            while time.monotonic() < end:
                try:
                    if h.connection.recv(1, socket.MSG_PEEK) == b"":
                        self._client_left()
                        return True
                except TimeoutError:
                    pass
        finally:
            h.connection.settimeout(None)
        return False

    def _ragged(self, h) -> None:
        """SSE framed awkwardly but legally: CRLF line ends, events split across HTTP chunks, a burst of
        events in one chunk, and a last event cut short (no blank line) before the body ends."""
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for piece in RAGGED_PIECES:
            self._chunk(h, piece)
        h.wfile.write(b"0\r\n\r\n")

    def _chunk(self, h, data: bytes) -> None:
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        with self._cond:
            self.event_times.append(time.monotonic())


def _text(body: dict) -> str:
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
        c = msgs[-1].get("content")
        return c if isinstance(c, str) else ""
    p = body.get("prompt")
    return p if isinstance(p, str) else ""
