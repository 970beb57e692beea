"""The browser threat model in a real browser (headless Chromium): a hostile page on another origin, and a
DNS-rebinding name that resolves to 127.0.0.1, can neither drive sluice nor read from it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import call
from test_dashboard import CHROMIUM, chromium

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

ATTACK = """<!doctype html><title>cat pictures</title><script>
const sluice = "http://127.0.0.1:%(port)d";
const body = JSON.stringify({model: "fast", messages: [{role: "user", content: "from evil"}]});
Promise.allSettled([
  fetch(sluice + "/admin/drain", {method: "POST", mode: "no-cors", body: "{}"}),
  fetch(sluice + "/v1/chat/completions", {method: "POST", mode: "no-cors", body,
                                          headers: {"Content-Type": "text/plain"}}),
  fetch(sluice + "/v1/query", {method: "POST", body: '{"model":"fast","prompt":"cors"}',
                               headers: {"Content-Type": "application/json"}}),
]).then(rs => { document.body.setAttribute("data-done", rs.map(r => r.status).join(",")); });
</script><body>loading</body>"""


@pytest.fixture
def evil_site():
    """A page on another origin (another port is another origin) that attacks sluice when opened."""
    pages: dict[str, bytes] = {}

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            data = pages.get(self.path, b"")
            self.send_response(200 if data else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], pages
    srv.shutdown()
    srv.server_close()


def test_a_hostile_page_cannot_drain_or_generate(app, backend, evil_site, tmp_path):
    port, pages = evil_site
    pages["/attack.html"] = (ATTACK % {"port": app.port}).encode()
    dom = chromium(tmp_path, f"http://evil.example:{port}/attack.html", "--dump-dom",
                   "--host-resolver-rules=MAP evil.example 127.0.0.1")
    assert 'data-done="fulfilled,fulfilled,rejected"' in dom, dom[-400:]   # the requests went out
    assert backend.arrivals == []                                             # no generation ran
    assert call(app, "GET", "/v1/health")[2]["status"] == "ok"                # not drained
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "still"})[2]["result"] == "echo: still"


def test_a_rebinding_name_cannot_read_sluice(app, tmp_path):
    dom = chromium(tmp_path, f"http://rebind.example:{app.port}/v1/queue/status", "--dump-dom",
                   "--host-resolver-rules=MAP rebind.example 127.0.0.1")
    assert "allowed_hosts" in dom and "total_received" not in dom
    own = chromium(tmp_path, f"http://127.0.0.1:{app.port}/v1/queue/status", "--dump-dom")
    assert "total_received" in own                                           # the same page by its own name
