"""HTTP/1.1 request framing (RFC 9112): where one request ends and the next begins.

The head is read within one byte budget (counted while reading, never after), every field that frames
the message is checked strictly, and the body is read or discarded to its exact end. A request whose
framing is in doubt is answered and its connection closed: a byte left on the wire must never be read
as the start of another request (request smuggling, "CL.0" desync).
"""

from __future__ import annotations

import re

from sluice import errors

MAX_REQUEST_LINE = 16 * 1024
MAX_HEADER_BYTES = 32 * 1024    # every header line, CRLF included (trailers of a chunked body too)
MAX_HEADERS = 100
MAX_CHUNK_LINE = 1024
DISCARD_MAX = 64 * 1024         # an unread body up to this size is read and dropped to keep the connection

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_GOOD_NAMES: set[str] = set()                 # header names already found to be tokens
_CTL = re.compile(rb"[\x00-\x20\x7f]")
_METHODS = frozenset((b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"PATCH"))
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_VERSIONS = {b"HTTP/1.1": "HTTP/1.1", b"HTTP/1.0": "HTTP/1.0"}


class FramingError(errors.BadRequest):
    """The request's framing is broken: answered, and the connection closed after the answer."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request_framing"):
        super().__init__(message, code=code)
        self.status = status


class Incomplete(Exception):
    """The client closed (or stopped sending) before the request was whole: nothing to answer."""


def header_int(value: str, name: str, max_digits: int = 18) -> int:
    """A number in a header: ASCII 1*DIGIT, at most `max_digits` long; FramingError otherwise."""
    value = value.strip(" \t")
    if not (0 < len(value) <= max_digits and value.isascii() and value.isdigit()):   # '²'.isdigit() is True
        raise FramingError(f"{name} must be a non-negative integer of at most {max_digits} ASCII digits, "
                           f"got {value[:40]!r}")
    return int(value)


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


def parse_request_line(raw: bytes) -> tuple[str, str, str, str | None]:
    """(method, path, version, authority) from a request line; `authority` is set for the absolute form
    (`POST http://host:port/path HTTP/1.1`, which a server MUST accept: RFC 9112 section 3.2.2)."""
    words = raw.rstrip(b"\r\n").split(b" ")
    if len(words) != 3 or not words[1] or (words[0] not in _METHODS and not _TOKEN.fullmatch(words[0])):
        raise FramingError(f"bad request line {raw[:80]!r}; expected 'METHOD /path HTTP/1.1'")
    method, target, version = words
    if version not in _VERSIONS:
        if version.startswith(b"HTTP/") and version[5:6].isdigit():
            raise FramingError(f"HTTP version {version[:16].decode('latin-1')} is not supported; use HTTP/1.1",
                               status=505, code="http_version_not_supported")
        raise FramingError(f"bad request line {raw[:80]!r}; expected 'METHOD /path HTTP/1.1'")
    authority = None
    if target[:1] != b"/" and target != b"*":
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise FramingError(f"bad request target {target[:80]!r}; send a path such as /v1/query")
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, target = rest[:cut], (rest[cut:] or b"/")
        if target[:1] == b"?":
            target = b"/" + target
        authority = authority.decode("latin-1")
    if _CTL.search(target):
        raise FramingError("request target has control characters or spaces")
    return method.decode("latin-1"), target.decode("latin-1"), _VERSIONS[version], authority


def read_fields(rfile, budget: int = MAX_HEADER_BYTES, what: str = "request headers") -> Headers:
    """Header (or trailer) lines up to the blank line, never buffering more than `budget` bytes."""
    headers = Headers()
    for _ in range(MAX_HEADERS + 1):
        raw = rfile.readline(budget + 2)          # + the blank line that ends them, not counted
        if raw in (b"\r\n", b"\n"):
            return headers
        if len(raw) > budget:
            raise FramingError(f"{what} exceed {MAX_HEADER_BYTES} bytes", status=431, code="headers_too_large")
        if not raw.endswith(b"\n"):
            raise Incomplete()
        budget -= len(raw)
        name, sep, value = raw.decode("latin-1").partition(":")
        if name not in _GOOD_NAMES:
            if not sep or not _NAME.fullmatch(name):
                if raw[0] in b" \t":
                    raise FramingError("obsolete line folding in headers is not accepted; send each header on one line")
                raise FramingError(f"bad header line {raw[:60]!r}; expected 'Name: value'")
            if len(_GOOD_NAMES) < 512:          # the names clients send are few: each is checked once
                _GOOD_NAMES.add(name)
        value = value.strip(" \t\r\n")
        if "\r" in value or "\0" in value:
            raise FramingError(f"header {name[:40]} has a bare CR or NUL")
        headers.add(name, value)
    raise FramingError(f"more than {MAX_HEADERS} header lines", status=431, code="headers_too_large")


class Body:
    """A request's body as its head frames it: Content-Length, chunked, or none.

    `read()` returns it whole (bounded); `discard()` drops what is left. `done` is True once the last
    byte is off the wire, which is when the connection may carry another request.
    """

    __slots__ = ("rfile", "left", "chunked", "done", "_continue")

    def __init__(self, rfile, headers: Headers, send_continue=None):
        self.rfile = rfile
        self.chunked = False
        self.left = 0
        te = headers.get_all("Transfer-Encoding")
        cl = headers.get_all("Content-Length")
        if te is None and cl is None:         # no body: the usual GET
            self.done, self._continue = True, None
            return
        if te is not None:
            if cl is not None:
                raise FramingError("Content-Length together with Transfer-Encoding is not accepted; send one")
            codings = [c.strip().lower() for v in te for c in v.split(",")]
            if codings != ["chunked"]:
                raise FramingError(f"Transfer-Encoding {', '.join(te)[:60]!r} is not supported; send the body "
                                   "with Content-Length or Transfer-Encoding: chunked", status=501,
                                   code="not_implemented")
            self.chunked = True
        elif cl is not None:
            if len(cl) != 1:
                raise FramingError("more than one Content-Length header")
            self.left = header_int(cl[0], "Content-Length")
        self.done = not self.chunked and self.left == 0
        # Answer "100 Continue" only when the body is about to be read: a request answered before that
        # (404, 401) closes instead, so the client never sends a body nobody reads.
        self._continue = send_continue if not self.done and \
            (headers.get("Expect") or "").lower() == "100-continue" else None

    @property
    def waiting_for_continue(self) -> bool:
        """The client holds its body back until told to send it (Expect: 100-continue)."""
        return self._continue is not None

    def read(self, max_bytes: int, limit_hint: str = "SLUICE_MAX_BODY_BYTES") -> bytes:
        """The whole body, at most `max_bytes` (PayloadTooLarge beyond, counted while reading)."""
        if self.done:
            return b""
        if not self.chunked and self.left > max_bytes:
            raise errors.PayloadTooLarge(f"body is {self.left} bytes; the limit is {max_bytes} ({limit_hint})")
        self._send_continue()
        if not self.chunked:
            data = self.rfile.read(self.left)
            if len(data) < self.left:
                raise Incomplete()
            self.left, self.done = 0, True
            return data
        parts: list[bytes] = []
        self._chunks(max_bytes, parts.append, limit_hint)
        return b"".join(parts)

    def discard(self, max_bytes: int = DISCARD_MAX) -> bool:
        """Read and drop the rest of the body if it is at most `max_bytes`; whether it is all gone.
        A client still waiting for "100 Continue" has sent nothing to drop: False (close instead)."""
        if self.done:
            return True
        if self._continue is not None or (not self.chunked and self.left > max_bytes):
            return False
        try:
            if self.chunked:
                self._chunks(max_bytes, None, "")
            else:
                while self.left:
                    got = len(self.rfile.read(min(self.left, 65536)))
                    if not got:
                        return False
                    self.left -= got
                self.done = True
        except (errors.SluiceError, Incomplete, OSError):
            return False
        return True

    def _send_continue(self) -> None:
        if self._continue is not None:
            send, self._continue = self._continue, None
            send()

    def _chunks(self, max_bytes: int, keep, limit_hint: str) -> None:
        """Decode chunks (extensions ignored, trailers read and dropped) within `max_bytes` of data."""
        total = 0
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
            if not line.endswith(b"\n"):
                if len(line) > MAX_CHUNK_LINE:
                    raise FramingError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                raise Incomplete()
            size = line.split(b";", 1)[0].strip(b" \t\r\n")
            if not _HEX.fullmatch(size):
                raise FramingError(f"bad chunk size {line[:40]!r}; expected hexadecimal digits")
            n = int(size, 16)
            if n == 0:
                read_fields(self.rfile, what="chunked body trailers")
                self.done = True
                return
            total += n
            if total > max_bytes:
                raise errors.PayloadTooLarge(f"chunked body exceeds the limit of {max_bytes} bytes ({limit_hint})"
                                             if limit_hint else "chunked body too large to discard")
            data = self.rfile.read(n)
            if len(data) < n:
                raise Incomplete()
            if keep is not None:
                keep(data)
            end = self.rfile.readline(3)
            if end not in (b"\r\n", b"\n"):
                if not end:
                    raise Incomplete()
                raise FramingError("chunk data not followed by CRLF; the chunk size is wrong")
