"""HTTP transport: a ThreadingHTTPServer subclass, a thin handler and the route table.

The handler knows how to read a bounded JSON body, write one response in one send, relay SSE with
chunked encoding, and turn a SluiceError into the right error body. What a route *does* lives in
api.py and admin.py; this module only moves bytes.
"""

from __future__ import annotations

import io
import json
import logging
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from sluice import __version__, errors
from sluice.scheduler import new_id
from sluice.sockets import BoundedSocket

log = logging.getLogger("sluice.server")

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_HEADER_BYTES = 32 * 1024
MAX_JSON_DEPTH = 64
compact_json = json.JSONEncoder(separators=(",", ":")).encode    # json.dumps(..., separators=...) makes one per call
_BUSY_BODY = b'{"error":{"message":"too many connections to sluice; retry shortly","type":"overloaded_error",' \
             b'"param":null,"code":"too_many_connections"}}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass(frozen=True)
class Route:
    method: str
    path: str               # exact path, or a prefix ending in "/" when `prefix` is set
    fn: Callable            # fn(handler, *path_params)
    native: bool = False    # error bodies in the sluice-native shape instead of the OpenAI envelope
    prefix: bool = False
    public: bool = False    # answered without an API key (health, the dashboard shell)
    admin: bool = False     # needs an admin key when keys are configured


