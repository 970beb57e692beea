"""The browser threat model: any web page the user has open may send requests to 127.0.0.1.

Two attacks, two checks, both before any work is done:
- DNS rebinding: a page on evil.example re-points its name at 127.0.0.1, and the browser then treats
  sluice as evil.example's own server, answers readable. Its requests carry `Host: evil.example`, so
  Host must name this machine: an IP literal (a rebinding needs a name), `localhost` or `*.localhost`,
  this machine's host name, the bind address, or an `allowed_hosts` entry (`*` allows any).
- Cross-site requests: a page anywhere may POST to sluice with `mode: "no-cors"` (text/plain, no
  preflight); it cannot read the answer, but the request runs (a drain, a GPU-hour of generation).
  Browsers send `Origin` on every cross-origin POST and `Sec-Fetch-Site` on every request, so a request
  carrying either is served only when it is same-origin or from a configured `cors_origins` entry.
  A top-level navigation (a link to the dashboard) is let through for GET and HEAD: it cannot read
  anything from another origin, and it is how a person opens the page.
Clients that are not browsers send neither header and are served exactly as before.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from sluice import errors

_REQUEST_HEADERS = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
EXPOSED = "X-Request-Id, X-Sluice-Backend, X-Sluice-Queue-Wait-Ms, X-Sluice-Priority-Clamped, Retry-After"


def host_name(host: str) -> str:
    """The name part of a Host value (port and IPv6 brackets removed), lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BrowserGuard:
    """Host allowlist, Origin / Sec-Fetch-Site checks and the CORS answers for configured origins."""

    def __init__(self, bind_host: str, allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = ()):
        names = {"localhost", bind_host.lower(), socket.gethostname().lower()}
        names.update(h.lower() for h in allowed_hosts)
        self.any_host = "*" in names
        self.hosts = frozenset(names)
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins)
        self._good: set[str] = set()

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        return self.any_host or name in self.hosts or is_ip(name) or name.endswith(".localhost")

    def check(self, method: str, headers, authority: str | None) -> dict[str, str]:
        """Raise what refuses the request; return the CORS headers its answer needs (usually none)."""
        host = authority if authority is not None else headers.get("Host", "")   # HTTP/1.0 may omit it
        if host not in self._good and not self.host_allowed(host):
            err = errors.Forbidden(f"Host {host[:80]!r} is not a name of this machine, so sluice refuses it "
                                   "(DNS-rebinding protection); if you reach sluice by that name, add it to "
                                   "allowed_hosts (SLUICE_ALLOWED_HOSTS)", code="host_not_allowed")
            err.status = 421
            raise err
        if len(self._good) < 64:            # a client sends the same Host every time: checked once
            self._good.add(host)
        origin = headers.get("Origin")
        if origin is None:
            site = headers.get("Sec-Fetch-Site")
            if site is None or site in ("same-origin", "none"):
                return {}
            if method in ("GET", "HEAD") and headers.get("Sec-Fetch-Mode") == "navigate":
                return {}
            raise errors.Forbidden(f"a {site} browser request is refused; open sluice's own page, or add the "
                                   "page's origin to cors_origins (SLUICE_CORS_ORIGINS)", code="cross_site")
        origin = origin.rstrip("/").lower()
        if origin == f"http://{host.lower()}":
            return {}
        if self.any_origin or origin in self.origins:
            return {"Access-Control-Allow-Origin": headers.get("Origin"), "Vary": "Origin",
                    "Access-Control-Expose-Headers": EXPOSED}
        raise errors.Forbidden(f"requests from the web page at {origin[:80]!r} are refused (cross-site); "
                               "to let that page use sluice, add it to cors_origins (SLUICE_CORS_ORIGINS)",
                               code="origin_not_allowed")

    def preflight(self, cors: dict[str, str], headers) -> dict[str, str] | None:
        """The headers of a 204 answer to a CORS preflight from an allowed origin, else None."""
        if not cors or headers.get("Access-Control-Request-Method") is None:
            return None
        out = {**cors, "Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600"}
        asked = headers.get("Access-Control-Request-Headers", "")
        if asked and len(asked) <= 1024 and _REQUEST_HEADERS.fullmatch(asked):
            out["Access-Control-Allow-Headers"] = asked
        return out
