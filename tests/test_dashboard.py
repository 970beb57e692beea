"""The dashboard in a real browser (Debian's headless Chromium) against a running sluice: the live queue and gates,
and the controls (model load / sleep / wake / unload, drain and resume, the request-log tail, the playground)
clicked for real over the DevTools protocol. Plus the log-tail endpoint over plain HTTP."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import call
from test_api_native import pending, until
from test_managed import managed_toml

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
KEY = "dash-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def chromium(tmp_path, url: str, *extra: str) -> str:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=3000", *extra, url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    return r.stdout


def text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"#{element_id} not in the page"
    return m.group(1)


@needs_chromium
def test_dashboard_shows_the_live_queue_and_gates(make_app, backend, tmp_path):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url})
    for i in range(2):
        assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": f"done{i}"})[0] == 200
    backend.holding = True
    threads = [threading.Thread(target=call, args=(app, "POST", "/v1/query",
                                                   {"model": "fast", "prompt": p, "priority": prio}))
               for p, prio in (("running", 2), ("q1", 0), ("q2", 4), ("q3", 4))]
    threads[0].start()
    assert backend.wait_arrivals(3)
    for i, t in enumerate(threads[1:]):
        t.start()
        until(lambda: pending(app) == i + 1)
    try:
        dom = chromium(tmp_path, app.url + "/", "--dump-dom")
        assert text_of(dom, "queue-pending") == "3"
        assert (text_of(dom, "queue-p0"), text_of(dom, "queue-p4")) == ("1", "2")
        assert text_of(dom, "totals-served") == "2" and text_of(dom, "totals-received") == "6"
        assert text_of(dom, "status") == "ok"
        gate = re.search(r'data-gate="gpu".*?class="inflight">([^<]*)<', dom, re.S)
        assert gate and gate.group(1) == "1/1"
        assert re.search(r'data-backend="fast".*?class="state pill ready">ready<', dom, re.S)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        chromium(tmp_path, app.url + "/", f"--screenshot={shot}", "--window-size=375,1200")
        assert shot.exists() and shot.stat().st_size > 5000
    finally:
        backend.release_all()
        for t in threads:
            t.join(10)


# Chromium reads DevTools commands from fd 3 and writes answers to fd 4 (NUL-separated JSON); this puts our
# pipe ends there and becomes Chromium, so no preexec_fn runs in a process full of server threads.
_ON_FDS_3_4 = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
               "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")


class Browser:
    """One headless Chromium tab driven over the DevTools protocol: real mouse clicks and typing, page reads."""

    def __init__(self, tmp_path: Path):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (to_r, from_w))   # never 3 or 4 themselves
        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--remote-debugging-pipe", f"--user-data-dir={tmp_path / 'chrome-cdp'}", "--window-size=1280,2400",
                "about:blank"]
        self.proc = subprocess.Popen([sys.executable, "-c", _ON_FDS_3_4, str(r), str(w), *argv], pass_fds=(r, w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in {to_r, from_w, r, w}:
            os.close(fd)
        self._buf = b""
        self._next = 0
        self.exceptions: list[str] = []
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.send("Runtime.enable", session=True)
        self.send("Page.enable", session=True)

    def send(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self._from], [], [], left)[0], f"Chromium never answered {method}"
                chunk = os.read(self._from, 1 << 16)
                assert chunk, f"Chromium exited while answering {method}"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(json.dumps(reply["params"]["exceptionDetails"])[:2000])
            if reply.get("id") == self._next:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]

    def eval(self, expr: str):
        res = self.send("Runtime.evaluate", session=True, expression=expr, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in res, (expr, res["exceptionDetails"])
        return res["result"].get("value")

    def wait(self, expr: str, timeout: float = 15):
        until(lambda: self.eval(expr), timeout=timeout, what=expr)
        return self.eval(expr)

    def open(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('status')")

    def click(self, selector: str) -> None:
        """A left click at the element's centre once it is enabled (the mouse, not element.click())."""
        sel = json.dumps(selector)
        self.wait(f"(e => !!e && !e.disabled)(document.querySelector({sel}))")
        x, y = self.eval(f"(e => {{ e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); "
                         f"return [r.x + r.width / 2, r.y + r.height / 2]; }})(document.querySelector({sel}))")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.send("Input.insertText", session=True, text=text)

    def text(self, element_id: str) -> str:
        return self.eval(f"document.getElementById({json.dumps(element_id)}).textContent")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._to)
        os.close(self._from)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()
    assert b.exceptions == [], b.exceptions      # the page's script never threw


def status(app) -> dict:
    return call(app, "GET", "/admin/status", headers=AUTH)[2]


def engine_events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] if path.exists() else []


