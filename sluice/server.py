"""HTTP transport: a ThreadingHTTPServer subclass, a thin handler and the route table.

The handler runs the front door's rules in one place (docs/design.md, "The front door"): the request is
framed by framing.py, checked against the browser threat model (browser.py), routed, and answered
exactly once, and the connection is kept only when its request's body was read to the end. What a route
*does* lives in api.py and admin.py; this module only moves bytes.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from sluice import __version__, bigjson, errors
from sluice.browser import BrowserGuard
from sluice.connections import Connections
from sluice.disconnects import DisconnectWatcher
from sluice.framing import (MAX_REQUEST_LINE, Body, FramingError, Headers, Incomplete, parse_request_line,
                            read_fields)
from sluice.ids import new_id
from sluice.sockets import BoundedSocket

log = logging.getLogger("sluice.server")

__all__ = ["ClientGone", "Handler", "Headers", "Route", "Routes", "Server", "compact_json"]

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_REASONS = {529: ("Overloaded",)}     # Anthropic's "try again later"; not in http.server's table
MAX_JSON_DEPTH = 64
LINGER_S = 5.0                  # after answering a request whose body is left unread: read and drop this long
LINGER_BYTES = 64 << 20         # ... and at most this much, so the client can finish sending and read the answer
compact_json = json.JSONEncoder(separators=(",", ":")).encode    # json.dumps(..., separators=...) makes one per call
_BUSY_BODY = b'{"error":{"message":"too many connections to sluice; retry shortly","type":"overloaded_error",' \
             b'"param":null,"code":"too_many_connections"}}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (send a finite number or null)")


def _finite(text: str) -> float:
    f = float(text)
    if f in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} is out of range for a JSON number (send a finite number)")
    return f


# JSON as RFC 8259 defines it: no NaN/Infinity, no number that overflows a double. A body sluice accepts is
# one every backend's parser accepts, whether it goes up as the client's bytes or re-encoded.
_decode = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite).decode


def _decode_bytes(data: bytes):
    return _decode(data.decode(json.detect_encoding(data), "surrogatepass"))   # as json.loads(bytes) does


@dataclass(frozen=True)
class Route:
    method: str
    path: str               # exact path, or a prefix ending in "/" when `prefix` is set
    fn: Callable            # fn(handler, *path_params)
    api: str = "openai"     # whose error envelope its errors use: a key of errors.ENVELOPES
    prefix: bool = False
    public: bool = False    # answered without an API key (health, the dashboard shell)
    admin: bool = False     # needs an admin key when keys are configured


class Routes:
    def __init__(self, routes: list[Route]):
        self.routes = routes
        self._exact = {(r.method, r.path): r for r in routes if not r.prefix}
        self.envelopes = {r.path: r.api for r in routes if r.api != "openai"}   # for errors before routing

    def match(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        want = "GET" if method == "HEAD" else method    # a GET route answers HEAD too, without the body
        r = self._exact.get((want, path))
        if r is not None:
            return r, ()
        allowed = sorted({m for x in self.routes if (x.path == path if not x.prefix else path.startswith(x.path))
                          for m in ((x.method, "HEAD") if x.method == "GET" else (x.method,))})
        for x in self.routes:
            if x.prefix and x.method == want and path.startswith(x.path):
                return x, tuple(path[len(x.path):].split("/"))
        if allowed:
            raise errors.MethodNotAllowed(f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                                          headers={"Allow": ", ".join(allowed)})
        raise errors.NotFound(f"no route {path}; see GET /openapi.json for the API", code="not_found")


class ClientGone(Exception):
    """The client closed its connection; nothing more can be written to it."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"sluice/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True
    request_id: str | None = None
    command = ""
    route_api = "openai"
    body = b""                  # the raw request body, as read_json read it
    bigs = None                 # its long strings, when read_json(big=True) left them in `body`
    req_body: Body | None = None
    linger = False              # close with a lingering read: the client may still be sending
    server: "Server"

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

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection:
            self.handle_one_request()
        if self.linger or self._input_pending():
            self._linger()

    def handle_one_request(self) -> None:
        """One request: framed, checked, routed, answered once. Every method goes through the route table
        (an unknown one is a JSON 405, never the stdlib's HTML 501)."""
        self._io.deadline = time.monotonic() + self.server.client_timeout_s
        self.request_id, self.req_body, self.close_connection = None, None, True
        conns = self.server.connections
        try:
            raw = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if raw in (b"\r\n", b"\n"):           # an empty line before a request is to be ignored (RFC 9112 2.2)
                raw = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not raw or not conns.busy(self.connection):
                return                             # the client closed, or the connection was shed meanwhile
            authority = self._read_head(raw)
            if authority is not False:
                self._dispatch(authority)
                if self.req_body is not None and not self.req_body.done:
                    self.close_connection = True   # a route answered without settling its body: never reuse
        except (Incomplete, ClientGone, OSError):  # gone, reset or too slow (TimeoutError): nothing to answer
            self.close_connection = True
        if not self.close_connection:
            conns.idle(self.connection)

    def _read_head(self, raw: bytes):
        """Parse the request head; the absolute-form authority (or None) to dispatch, False if answered."""
        try:
            if not raw.endswith(b"\n"):
                if len(raw) > MAX_REQUEST_LINE:
                    raise FramingError(f"request line longer than {MAX_REQUEST_LINE} bytes", status=414,
                                       code="uri_too_long")
                raise Incomplete()
            self.requestline = raw.rstrip(b"\r\n").decode("latin-1")
            self.command, self.path, self.request_version, authority = parse_request_line(raw)
            self.headers = read_fields(self.rfile)
            hosts = self.headers.get_all("Host") or []
            if len(hosts) > 1 or (not hosts and self.request_version == "HTTP/1.1" and authority is None):
                raise FramingError("an HTTP/1.1 request needs exactly one Host header (RFC 9112 section 3.2)")
            self.req_body = Body(self.rfile, self.headers, self._send_continue)
        except FramingError as e:
            self.close_connection = self.linger = True
            self.request_id, self.route_api, self.extra_headers = new_id(), "openai", {}
            self.respond_error(e)
            return False
        tokens = self.headers.get("Connection", "").lower()
        self.close_connection = "close" in tokens or (self.request_version == "HTTP/1.0" and "keep-alive" not in tokens)
        return authority

    def _send_continue(self) -> None:
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _input_pending(self) -> bool:
        """Bytes the client sent that nobody read: closing over them would reset the connection, and the
        client would lose the answer it has not read yet."""
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False

    def _linger(self) -> None:
        """Close as nginx does when input is left unread: send FIN, then read and drop what the client still
        sends (bounded in time and bytes), so its kernel does not discard our answer on a reset."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self._io.deadline = time.monotonic() + LINGER_S
            left = LINGER_BYTES
            while left > 0:
                n = len(self.rfile.read1(65536))
                if not n:
                    break
                left -= n
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-") -> None:
        pass  # one line per job is logged by the app, with its request id

    # ---- request side --------------------------------------------------------------------------------
    def _dispatch(self, authority: str | None) -> None:
        rid = self.headers.get("X-Request-Id", "")
        self.request_id = rid if _SAFE_ID.fullmatch(rid) else new_id()
        path = self.path.split("?", 1)[0]
        srv = self.server
        self.route_api = srv.routes.envelopes.get(path, "openai")
        self.extra_headers: dict[str, str] = {}
        try:
            cors = srv.guard.check(self.command, self.headers, authority)
            if cors:
                self.extra_headers.update(cors)
                if self.command == "OPTIONS":
                    preflight = srv.guard.preflight(cors, self.headers)
                    if preflight is not None:
                        return self.write_raw(self._head(204, "", preflight))
            route, params = srv.routes.match(self.command, path)
            self.route_api = route.api
            srv.authorize(self, route)
            route.fn(self, *params)
        except errors.SluiceError as e:
            self.respond_error(e)
        except (ClientGone, OSError):
            self.close_connection = True
        except Exception:
            log.exception("request %s %s %s failed", self.request_id, self.command, path)
            self.respond_error(errors.SluiceError(
                f"internal error in sluice (request id {self.request_id}); please report it"))
        finally:
            self.body, self.bigs = b"", None   # not kept while the connection waits for its next request

    def read_json(self, max_bytes: int, big: bool = False) -> dict:
        """The request body as a JSON object, bounded in size and nesting; a 4xx says what is wrong.

        `big`: the caller handles marks for long strings (bigjson.py), kept in `self.bigs` (None if none)."""
        if "Content-Length" not in self.headers and "Transfer-Encoding" not in self.headers:
            raise errors.LengthRequired("a JSON body is required: send it with Content-Length or "
                                        "Transfer-Encoding: chunked")
        try:
            data = self.req_body.read(max_bytes)
        except Incomplete:
            raise ClientGone() from None
        except errors.SluiceError:
            self.close_connection = self.linger = True      # what is left of the body is never read
            raise
        self._io.deadline = None          # the request is in; answering may take as long as it takes
        self._io.limit(self.server.client_timeout_s)       # and each write to the client this long
        self.body = data
        if _too_deep(data):
            raise errors.BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            if big:
                obj, self.bigs = bigjson.parse(data, _decode_bytes)
            else:
                obj = _decode_bytes(data)
        except (ValueError, RecursionError) as e:      # UnicodeDecodeError included
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
        """A response head: the status line, `lines` (each ending in CRLF), the request id, extra headers.

        The one place every answer passes before its first byte: a body the route left unread is
        dropped here (when small) or the answer says Connection: close, never leaving it on the wire."""
        b = self.req_body
        if b is not None and not b.done and (self.close_connection or not b.discard()):
            self.close_connection = self.linger = True
        extra = {**self.extra_headers, **headers} if headers else self.extra_headers
        reason = self.responses.get(status, _REASONS.get(status, ("",)))[0]
        head = f"HTTP/1.1 {status} {reason}\r\n{lines}X-Request-Id: {self.request_id}\r\n"
        fields = "".join([f"{k}: {v}\r\n" for k, v in extra.items()])
        if fields.count("\n") != len(extra) or fields.count("\r") != len(extra):
            # a CR or LF inside a value: no header value may ever split the head (response splitting)
            fields = "".join([f"{k}: {' '.join(str(v).splitlines())}\r\n" for k, v in extra.items()])
        head += fields
        if self.close_connection:
            head += "Connection: close\r\n"
        return (head + "\r\n").encode("latin-1", "replace")      # a value outside latin-1 becomes '?', not an error

    def respond_json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self.respond(status, compact_json(obj).encode(), headers=headers)

    def respond_error(self, err: errors.SluiceError, headers: dict[str, str] | None = None) -> None:
        """`err` in the error envelope of the route's API (errors.ENVELOPES), with that API's status."""
        if isinstance(err, errors.Cancelled):
            self.close_connection = True      # the client left (or half-closed): nothing more comes from it
        status, body = errors.ENVELOPES[self.route_api](err)
        self.respond_json(status, body, headers={**errors.response_headers(err), **(headers or {})})

    def start_sse(self, headers: dict[str, str] | None = None, content_type: str = "text/event-stream") -> None:
        """The head of a streamed answer (chunked): SSE by default, NDJSON for Ollama's API."""
        self.write_raw(self._head(200, f"Content-Type: {content_type}\r\nCache-Control: no-cache\r\n"
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
                 max_connections: int = 512, guard: BrowserGuard | None = None, max_connections_per_client: int = 128):
        self.routes = routes
        self.authorize = authorize
        self.client_timeout_s = client_timeout_s
        self.connections = Connections(max_connections, max_connections_per_client)
        self.guard = guard or BrowserGuard(address[0])
        self.watcher = DisconnectWatcher()
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        """At a cap with nothing idle to shed, answer 503 at once from the accept thread: no thread, no wait."""
        if not self.connections.admit(request, client_address[0]):
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
            self.connections.release(request)

    def handle_error(self, request, client_address) -> None:
        """A connection that fails (a client resetting it) is one log line, not a traceback on stderr."""
        exc = sys.exception()
        if isinstance(exc, OSError):
            log.info("connection from %s ended: %s", client_address[0], exc)
        else:
            log.error("connection from %s failed", client_address[0], exc_info=exc)

    def server_close(self) -> None:
        super().server_close()
        self.watcher.close()
