"""/metrics: parsed with prometheus_client's own text parser after a scripted workload; the numbers must
be what the workload did."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families

from conftest import call
from sluice.metrics import Registry
from test_api_native import pending, until


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, name, sample=None, **labels) -> float:
    fam = fams[name]
    total = 0.0
    for s in fam.samples:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def test_registry_renders_parseable_text_with_escaping():
    r = Registry()
    c = r.counter("x_total", "help with \\ and\nnewline", ("a",))
    c.inc(a='quo"te\\back\nslash')
    c.inc(2, a="plain")
    h = r.histogram("lat_seconds", "latency", ("m",), buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v, m="m1")
    r.gauge_fn("g", "fn gauge", ("k",), lambda: [(("v",), 3)])
    fams = families(r.render())
    assert value(fams, "x", a='quo"te\\back\nslash') == 1 and value(fams, "x", a="plain") == 2
    assert value(fams, "lat_seconds", "lat_seconds_bucket", le="0.1") == 1
    assert value(fams, "lat_seconds", "lat_seconds_bucket", le="1.0") == 2
    assert value(fams, "lat_seconds", "lat_seconds_bucket", le="+Inf") == 3
    assert value(fams, "lat_seconds", "lat_seconds_count") == 3 and value(fams, "lat_seconds", "lat_seconds_sum") == 5.55
    assert value(fams, "g", k="v") == 3


def test_counts_are_exact_under_threads():
    r = Registry()
    c = r.counter("n_total", "n", ("t",))
    threads = [threading.Thread(target=lambda: [c.inc(t="x") for _ in range(2000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert value(families(r.render()), "n", t="x") == 16000


def test_metrics_add_up_after_a_workload(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_QUEUE_TIMEOUT": 0.5})
    for _ in range(3):
        assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "x", "priority": 1})[0] == 200
    assert call(app, "POST", "/v1/chat/completions",
                {"model": "reasoning", "messages": [{"role": "user", "content": "y"}]})[0] == 200
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "!error500"})[0] == 502
    backend.holding = True
    t = threading.Thread(target=call, args=(app, "POST", "/v1/query", {"model": "fast", "prompt": "held",
                                                                       "timeout": 30}))
    t.start()
    assert backend.wait_arrivals(6)
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "late"})[0] == 504
    backend.release_all()
    t.join(10)
    until(lambda: pending(app) == 0 and not app.scheduler.snapshot()["active"])
    status, headers, text = call(app, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    fams = families(text.decode())
    assert value(fams, "sluice_requests", outcome="ok") == 5
    assert value(fams, "sluice_requests", outcome="error") == 1
    assert value(fams, "sluice_requests", outcome="timeout") == 1
    assert value(fams, "sluice_requests", model="fast", priority="1", route="/v1/query", outcome="ok") == 3
    assert value(fams, "sluice_queue_wait_seconds", "sluice_queue_wait_seconds_count") == 7
    assert value(fams, "sluice_request_duration_seconds", "sluice_request_duration_seconds_count") == 6
    assert value(fams, "sluice_queue_depth") == 0
    assert value(fams, "sluice_tokens", model="reasoning", kind="completion") == 7
    assert value(fams, "sluice_inflight", gate="gpu") == 0 and value(fams, "sluice_gate_slots", gate="gpu") == 1
    assert value(fams, "sluice_backend_up", backend="fast") == 1
    assert value(fams, "sluice_backend_state", backend="fast", state="ready") == 1
    assert value(fams, "sluice_build_info") == 1 and value(fams, "sluice_uptime_seconds") > 0


def test_one_scrape_reads_one_status_document(make_app, backend):
    """Every gauge of a scrape comes from the same status document: read once per scrape, not per gauge."""
    from sluice.metrics import SluiceMetrics
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url})
    reads = []

    def status():
        reads.append(1)
        return app.admin.status_doc()

    m = SluiceMetrics("test", status, lambda: 1.0)
    text = m.render()
    assert len(reads) == 1 and "sluice_backend_up" in text and "sluice_queue_depth" in text
    m.render()
    assert len(reads) == 2