class Routes:
    def __init__(self, routes: list[Route]):
        self.routes = routes
        self._exact = {(r.method, r.path): r for r in routes if not r.prefix}
        self.native_paths = {r.path for r in routes if r.native}

    def match(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        r = self._exact.get((method, path))
        if r is not None:
            return r, ()
        allowed = sorted({x.method for x in self.routes
                          if (x.path == path if not x.prefix else path.startswith(x.path))})
        for x in self.routes:
            if x.prefix and x.method == method and path.startswith(x.path):
                return x, tuple(path[len(x.path):].split("/"))
        if allowed:
            raise errors.MethodNotAllowed(f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                                          headers={"Allow": ", ".join(allowed)})
        raise errors.NotFound(f"no route {path}; see GET /openapi.json for the API", code="not_found")


class Headers:
    """Request headers: case-insensitive, repeated names kept (what the handlers use of email.Message)."""

    __slots__ = ("_d",)

    def __init__(self):
        self._d: dict[str, list[tuple[str, str]]] = {}

    def add(self, name: str, value: str) -> None:
        self._d.setdefault(name.lower(), []).append((name, value))

    def get(self, name: str, default=None):
        v = self._d.get(name.lower())
        return v[0][1] if v else default

    def get_all(self, name: str, default=None):
        v = self._d.get(name.lower())
        return [x[1] for x in v] if v else default

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._d

    def __getitem__(self, name: str):
        return self.get(name)

    def items(self):
        return [pair for v in self._d.values() for pair in v]


class ClientGone(Exception):
    """The client closed its connection; nothing more can be written to it."""


class DisconnectWatcher:
    """One thread that notices clients closing their sockets while their request waits or streams.

    A readable socket whose MSG_PEEK returns b"" has been closed by the client: the registered callback
    runs (it cancels the queued job or aborts the upstream exchange). Nothing is ever consumed.

    Most requests are answered in a few milliseconds, and a client that leaves during those loses
    nothing worth cancelling. So a socket is only noted when its request starts (no syscall) and put in
    the selector once it has been waiting `grace_s`; a closed client is noticed within about
    2 x grace_s. The loop ticks every grace_s while anything is watched and sleeps when idle.
    """

    IDLE_AFTER_S = 2.0      # with nothing watched this long, stop ticking (the next watch wakes the loop)

    def __init__(self, grace_s: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.grace_s = grace_s
        self._clock = clock
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._pending: dict[socket.socket, tuple[Callable[[], None], float]] = {}
        self._registered: set[socket.socket] = set()
        self._asleep = False
        self._last_busy = clock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sluice-disconnects", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, on_close: Callable[[], None]) -> "_Watch":
        return _Watch(self, sock, on_close)

    def _add(self, sock, cb) -> None:
        with self._lock:
            self._pending[sock] = (cb, self._clock())
            wake, self._asleep = self._asleep, False
        if wake:
            self._wake_w.send(b"x")

    def _remove(self, sock) -> None:
        with self._lock:
            if self._pending.pop(sock, None) is None and sock in self._registered:
                self._registered.discard(sock)
                try:
                    self._sel.unregister(sock)
                except (KeyError, ValueError):
                    pass

    def close(self) -> None:
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=2)
        self._wake_w.close()

    def _promote(self) -> float | None:
        """Put sockets watched for grace_s into the selector; the select timeout to use next."""
        now = self._clock()
        with self._lock:
            for sock, (cb, since) in list(self._pending.items()):
                if now - since >= self.grace_s:
                    del self._pending[sock]
                    try:
                        self._sel.register(sock, selectors.EVENT_READ, cb)
                        self._registered.add(sock)
                    except (KeyError, ValueError, OSError):
                        pass                 # closed already: its request is about to find out itself
            if self._pending or self._registered:
                self._last_busy = now
                return self.grace_s
            if now - self._last_busy < self.IDLE_AFTER_S:
                return self.grace_s
            self._asleep = True
            return None

    def _loop(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select(timeout=self._promote()):
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                sock = key.fileobj
                try:
                    closed = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    continue
                except OSError:
                    closed = True
                # Data (a pipelined request) cannot tell us anything more: stop watching either way.
                self._remove(sock)
                if closed:
                    try:
                        key.data()
                    except Exception:
                        log.exception("disconnect callback failed")
        self._sel.close()
        self._wake_r.close()


class _Watch:
    def __init__(self, watcher: DisconnectWatcher, sock, on_close):
        self._w, self._sock, self._cb = watcher, sock, on_close

    def __enter__(self):
        self._w._add(self._sock, self._cb)
        return self

    def __exit__(self, *exc):
        self._w._remove(self._sock)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"sluice/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True
    request_id: str | None = None
    body = b""                  # the raw request body, as read_json read it
    server: "Server"

    def parse_request(self) -> bool:
        """The request line and headers, without the email-package parser the stdlib uses (a plain loop
        is several times faster). Limits: 100 header lines of 64 KiB at most (431 beyond)."""
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = line
        self.command, self.request_version = None, "HTTP/0.9"
        words = line.split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.send_error(400, f"bad request line {line[:80]!r}")
            return False
        self.command, self.path, self.request_version = words
        headers = Headers()
        size = 0
        for _ in range(101):
            raw = self.rfile.readline(65537)
            if len(raw) > 65536:
                self.send_error(431, "header line too long")
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("iso-8859-1").partition(":")
            if not sep or not name or name != name.strip():
                self.send_error(400, f"bad header line {raw[:60]!r}")
                return False
            value = value.strip()
            size += len(name) + len(value)
            headers.add(name, value)
        else:
            self.send_error(431, "too many headers")
            return False
        self.headers, self.header_bytes = headers, size
        conn = headers.get("Connection", "").lower()
        self.close_connection = conn == "close" or (self.request_version == "HTTP/1.0" and conn != "keep-alive")
        if headers.get("Expect", "").lower() == "100-continue" and self.request_version != "HTTP/1.0":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")   # curl waits a second for this otherwise
        return True

    def setup(self) -> None:
        super().setup()
        # Reads go through a deadline: a client must deliver each request (head and body) within
        # client_timeout_s of starting it, however slowly it trickles bytes (slowloris). Each write to it
        # may take as long.
        self._io = BoundedSocket(self.connection)
        self._io.limit(self.server.client_timeout_s)
        self.rfile.close()
        self.rfile = io.BufferedReader(self._io, 65536)
        self.wfile = self._io

    def handle_one_request(self) -> None:
        """One request on the connection. Every method goes through the route table (an unknown one is a
        JSON 405, never the stdlib's HTML 501), so there is no do_GET/do_POST lookup."""
        self._io.deadline = time.monotonic() + self.server.client_timeout_s
        self.request_id = None       # a protocol error below gets an id of its own, not the last request's
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, "request line too long")
            elif not self.raw_requestline:
                self.close_connection = True
            elif self.parse_request():
                self._dispatch()
        except TimeoutError:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-") -> None:
        pass  # one line per job is logged by the app, with its request id

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the stdlib parser (bad request line, too many headers) as JSON."""
        self.close_connection = True
        self.extra_headers = {}
        self.route_native = False
        self.request_id = self.request_id or new_id()
        err = errors.BadRequest(message or "bad request")
        err.status = code if 400 <= code < 500 else 400
        try:
            self.respond_error(err, native=False)
        except OSError:
            pass

    # ---- request side --------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        rid = self.headers.get("X-Request-Id", "")
        self.request_id = rid if _SAFE_ID.fullmatch(rid) else new_id()
        path = self.path.split("?", 1)[0]
        self.route_native = path in self.server.routes.native_paths
        self.extra_headers: dict[str, str] = {}
        try:
            if self.header_bytes > MAX_HEADER_BYTES:
                raise errors.HeadersTooLarge(f"request headers exceed {MAX_HEADER_BYTES} bytes")
            route, params = self.server.routes.match(self.command, path)
            self.route_native = route.native
            self.server.authorize(self, route)
            route.fn(self, *params)
        except errors.SluiceError as e:
            self.respond_error(e)
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("request %s %s %s failed", self.request_id, self.command, path)
            self.respond_error(errors.SluiceError(
                f"internal error in sluice (request id {self.request_id}); please report it"))
        finally:
            self.body = b""               # not kept while the connection waits for its next request

    def read_json(self, max_bytes: int) -> dict:
        """The request body as a JSON object, bounded in size and nesting; a 4xx says what is wrong."""
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise errors.LengthRequired("chunked request bodies are not accepted; send Content-Length")
        raw = self.headers.get_all("Content-Length") or []
        if len(raw) != 1:
            self.close_connection = True
            if not raw:
                raise errors.LengthRequired("Content-Length header is required")
            raise errors.BadRequest("more than one Content-Length header")
        value = raw[0].strip()
        if not value.isdigit():
            self.close_connection = True
            raise errors.BadRequest(f"Content-Length must be a non-negative integer, got {value[:40]!r}")
        n = int(value)
        if n > max_bytes:
            self.close_connection = True
            raise errors.PayloadTooLarge(f"body is {n} bytes; the limit is {max_bytes} (SLUICE_MAX_BODY_BYTES)")
        data = self.rfile.read(n)
        if len(data) < n:
            raise ClientGone()
        self._io.deadline = None          # the request is in; answering may take as long as it takes
        self._io.limit(self.server.client_timeout_s)       # and each write to the client this long
        self.body = data
        if _too_deep(data):
            raise errors.BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise errors.BadRequest(f"body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise errors.BadRequest(f"body must be a JSON object, got {type(obj).__name__}")
        return obj

    # ---- response side -------------------------------------------------------------------------------
    def respond(self, status: int, body: bytes, content_type: str = "application/json",
                headers: dict[str, str] | None = None) -> None:
        """Head and body in one send (no Nagle stall between two small writes)."""
        head = self._head(status, f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n", headers)
        self.wfile.write(head + (b"" if self.command == "HEAD" else body))

    def _head(self, status: int, lines: str, headers: dict[str, str] | None) -> bytes:
        """A response head: the status line, `lines` (each ending in CRLF), the request id, extra headers."""
        extra = {**self.extra_headers, **headers} if headers else self.extra_headers
        head = f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n{lines}X-Request-Id: {self.request_id}\r\n"
        head += "".join([f"{k}: {v}\r\n" for k, v in extra.items()])
        if self.close_connection:
            head += "Connection: close\r\n"
        return (head + "\r\n").encode("latin-1")

    def respond_json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self.respond(status, compact_json(obj).encode(), headers=headers)

    def respond_error(self, err: errors.SluiceError, native: bool | None = None,
                      headers: dict[str, str] | None = None) -> None:
        native = self.route_native if native is None else native
        body = errors.native_body(err) if native else errors.openai_body(err)
        status = err.status if err.status != 499 else 400
        self.respond_json(status, body, headers={**errors.response_headers(err), **(headers or {})})

    def start_sse(self, headers: dict[str, str] | None = None) -> None:
        self.write_raw(self._head(200, "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                                       "X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n", headers))

    def sse_chunk(self, data: bytes) -> None:
        if data:
            self.write_raw(b"%x\r\n%s\r\n" % (len(data), data))

    def end_sse(self) -> None:
        self.write_raw(b"0\r\n\r\n")

    def write_raw(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError:
            raise ClientGone() from None


def _too_deep(data: bytes) -> bool:
    """Cheap pre-check so json.loads never recurses deeply (brackets inside strings only over-count)."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    in_str = esc = False
    for c in data:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
    return False


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, address, routes: Routes, authorize: Callable, client_timeout_s: float = 30.0,
                 max_connections: int = 512):
        self.routes = routes
        self.authorize = authorize
        self.client_timeout_s = client_timeout_s
        self.max_connections = max_connections
        self.connections = 0
        self._count_lock = threading.Lock()
        self.watcher = DisconnectWatcher()
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        """Beyond max_connections, answer 503 at once from the accept thread: no thread, no waiting."""
        with self._count_lock:
            full = self.connections >= self.max_connections
            if not full:
                self.connections += 1
        if full:
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.connections -= 1

    def server_close(self) -> None:
        super().server_close()
        self.watcher.close()
