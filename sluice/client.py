"""The degrade-safe Python client. Every method returns a safe default on any failure; none raises.

    from sluice import sluice, P_CRITICAL
    text = sluice.query("fast", "What is 2+2?", priority=P_CRITICAL)   # "" if anything goes wrong
    for piece in sluice.chat_stream("fast", [{"role": "user", "content": "Hi"}]):
        print(piece, end="")

Degradation contract (the seed README's table):

    situation                         query() / chat()    health()            chat_stream()
    server down, reset, timed out     ""                  {"status": "down"}  ends, .error set
    server warming (503 + its body)   ""                  {"status": "warming", ...}   ends, .error set
    queue full (503), timeout (504)   ""                  -                   ends, .error set
    backend crashed                   ""                  {"status": "degraded", ...}  ends, .error set
    answer is not what sluice sends   ""                  {"status": "down", "error": "..."}  ends, .error

"Any failure" means any `Exception` (connection refused, DNS, timeouts, HTTP errors, truncated or non-JSON
or non-UTF-8 answers, arguments that cannot be sent as JSON, a malformed base URL...). `BaseException`s
that are not `Exception`s (KeyboardInterrupt, SystemExit) still propagate. The reason for a failure is
logged on the "sluice.client" logger (warning for query/chat, debug for health/queue_status, whose return
value already carries it); prompts, messages and the API key are never logged.

The base URL is resolved at each call, so setting SLUICE_URL / SLUICE_PORT after import works:
`base_url` if given, else $SLUICE_URL, else http://127.0.0.1:$SLUICE_PORT (default 5590). A trailing
"/" is dropped, a path prefix (a reverse proxy's) is kept, and a URL without a scheme gets "http://".
The API key is `api_key` if given, else $SLUICE_API_KEY, sent as `Authorization: Bearer <key>`.

`chat_stream()` returns an iterator of the answer's text pieces as they arrive; on any failure it just
ends, and its `error` then says why (None after a complete answer). Leaving the loop early: `close()` it,
or use it in a `with` block.

`sluice.aclient.AsyncSluiceClient` is the same client for asyncio: the same methods, the same table. Both
run the `Call`s that `ClientCore` builds, so what is sent, how an answer is read and what a failure returns
live here once; each client only moves the bytes. `resolve_url()` is the base URL rule for every caller
(the CLI and `sluice status` too).

Each call opens one short-lived connection (no shared state, so one client may be used from many threads).
`timeout` bounds the whole call: the connect, and every read against one deadline, so a server that
trickles bytes cannot stretch it either.
"""

from __future__ import annotations

import functools
import http.client
import inspect
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

log = logging.getLogger("sluice.client")

DEFAULT_PORT = 5590
HEALTH_TIMEOUT_S = 5.0                  # health() and queue_status() give up sooner than a generation call
MAX_RESPONSE_BYTES = 64 * 1024 * 1024   # a larger answer is not sluice's, and is refused rather than buffered
MAX_SERVER_TIMEOUT_S = 86400.0          # the largest `timeout` field sluice accepts on /v1/query
HEALTH_STATES = ("ok", "warming", "degraded", "down")
READ_CHUNK = 64 * 1024                  # the most one read asks for
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")   # visible ASCII: what a bearer token may be made of

try:
    from sluice import __version__ as _version
except ImportError:  # pragma: no cover - the package always defines it
    _version = "0"




class HTTPStatusError(Exception):
    """sluice (or whatever answered) replied with a status other than 200; carries its parsed body if any."""

    def __init__(self, status: int, obj: object):
        self.status = status
        self.obj = obj
        detail = ""
        if isinstance(obj, dict):
            # The server's own words (sluice never echoes a prompt in them), kept short.
            words = [str(obj[k])[:200] for k in ("status", "error") if isinstance(obj.get(k), (str, int))]
            if isinstance(obj.get("error"), dict) and isinstance(obj["error"].get("message"), str):
                words.append(obj["error"]["message"][:200])
            detail = ": " + " - ".join(words) if words else ""
        super().__init__(f"HTTP {status}{detail}")


