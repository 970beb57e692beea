"""`sluice status [--watch]`: a compact view of a running sluice, from GET /admin/status."""

from __future__ import annotations

import sys
import time

from sluice.client import Call, SluiceClient, why


def _document(obj: object) -> dict:
    if not isinstance(obj, dict):
        raise ValueError("/admin/status answered something other than a JSON object")
    return obj


def fetch(client: SluiceClient, timeout: float = 3.0) -> dict | str:
    """GET /admin/status through the client (its base URL, key, path prefix); the document, or why not."""
    return client.run(Call("GET", "/admin/status", None, timeout, _document, why))


def render(doc: dict) -> str:
    t = doc.get("totals", {})
    q = doc.get("queue", {})
    lines = [f"sluice {doc.get('version', '?')}  {doc.get('status', '?')}  up {doc.get('uptime_s', 0):.0f}s  "
             f"received {t.get('received', 0)}  served {t.get('served', 0)}  rejected {t.get('rejected', 0)}  "
             f"timeouts {t.get('timed_out', 0)}  cancelled {t.get('cancelled', 0)}  failed {t.get('failed', 0)}",
             "queue: " + "  ".join(f"P{p}={n}" for p, n in sorted(q.get("by_priority", {}).items()))
             + f"  (pending {q.get('pending', 0)})", "",
             f"{'GATE':<12}{'MODE':<11}{'STATE':<11}{'INFLIGHT':<10}{'RESIDENT':<14}SWITCHES"]
    for g in doc.get("gates", []):
        lines.append(f"{g['name']:<12}{g['mode']:<11}{g['state']:<11}{str(g['inflight']) + '/' + str(g['slots']):<10}"
                     f"{str(g.get('resident') or '-'):<14}{g.get('switches', 0)}")
    lines += ["", f"{'BACKEND':<16}{'STATE':<10}{'INFLIGHT':<10}{'PID':<8}URL"]
    for b in doc.get("backends", []):
        lines.append(f"{b['name']:<16}{b['state']:<10}{b.get('inflight', 0):<10}{str(b.get('pid') or '-'):<8}{b['url']}"
                     + (f"  ({b['last_error']})" if b.get("last_error") else ""))
    jobs = q.get("jobs", [])
    if jobs:
        lines += ["", f"{'WAITING':<14}{'MODEL':<14}{'PRIO':<6}AGE"]
        lines += [f"{j['id']:<14}{j['model']:<14}{j['priority']:<6}{j['age_s']:.1f}s" for j in jobs[:20]]
    return "\n".join(lines)


def main(args) -> int:
    client = SluiceClient(args.url)     # $SLUICE_URL / $SLUICE_PORT and $SLUICE_API_KEY as every client reads them
    while True:
        doc = fetch(client)
        if isinstance(doc, dict):
            out, code = render(doc), 0
        else:
            out, code = f"sluice is down at {client.url}: {doc}", 1
        if not args.watch:
            print(out, file=sys.stdout if code == 0 else sys.stderr)
            return code
        sys.stdout.write("\033[H\033[2J" + out + "\n")
        sys.stdout.flush()
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return 0
