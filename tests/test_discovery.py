"""Manifest discovery: backends without a `models` list are asked GET /v1/models at start and on each
refresh; what they list becomes routable, and what they stop listing is re-routed or failed at once.

The stand-ins' lists change on demand; a refresh is forced with `health.kick(manifests=True)` (the periodic
one is set an hour apart, so only the tests' own refreshes happen) and observed through /admin/status.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import call


def until(pred, timeout=5.0, what=""):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.01)


def toml(a, b) -> str:
    return f"""
[[gates]]
name = "gpu"
slots = 4

[[backends]]
name = "A"
url = "{a.url}"
slots = 1

[[backends]]
name = "B"
url = "{b.url}"
slots = 1

[[models]]
name = "alpha-chat"
aliases = ["ac"]
upstream_model = "alpha"
"""


def chat(app, model, text="hi"):
    return call(app, "POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}]})


def listed(app) -> set[str]:
    return {m["id"] for m in call(app, "GET", "/v1/models")[2]["data"]}


def manifests(app) -> dict:
    return {b["name"]: b["manifest"] for b in call(app, "GET", "/admin/status")[2]["backends"]}


@pytest.fixture
def rig(make_app, make_backend):
    a, b = make_backend(), make_backend()
    a.manifest, b.manifest = ["alpha", "gamma"], ["beta"]
    app = make_app({"SLUICE_MANIFEST_INTERVAL_S": "3600"}, toml=toml(a, b))
    until(lambda: manifests(app) == {"A": ["alpha", "gamma"], "B": ["beta"]}, what="first manifests")
    return app, a, b


def refresh(app, expect: dict) -> None:
    app.health.kick(manifests=True)
    until(lambda: manifests(app) == expect, what=f"manifests {expect}")


def test_discovered_models_are_listed_and_routable(rig):
    app, a, b = rig
    assert {"alpha-chat", "ac", "gamma", "beta"} <= listed(app)
    assert "alpha" not in listed(app)                 # claimed by [[models]] alpha-chat: served under its name
    status, headers, body = chat(app, "gamma")
    assert status == 200 and headers["X-Sluice-Backend"] == "A" and a.arrivals[-1]["model"] == "gamma"
    status, headers, _ = chat(app, "ac")
    assert status == 200 and headers["X-Sluice-Backend"] == "A" and a.arrivals[-1]["model"] == "alpha"
    assert chat(app, "delta")[0] == 404
    doc = call(app, "GET", "/admin/status")[2]
    models = {m["name"]: m for m in doc["models"]}
    assert models["gamma"]["source"] == "discovered" and models["gamma"]["backends"] == ["A"]
    assert models["alpha-chat"]["source"] == "config" and models["alpha-chat"]["backends"] == ["A"]
    assert {b["name"]: b["discover"] for b in doc["backends"]} == {"A": True, "B": True}
    b.manifest = ["beta", "delta"]                    # B starts serving another model
    refresh(app, {"A": ["alpha", "gamma"], "B": ["beta", "delta"]})
    assert "delta" in listed(app)
    status, headers, _ = chat(app, "delta")
    assert status == 200 and headers["X-Sluice-Backend"] == "B" and b.arrivals[-1]["model"] == "delta"


def test_a_model_a_backend_stops_listing_moves_its_queued_jobs_or_fails_them_at_once(rig):
    app, a, b = rig
    b.manifest = ["alpha", "beta"]                    # alpha-chat: a pool of A and B
    refresh(app, {"A": ["alpha", "gamma"], "B": ["alpha", "beta"]})
    a.holding = b.holding = True
    results: dict = {}

    def send(key, model):
        t = threading.Thread(target=lambda: results.update({key: chat(app, model, key)}))
        t.start()
        return t

    threads = [send("inflight-a", "gamma")]
    assert a.wait_arrivals(1)
    threads.append(send("inflight-b", "beta"))
    assert b.wait_arrivals(1)
    threads += [send("queued-alpha", "alpha-chat"), send("queued-gamma", "gamma")]
    until(lambda: app.scheduler.snapshot()["pending"] == 2, what="two queued")
    a.manifest = []                                   # A serves nothing any more
    refresh(app, {"A": [], "B": ["alpha", "beta"]})
    threads[3].join(5)
    status, _, body = results["queued-gamma"]         # only A had gamma: failed now, not at its timeout
    assert status == 503 and "no longer served by any backend" in body["error"]["message"]
    assert app.scheduler.snapshot()["pending"] == 1   # alpha-chat still waits: B serves it
    b.release_all()
    threads[2].join(5)
    status, headers, _ = results["queued-alpha"]
    assert status == 200 and headers["X-Sluice-Backend"] == "B" and b.arrivals[-1]["model"] == "alpha"
    a.release_all()
    for t in threads:
        t.join(5)
    assert results["inflight-a"][0] == 200 and results["inflight-b"][0] == 200   # in flight: finished normally
    assert "gamma" not in listed(app) and chat(app, "gamma")[0] == 404
    t = call(app, "GET", "/v1/queue/status")[2]
    assert t["total_received"] == t["total_served"] + t["total_errors"] + t["total_rejected"] + \
        t["total_timeouts"] + t["total_cancelled"]


def test_a_failing_manifest_keeps_the_last_one(rig):
    app, a, b = rig
    a.manifest_status = 500
    a.manifest = []                                   # what it would say, if it answered
    n = a.manifest_reads
    app.health.kick(manifests=True)
    assert a.wait_manifest_reads(n + 1)
    app.health.kick(manifests=True)                   # a second read: the first one has been handled
    assert a.wait_manifest_reads(n + 2)
    assert manifests(app)["A"] == ["alpha", "gamma"] and "gamma" in listed(app)
    assert chat(app, "gamma")[0] == 200
    a.manifest_status = 200                           # answers again: its new list applies
    refresh(app, {"A": [], "B": ["beta"]})
    assert "gamma" not in listed(app)
