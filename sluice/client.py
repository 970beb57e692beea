"""The degrade-safe Python client. Every method returns a safe default on any failure; none raises.

    from sluice import sluice, P_CRITICAL
    text = sluice.query("fast", "What is 2+2?", priority=P_CRITICAL)   # "" if anything goes wrong

Degradation contract (the seed README's table):

    situation                         query() / chat()    health()
    server down, reset, timed out     ""                  {"status": "down"}
    server warming (503 + its body)   ""                  {"status": "warming", ...}
    queue full (503), timeout (504)   ""                  -
    backend crashed                   ""                  {"status": "degraded", ...}
    answer is not what sluice sends   ""                  {"status": "down", "error": "..."}

"Any failure" means any `Exception` (connection refused, DNS, timeouts, HTTP errors, truncated or non-JSON
or non-UTF-8 answers, arguments that cannot be sent as JSON, a malformed base URL...). `BaseException`s
that are not `Exception`s (KeyboardInterrupt, SystemExit) still propagate. The reason for a failure is
logged on the "sluice.client" logger (warning for query/chat, debug for health/queue_status, whose return
value already carries it); prompts, messages and the API key are never logged.

The base URL is resolved at each call, so setting SLUICE_URL / SLUICE_PORT after import works:
`base_url` if given, else $SLUICE_URL, else http://127.0.0.1:$SLUICE_PORT (default 5590). A trailing
"/" is dropped, a path prefix (a reverse proxy's) is kept, and a URL without a scheme gets "http://".
The API key is `api_key` if given, else $SLUICE_API_KEY, sent as `Authorization: Bearer <key>`.

Each call opens one short-lived connection (no shared state, so one client may be used from many threads).
`timeout` bounds the whole call: the connect, and every read against one deadline, so a server that
trickles bytes cannot stretch it either.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
from urllib.parse import urlsplit

log = logging.getLogger("sluice.client")

DEFAULT_PORT = 5590
HEALTH_TIMEOUT_S = 5.0                  # health() and queue_status() give up sooner than a generation call
MAX_RESPONSE_BYTES = 64 * 1024 * 1024   # a larger answer is not sluice's, and is refused rather than buffered
MAX_SERVER_TIMEOUT_S = 86400.0          # the largest `timeout` field sluice accepts on /v1/query
HEALTH_STATES = ("ok", "warming", "degraded", "down")
_CHUNK = 64 * 1024
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")   # visible ASCII: what a bearer token may be made of

try:
    from sluice import __version__ as _version
except ImportError:  # pragma: no cover - the package always defines it
    _version = "0"


class _HTTPError(Exception):
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


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class SluiceClient:
    def __init__(self, base_url: str | None = None, timeout: float = 300.0, api_key: str | None = None):
        self.base_url = base_url
        self.timeout = timeout
        self.api_key = api_key

    def __repr__(self) -> str:
        return f"SluiceClient({self.base_url!r}, timeout={self.timeout!r})"

    # ---- plumbing ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL this call would use (resolved now; see the module docstring)."""
        url = self.base_url or os.environ.get("SLUICE_URL") or \
            f"http://127.0.0.1:{os.environ.get('SLUICE_PORT') or DEFAULT_PORT}"
        url = url.strip()
        if "://" not in url:
            url = "http://" + url
        return url.rstrip("/")

    def _exchange(self, method: str, path: str, body: dict | None, timeout: float,
                  headers: dict | None = None) -> tuple[int, object]:
        """(HTTP status, parsed JSON body). Raises on anything else; the public methods catch it all."""
        url = self.url
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"bad sluice URL {url!r}; want http://host:port")
        data = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        hdrs = {"Accept": "application/json", "Connection": "close", "User-Agent": f"sluice-client/{_version}"}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        key = self.api_key or os.environ.get("SLUICE_API_KEY")
        if key:
            if not isinstance(key, str) or not _HEADER_TOKEN.fullmatch(key):
                raise ValueError("the API key has characters an HTTP header cannot carry")  # never the key itself
            hdrs["Authorization"] = f"Bearer {key}"
        hdrs.update(headers or {})

        deadline = time.monotonic() + timeout

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete answer within {timeout:g}s")
            return left

        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = cls(u.hostname, u.port, timeout=remaining())
        resp = None
        try:
            conn.request(method, u.path.rstrip("/") + path, body=data, headers=hdrs)
            sock = conn.sock            # kept: getresponse() hands a closing connection's socket to the response
            sock.settimeout(remaining())
            resp = conn.getresponse()
            chunks: list[bytes] = []
            size = 0
            while not resp.isclosed():  # (once it is, the socket may be closed too)
                sock.settimeout(remaining())
                chunk = resp.read1(_CHUNK)    # what one read brings: read() would wait for all of it
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise ValueError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(chunk)
            if resp.length:             # Content-Length promised more than arrived (read1 does not raise it)
                raise http.client.IncompleteRead(b"".join(chunks), resp.length)
            raw = b"".join(chunks)
            try:
                obj = json.loads(raw.decode("utf-8"))
            except ValueError:
                if resp.status != 200:
                    raise _HTTPError(resp.status, None) from None
                raise
            if resp.status != 200:
                raise _HTTPError(resp.status, obj)
            return resp.status, obj
        finally:
            if resp is not None:
                resp.close()
            conn.close()

    # ---- sluice-native -------------------------------------------------------------------------------
    def query(self, model: str, prompt: str, system: str | None = None, priority: int = 2,
              max_tokens: int | None = None, temperature: float | None = None, timeout: float | None = None) -> str:
        """The model's answer to `prompt`, or "" on any failure (down, queue full, timeout, bad answer...).

        POSTs /v1/query with model, prompt, priority and whichever of system, max_tokens, temperature are
        not None. An explicit `timeout` (seconds) bounds this call and is also sent as the request's
        `timeout` field, so sluice drops the job from its queue when the caller stops waiting."""
        try:
            body = {"model": model, "prompt": prompt, "system": system, "priority": priority,
                    "max_tokens": max_tokens, "temperature": temperature}
            body = {k: v for k, v in body.items() if v is not None}
            if type(timeout) in (int, float) and 0 < timeout <= MAX_SERVER_TIMEOUT_S:
                body["timeout"] = timeout
            _, obj = self._exchange("POST", "/v1/query", body, self.timeout if timeout is None else timeout)
            if not isinstance(obj, dict):
                raise ValueError(f"answer is a JSON {type(obj).__name__}, not an object")
            result = obj.get("result")
            if obj.get("status", "ok") != "ok" or not isinstance(result, str):
                raise ValueError(f"answer has status {str(obj.get('status'))[:40]!r} and a "
                                 f"{type(result).__name__} result, not status 'ok' and a string")
            return result
        except Exception as e:
            log.warning("sluice query (model %.80r) failed: %s", model, _why(e))
        return ""

    def health(self, timeout: float | None = None) -> dict:
        """sluice's health document; never raises.

        - sluice cannot be reached (refused, reset, timed out, bad URL): exactly {"status": "down"}
        - a JSON object with a string "status" on 200: that object (status ok, warming or degraded)
        - a JSON object on another HTTP status whose "status" is ok/warming/degraded/down (sluice may answer
          503 while warming or degraded): that object
        - anything else (not JSON, not an object, no status, an error body): {"status": "down", "error": why}
        `timeout` defaults to the smaller of the client's timeout and HEALTH_TIMEOUT_S."""
        try:
            _, obj = self._exchange("GET", "/v1/health", None, self._short(timeout))
            if isinstance(obj, dict) and isinstance(obj.get("status"), str):
                return obj
            why = f"answer is not a health document (a JSON {type(obj).__name__}" + \
                  (" without a string 'status')" if isinstance(obj, dict) else ")")
        except _HTTPError as e:
            if isinstance(e.obj, dict) and e.obj.get("status") in HEALTH_STATES:
                return e.obj
            why = str(e)
        except OSError as e:            # refused, reset, timed out, DNS, TLS: the table's "server down"
            log.debug("sluice health: down: %s", _why(e))
            return {"status": "down"}
        except Exception as e:          # it answered, but not HTTP + JSON (bad status line, truncated, garbage)
            why = _why(e)
        log.debug("sluice health: down: %s", why)
        return {"status": "down", "error": why}

    def queue_status(self, timeout: float | None = None) -> dict:
        """The queue counters (pending, active, total_served, ...) as sluice reports them; never raises.

        On any failure the answer is a dict with only an "error" key saying why ({"error": "HTTP 503: ..."},
        {"error": "ConnectionRefusedError: ..."}), so `qs.get("pending", 0)` stays safe and `"error" in qs`
        tells a failure apart. `timeout` defaults to the smaller of the client's timeout and HEALTH_TIMEOUT_S."""
        try:
            _, obj = self._exchange("GET", "/v1/queue/status", None, self._short(timeout))
            if isinstance(obj, dict):
                return obj
            raise ValueError(f"answer is a JSON {type(obj).__name__}, not an object")
        except Exception as e:
            log.debug("sluice queue_status failed: %s", _why(e))
            return {"error": _why(e)}

    # ---- OpenAI-compatible ---------------------------------------------------------------------------
    def chat(self, model: str, messages: list, priority: int = 2, *, timeout: float | None = None,
             **params) -> str:
        """OpenAI-style chat through sluice: choices[0].message.content, or "" on any failure.

        `params` (max_tokens, temperature, ...) go into the request body; the priority goes in the
        X-Sluice-Priority header. Always a non-streaming request: a `stream` parameter is dropped."""
        try:
            params.pop("stream", None)
            body = {"model": model, "messages": messages, **params}
            _, obj = self._exchange("POST", "/v1/chat/completions", body,
                                    self.timeout if timeout is None else timeout,
                                    headers={"X-Sluice-Priority": str(priority)})
            try:
                text = obj["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise ValueError("answer has no choices[0].message.content") from None
            if not isinstance(text, str):
                raise ValueError(f"choices[0].message.content is a {type(text).__name__}, not a string")
            return text
        except Exception as e:
            log.warning("sluice chat (model %.80r) failed: %s", model, _why(e))
        return ""

    def _short(self, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        try:
            return min(self.timeout, HEALTH_TIMEOUT_S)
        except TypeError:
            return HEALTH_TIMEOUT_S


sluice = SluiceClient()