@needs_chromium
def test_buttons_load_sleep_wake_unload_a_managed_engine_and_drain_resume_sluice(make_app, browser, tmp_path):
    ev = tmp_path / "engine.events"
    app = make_app({"SLUICE_API_KEYS": KEY}, toml=managed_toml(ev, engine="vllm", idle_unload_s=0),
                   wait_ready=False)
    eng = lambda: status(app)["backends"][0]        # noqa: E731
    row = 'tr[data-model="fast"]'
    browser.open(app.url + "/")
    browser.wait("getComputedStyle(document.getElementById('keybox')).display === 'flex'")   # asks for a key
    browser.type("#key", KEY)
    browser.click("#key-use")
    browser.wait(f"!!document.querySelector('{row} button[data-action=load]')")
    assert browser.eval("[sessionStorage.getItem('sluice-key'), localStorage.length]") == [KEY, 0]
    assert eng()["state"] == "stopped" and engine_events(ev) == []

    browser.click(f"{row} button[data-action=load]")
    until(lambda: eng()["state"] == "ready", timeout=20, what="engine started by the load button")
    assert engine_events(ev).count("start") == 1
    browser.wait("document.getElementById('action-msg').textContent.startsWith('load fast: done')", timeout=20)

    browser.click(f"{row} button[data-action=sleep]")
    until(lambda: "sleep" in engine_events(ev) and eng()["state"] == "sleeping", what="engine put to sleep")
    browser.wait(f"document.querySelector('{row}').textContent.includes('sleeping')")

    browser.click(f"{row} button[data-action=wake]")
    until(lambda: "wake_up" in engine_events(ev) and eng()["state"] == "ready", what="engine woken")

    browser.click(f"{row} button[data-action=unload]")
    until(lambda: eng()["state"] == "stopped", timeout=20, what="engine stopped by the unload button")
    browser.wait(f"document.querySelector('{row}').textContent.includes('stopped')")

    browser.click("#drain")
    until(lambda: status(app)["status"] == "draining", what="sluice draining")
    browser.wait("document.getElementById('status').textContent === 'draining'")
    browser.click("#resume")
    until(lambda: status(app)["status"] != "draining", what="sluice resumed")
    assert call(app, "POST", "/v1/chat/completions", {"model": "fast", "messages": [{"role": "user", "content": "x"}]},
                headers=AUTH, timeout=30)[0] == 200
    assert engine_events(ev).count("start") == 2                   # the request started it again: admitted


@needs_chromium
def test_playground_streams_a_reply_the_log_tail_shows_its_id_and_stop_aborts_a_stream(make_app, backend, browser):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, "SLUICE_API_KEYS": KEY})
    browser.open(f"{app.url}/?key={KEY}")
    # the key from the link is kept for this tab only and taken out of the address bar
    browser.wait("location.search === '' && sessionStorage.getItem('sluice-key') === " + json.dumps(KEY))
    assert browser.eval("localStorage.length") == 0
    browser.wait("[...document.getElementById('pg-model').options].some(o => o.value === 'fast')")
    browser.eval("document.getElementById('pg-model').value = 'fast'; document.getElementById('pg-priority').value = '1'")
    browser.type("#pg-prompt", "hello there")
    browser.click("#pg-send")
    browser.wait("document.getElementById('pg-status').textContent === 'done'")
    assert browser.text("pg-out") == "t0 t1 t2 "
    rid = browser.text("pg-id")
    assert backend.arrivals[-1]["stream"] is True and backend.prompts()[-1] == "hello there"
    browser.wait(f"document.getElementById('log').textContent.includes({json.dumps(rid)})")
    line = next(json.loads(x) for x in browser.text("log").splitlines() if rid in x)
    assert (line["route"], line["model"], line["priority"], line["outcome"]) == ("/v1/chat/completions", "fast", 1, "ok")

    # a stream that never ends: shown as it arrives, and the stop button ends it at the backend too
    browser.eval("document.getElementById('pg-prompt').value = '!endless'")
    browser.click("#pg-send")
    browser.wait("document.getElementById('pg-status').textContent.startsWith('streaming') && "
                 "document.getElementById('pg-out').textContent.startsWith('la la ')")
    browser.click("#pg-stop")
    assert backend.wait_disconnects(1)
    browser.wait("document.getElementById('pg-status').textContent === 'stopped'")
    browser.screenshot(ARTIFACTS / "dashboard-controls.png")
    assert browser.eval("!document.getElementById('pg-send').disabled")
    until(lambda: pending(app) == 0 and app.scheduler.snapshot()["active"] == 0, what="the stopped job finished")


LOG_KEYS = """
[[keys]]
name = "user"
key = "user-key"

[[keys]]
name = "ops"
key = "ops-key"
admin = true
"""


def test_log_endpoint_needs_an_admin_key_returns_the_last_n_and_refuses_a_bad_n(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url}, toml=LOG_KEYS,
                   wait_ready=False)
    ops = {"Authorization": "Bearer ops-key"}
    for i in range(3):
        assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": f"p{i}"},
                    headers={**ops, "X-Request-Id": f"tail-{i}"})[0] == 200
    assert call(app, "GET", "/admin/log")[0] == 401
    assert call(app, "GET", "/admin/log", headers={"Authorization": "Bearer user-key"})[0] == 403
    status_code, _, body = call(app, "GET", "/admin/log", headers=ops)
    assert status_code == 200 and [e["id"] for e in body["data"]] == ["tail-0", "tail-1", "tail-2"]
    assert {"time", "route", "model", "priority", "outcome", "status", "wait_ms"} <= set(body["data"][0])
    assert [e["id"] for e in call(app, "GET", "/admin/log?n=2", headers=ops)[2]["data"]] == ["tail-1", "tail-2"]
    assert call(app, "GET", "/admin/log?n=200", headers=ops)[0] == 200
    for bad in ("0", "-1", "201", "abc", "1.5", "", "%C2%B2", "9" * 40, "1e3"):
        status_code, _, body = call(app, "GET", f"/admin/log?n={bad}", headers=ops)
        assert status_code == 400, (bad, body)
        assert body["error"]["param"] == "n" and "1 to 200" in body["error"]["message"]