def why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def resolve_url(base_url: str | None = None) -> str:
    """`base_url` if given, else $SLUICE_URL, else http://127.0.0.1:$SLUICE_PORT (5590); read now, not at
    import. Surrounding blanks and a trailing "/" are dropped; a URL without a scheme gets "http://"."""
    url = base_url or os.environ.get("SLUICE_URL") or \
        f"http://127.0.0.1:{os.environ.get('SLUICE_PORT') or DEFAULT_PORT}"
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def decode(status: int, raw: bytes) -> object:
    """A whole answer's body -> its JSON; raises HTTPStatusError for any status but 200."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except ValueError:
        if status != 200:
            raise HTTPStatusError(status, None) from None
        raise
    if status != 200:
        raise HTTPStatusError(status, obj)
    return obj


@dataclass(frozen=True)
class Target:
    """Where a call goes and the bytes it sends (the URL and the key checked, the body encoded)."""
    scheme: str
    host: str
    port: int | None
    path: str
    data: bytes | None
    headers: dict


@dataclass(frozen=True)
class Call:
    """One client call, whichever client runs it: what to send, how to read a 200's JSON into the return
    value (raising if it cannot), and the safe value to return instead when anything fails."""
    method: str
    path: str
    body: dict | None
    timeout: object
    answer: Callable[[object], object]
    failed: Callable[[Exception], object]
    headers: dict = field(default_factory=dict)


class ChatEvents:
    """Turns the bytes of an OpenAI chat stream into its text pieces; knows when it is complete."""

    MAX_LINE = 1 << 20      # no SSE line sluice sends comes near this; past it the stream is not sluice's

    def __init__(self):
        self._buf = b""
        self.done = False           # saw data: [DONE] with no error before it

    def feed(self, chunk: bytes):
        """Yields the text pieces of the lines `chunk` completes, in order; raises (after the pieces before
        it) on an error event or a line that is not SSE JSON. Check `.done` after each chunk."""
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        if len(self._buf) > self.MAX_LINE:
            raise ValueError(f"an event line longer than {self.MAX_LINE} bytes")
        for line in lines:
            line = line.rstrip(b"\r")
            if not line.startswith(b"data:"):
                continue            # blank lines, ": queued position=N" comments, event:/id: fields
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                return
            obj = json.loads(data.decode("utf-8"))
            if isinstance(obj, dict) and "error" in obj:
                raise HTTPStatusError(200, obj)     # sluice's mid-stream failure event
            try:
                choice = obj["choices"][0] if obj["choices"] else {}
            except (KeyError, IndexError, TypeError):
                raise ValueError("a stream event without choices") from None
            piece = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
            if isinstance(piece, str) and piece:
                yield piece


class ClientCore:
    """What SluiceClient and AsyncSluiceClient share: settings, the base URL, and each method's `Call`."""

    def __init__(self, base_url: str | None = None, timeout: float = 300.0, api_key: str | None = None):
        self.base_url = base_url
        self.timeout = timeout
        self.api_key = api_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, timeout={self.timeout!r})"

    @property
    def url(self) -> str:
        """The base URL this call would use (resolved now; see the module docstring)."""
        return resolve_url(self.base_url)

    def target(self, call: Call) -> Target:
        """Raises ValueError for a bad URL, a key no header can carry, or a body JSON cannot encode."""
        url = self.url
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"bad sluice URL {url!r}; want http://host:port")
        port = u.port                   # raises ValueError when out of range or not a number
        if re.search(r"[\x00-\x20\x7f]", u.path):
            raise ValueError(f"bad sluice URL {url!r}: its path has a blank or a control character")
        data = None if call.body is None else json.dumps(call.body, allow_nan=False).encode("utf-8")
        hdrs = {"Accept": "application/json", "Connection": "close", "User-Agent": f"sluice-client/{_version}"}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        key = self.api_key or os.environ.get("SLUICE_API_KEY")
        if key:
            if not isinstance(key, str) or not _HEADER_TOKEN.fullmatch(key):
                raise ValueError("the API key has characters an HTTP header cannot carry")  # never the key itself
            hdrs["Authorization"] = f"Bearer {key}"
        hdrs.update(call.headers)
        return Target(u.scheme, u.hostname, port, u.path.rstrip("/") + call.path, data, hdrs)

    def _short(self, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        try:
            return min(self.timeout, HEALTH_TIMEOUT_S)
        except TypeError:
            return HEALTH_TIMEOUT_S

    # ---- sluice-native -------------------------------------------------------------------------------
    def query_call(self, model: str, prompt: str, system: str | None = None, priority: int = 2,
                   max_tokens: int | None = None, temperature: float | None = None,
                   timeout: float | None = None) -> Call:
        """The model's answer to `prompt`, or "" on any failure (down, queue full, timeout, bad answer...).

        POSTs /v1/query with model, prompt, priority and whichever of system, max_tokens, temperature are
        not None. An explicit `timeout` (seconds) bounds this call and is also sent as the request's
        `timeout` field, so sluice drops the job from its queue when the caller stops waiting."""
        body = {"model": model, "prompt": prompt, "system": system, "priority": priority,
                "max_tokens": max_tokens, "temperature": temperature}
        body = {k: v for k, v in body.items() if v is not None}
        if type(timeout) in (int, float) and 0 < timeout <= MAX_SERVER_TIMEOUT_S:
            body["timeout"] = timeout

        def answer(obj):
            if not isinstance(obj, dict):
                raise ValueError(f"answer is a JSON {type(obj).__name__}, not an object")
            result = obj.get("result")
            if obj.get("status", "ok") != "ok" or not isinstance(result, str):
                raise ValueError(f"answer has status {str(obj.get('status'))[:40]!r} and a "
                                 f"{type(result).__name__} result, not status 'ok' and a string")
            return result

        def failed(e):
            log.warning("sluice query (model %.80r) failed: %s", model, why(e))
            return ""
        return Call("POST", "/v1/query", body, self.timeout if timeout is None else timeout, answer, failed)

    def health_call(self, timeout: float | None = None) -> Call:
        """sluice's health document; never raises.

        - sluice cannot be reached (refused, reset, timed out, bad URL): exactly {"status": "down"}
        - a JSON object with a string "status" on 200: that object (status ok, warming or degraded)
        - a JSON object on another HTTP status whose "status" is ok/warming/degraded/down (sluice may answer
          503 while warming or degraded): that object
        - anything else (not JSON, not an object, no status, an error body): {"status": "down", "error": why}
        `timeout` defaults to the smaller of the client's timeout and HEALTH_TIMEOUT_S."""
        def answer(obj):
            if isinstance(obj, dict) and isinstance(obj.get("status"), str):
                return obj
            raise ValueError(f"answer is not a health document (a JSON {type(obj).__name__}" +
                             (" without a string 'status')" if isinstance(obj, dict) else ")"))

        def failed(e):
            if isinstance(e, HTTPStatusError) and isinstance(e.obj, dict) and e.obj.get("status") in HEALTH_STATES:
                return e.obj
            log.debug("sluice health: down: %s", why(e))
            if isinstance(e, OSError):  # refused, reset, timed out, DNS, TLS: the table's "server down"
                return {"status": "down"}
            return {"status": "down", "error": why(e)}   # it answered, but not a health document
        return Call("GET", "/v1/health", None, self._short(timeout), answer, failed)

    def queue_status_call(self, timeout: float | None = None) -> Call:
        """The queue counters (pending, active, total_served, ...) as sluice reports them; never raises.

        On any failure the answer is a dict with only an "error" key saying why ({"error": "HTTP 503: ..."},
        {"error": "ConnectionRefusedError: ..."}), so `qs.get("pending", 0)` stays safe and `"error" in qs`
        tells a failure apart. `timeout` defaults to the smaller of the client's timeout and HEALTH_TIMEOUT_S."""
        def answer(obj):
            if isinstance(obj, dict):
                return obj
            raise ValueError(f"answer is a JSON {type(obj).__name__}, not an object")

        def failed(e):
            log.debug("sluice queue_status failed: %s", why(e))
            return {"error": why(e)}
        return Call("GET", "/v1/queue/status", None, self._short(timeout), answer, failed)

    # ---- OpenAI-compatible ---------------------------------------------------------------------------
    def chat_call(self, model: str, messages: list, priority: int = 2, *, timeout: float | None = None,
                  **params) -> Call:
        """OpenAI-style chat through sluice: choices[0].message.content, or "" on any failure.

        `params` (max_tokens, temperature, ...) go into the request body; the priority goes in the
        X-Sluice-Priority header. Always a non-streaming request: a `stream` parameter is dropped."""
        params.pop("stream", None)

        def answer(obj):
            try:
                text = obj["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise ValueError("answer has no choices[0].message.content") from None
            if not isinstance(text, str):
                raise ValueError(f"choices[0].message.content is a {type(text).__name__}, not a string")
            return text

        def failed(e):
            log.warning("sluice chat (model %.80r) failed: %s", model, why(e))
            return ""
        return Call("POST", "/v1/chat/completions", {"model": model, "messages": messages, **params},
                    self.timeout if timeout is None else timeout, answer, failed,
                    {"X-Sluice-Priority": str(priority)})

    def chat_stream_call(self, model: str, messages: list, priority: int = 2, *, timeout: float | None = None,
                         **params) -> Call:
        """The answer's text pieces as they arrive (an iterator); on any failure it ends early and its
        `error` says why. `timeout` bounds the whole stream, queueing included."""
        call = self.chat_call(model, messages, priority, timeout=timeout, **params)

        def failed(e):
            log.warning("sluice chat_stream (model %.80r) failed: %s", model, why(e))
            return why(e)
        return Call(call.method, call.path, {**call.body, "stream": True}, call.timeout, call.answer, failed,
                    {**call.headers, "Accept": "text/event-stream"})


def method(builder: Callable, runner: str = "run") -> Callable:
    """A client method made from a ClientCore call builder: its signature and docstring, run by the
    client's `runner` (AsyncSluiceClient has its own `method`, whose result is awaited)."""
    @functools.wraps(builder)
    def run(self, *args, **kwargs):
        return getattr(self, runner)(builder(self, *args, **kwargs))
    run.__name__ = run.__qualname__ = builder.__name__.removesuffix("_call")
    # The builder's parameters, not its `-> Call`: the method returns what the call's docstring says.
    run.__signature__ = inspect.signature(builder).replace(return_annotation=inspect.Signature.empty)
    return run


class Stream:
    """What `chat_stream` returns: an iterator of text pieces that never raises; `error` once it ends
    (None after a complete answer). `close()` (or a `with` block) lets go of the connection early."""

    def __init__(self, pieces):
        self._pieces = pieces
        self.error: str | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Exchange:
    """One request on its own connection; every read is held to the call's one deadline."""

    def __init__(self, target: Target, call: Call):
        timeout = call.timeout
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        self._conn = cls(target.host, target.port, timeout=self._remaining())
        self._resp = None
        try:
            self._conn.request(call.method, target.path, body=target.data, headers=target.headers)
            self._sock = self._conn.sock    # kept: getresponse() hands a closing connection's socket to the response
            self._sock.settimeout(self._remaining())
            self._resp = self._conn.getresponse()
        except BaseException:
            self._conn.close()
            raise
        self.status = self._resp.status

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete answer within {self._timeout:g}s")
        return left

    def read1(self) -> bytes:
        """What the next read brings; b"" at the end. Raises IncompleteRead if the body was cut short."""
        if not self._resp.isclosed():   # (once it is, the socket may be closed too)
            self._sock.settimeout(self._remaining())
            chunk = self._resp.read1(READ_CHUNK)    # read() would wait for all of it
            if chunk:
                return chunk
        if self._resp.length:           # Content-Length promised more than arrived (read1 does not raise it)
            raise http.client.IncompleteRead(b"", self._resp.length)
        return b""

    def body(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := self.read1():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise ValueError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def __enter__(self) -> "_Exchange":
        return self

    def __exit__(self, *exc) -> None:
        if self._resp is not None:
            self._resp.close()
        self._conn.close()


class SluiceClient(ClientCore):
    """The blocking client (http.client); see the module docstring."""

    def run(self, call: Call):
        """`call`'s return value: its answer to a 200's JSON, or its safe default on any failure."""
        try:
            with _Exchange(self.target(call), call) as ex:
                return call.answer(decode(ex.status, ex.body()))
        except Exception as e:
            return call.failed(e)

    def run_stream(self, call: Call) -> Stream:
        def pieces():
            try:
                with _Exchange(self.target(call), call) as ex:
                    if ex.status != 200:
                        decode(ex.status, ex.body())        # raises, with sluice's own words
                    events = ChatEvents()
                    while not events.done:
                        chunk = ex.read1()
                        if not chunk:
                            raise ConnectionError("the stream ended before data: [DONE]")
                        yield from events.feed(chunk)
            except Exception as e:
                stream.error = call.failed(e)
        stream = Stream(pieces())
        return stream

    query = method(ClientCore.query_call)
    health = method(ClientCore.health_call)
    queue_status = method(ClientCore.queue_status_call)
    chat = method(ClientCore.chat_call)
    chat_stream = method(ClientCore.chat_stream_call, "run_stream")


sluice = SluiceClient()
