"""The degrade-safe Python client. Every method returns a safe default on any failure; none raises.

    from sluice import sluice, P_CRITICAL
    text = sluice.query("fast", "What is 2+2?", priority=P_CRITICAL)   # "" if anything goes wrong

The base URL is resolved at each call (so setting SLUICE_URL / SLUICE_PORT after import works):
`base_url` if given, else SLUICE_URL, else http://127.0.0.1:$SLUICE_PORT (default 5590).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
from urllib.parse import urlsplit

log = logging.getLogger("sluice.client")


class SluiceClient:
    def __init__(self, base_url: str | None = None, timeout: float = 300.0, api_key: str | None = None):
        self.base_url = base_url
        self.timeout = timeout
        self.api_key = api_key

    def _base(self) -> str:
        url = self.base_url or os.environ.get("SLUICE_URL") or \
            f"http://127.0.0.1:{os.environ.get('SLUICE_PORT', '5590')}"
        return url.rstrip("/")

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
              headers: dict | None = None) -> tuple[int, object]:
        """(status, parsed JSON). Raises; the public methods turn every failure into their safe default."""
        u = urlsplit(self._base())
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"bad sluice URL {self._base()!r}")
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = cls(u.hostname, u.port, timeout=timeout or self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            key = self.api_key or os.environ.get("SLUICE_API_KEY")
            if key:
                hdrs["Authorization"] = f"Bearer {key}"
            conn.request(method, u.path.rstrip("/") + path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read().decode("utf-8"))
        finally:
            conn.close()

    def query(self, model: str, prompt: str, system: str | None = None, priority: int = 2,
              max_tokens: int | None = None, temperature: float | None = None, timeout: float | None = None) -> str:
        """The model's answer, or "" on any failure (down, queue full, timeout, bad answer...)."""
        body = {"model": model, "prompt": prompt, "system": system, "priority": priority,
                "max_tokens": max_tokens, "temperature": temperature}
        try:
            status, obj = self._call("POST", "/v1/query", {k: v for k, v in body.items() if v is not None}, timeout)
            if status == 200 and isinstance(obj, dict) and isinstance(obj.get("result"), str):
                return obj["result"]
            log.warning("sluice query failed: HTTP %s %s", status,
                        obj.get("error") if isinstance(obj, dict) else type(obj).__name__)
        except Exception as e:
            log.warning("sluice query failed: %s: %s", type(e).__name__, e)
        return ""

    def chat(self, model: str, messages: list, priority: int = 2, timeout: float | None = None, **params) -> str:
        """OpenAI-style chat through sluice; the reply text, or "" on any failure."""
        try:
            status, obj = self._call("POST", "/v1/chat/completions", {"model": model, "messages": messages, **params},
                                     timeout, headers={"X-Sluice-Priority": str(priority)})
            text = obj["choices"][0]["message"]["content"] if status == 200 else None
            if isinstance(text, str):
                return text
            log.warning("sluice chat failed: HTTP %s", status)
        except Exception as e:
            log.warning("sluice chat failed: %s: %s", type(e).__name__, e)
        return ""

    def health(self) -> dict:
        """sluice's health document; {"status": "down"} when it cannot be reached or answers nonsense."""
        try:
            _, obj = self._call("GET", "/v1/health", timeout=5)
            if isinstance(obj, dict) and isinstance(obj.get("status"), str):
                return obj
            return {"status": "down", "error": "sluice answered something that is not a health document"}
        except Exception as e:
            return {"status": "down", "error": f"{type(e).__name__}: {e}"}

    def queue_status(self) -> dict:
        """The queue counters; {"error": ...} (and nothing else) when they cannot be read."""
        try:
            status, obj = self._call("GET", "/v1/queue/status", timeout=5)
            if status == 200 and isinstance(obj, dict):
                return obj
            return {"error": f"HTTP {status}"}
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}


sluice = SluiceClient()
