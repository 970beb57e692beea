"""The dashboard in a real browser (Debian's headless Chromium) against a running sluice with queued jobs."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import call
from test_api_native import pending, until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


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
