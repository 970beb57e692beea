"""Per-model limits ([[models]] max_concurrency, timeout_s, max_tokens, default_priority; SLUICE_FAST_* for the
seed's env-only models), end to end."""

from __future__ import annotations

import json
import threading

from conftest import call, until
from test_api_native import pending

CHAT = {"model": "fast", "messages": [{"role": "user", "content": "x"}]}


def test_env_timeout_applies_to_openai_routes(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, "SLUICE_FAST_TIMEOUT": 0.3})
    backend.holding = True
    first = threading.Thread(target=call, args=(app, "POST", "/v1/query", {"model": "reasoning", "prompt": "hold"}))
    first.start()
    assert backend.wait_arrivals(1)
    try:
        status, _, body = call(app, "POST", "/v1/chat/completions", CHAT)      # waits behind it, for 0.3 s only
        assert status == 504 and body["error"]["code"] == "timeout"
    finally:
        backend.release_all()
        first.join(10)


def test_max_tokens_is_clamped_to_the_models_cap(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url, "SLUICE_FAST_MAX_TOKENS": 64})
    for asked, sent in ((5000, 64), (None, 64), (10, 10)):
        body = {**CHAT, **({"max_tokens": asked} if asked else {})}
        assert call(app, "POST", "/v1/chat/completions", body)[0] == 200
        assert backend.arrivals[-1]["max_tokens"] == sent
    raw = json.dumps({**CHAT, "max_tokens": 10}).encode()           # within the cap: the client's bytes as sent
    assert call(app, "POST", "/v1/chat/completions", raw=raw)[0] == 200
    assert backend.raw_arrivals[-1] == raw.replace(b'"fast"', b'"mlx-community/Qwen3-1.7B-4bit"')
    assert call(app, "POST", "/v1/query", {"model": "fast", "prompt": "p", "max_tokens": 500})[0] == 200
    assert backend.arrivals[-1]["max_tokens"] == 64


def test_default_priority_orders_the_queue(make_app, backend, tmp_path):
    toml = f"""
[[backends]]
name = "b"
url = "{backend.url}"
[[models]]
name = "urgent"
upstream_model = "u"
backends = ["b"]
default_priority = 0
[[models]]
name = "bulk"
upstream_model = "k"
backends = ["b"]
"""
    app = make_app(toml=toml)
    backend.holding = True
    threads = [threading.Thread(target=call, args=(app, "POST", "/v1/chat/completions",
                                                   {"model": m, "messages": [{"role": "user", "content": m + str(i)}]}))
               for i, m in enumerate(["bulk", "bulk", "urgent"])]
    threads[0].start()
    assert backend.wait_arrivals(1)
    for i, t in enumerate(threads[1:]):
        t.start()
        until(lambda: pending(app) == i + 1, what="queued")
    backend.release_all()
    for t in threads:
        t.join(10)
    order = [a["model"] for a in backend.arrivals]
    assert order == ["k", "u", "k"]             # the urgent model's request (P0 by default) went first


def test_max_concurrency_holds_a_models_second_request_and_lets_another_model_by(make_app, backend):
    toml = f"""
[[gates]]
name = "gpu"
slots = 3
[[backends]]
name = "b"
url = "{backend.url}"
[[models]]
name = "one"
upstream_model = "o"
backends = ["b"]
max_concurrency = 1
[[models]]
name = "other"
upstream_model = "t"
backends = ["b"]
"""
    app = make_app(toml=toml)
    backend.holding = True
    results: dict[str, int] = {}

    def ask(name, model):
        results[name] = call(app, "POST", "/v1/chat/completions",
                             {"model": model, "messages": [{"role": "user", "content": name}]})[0]

    threads = {n: threading.Thread(target=ask, args=(n, m)) for n, m in
               (("one-1", "one"), ("one-2", "one"), ("other", "other"))}
    threads["one-1"].start()
    assert backend.wait_arrivals(1)
    threads["one-2"].start()
    until(lambda: pending(app) == 1, what="the second request of model one queued")
    threads["other"].start()
    assert backend.wait_arrivals(2)             # the other model went by while one-2 waits (gate slots free)
    assert [a["model"] for a in backend.arrivals] == ["o", "t"] and pending(app) == 1
    backend.release(2)                          # one-1 and other finish: one-2 is granted, and only now
    assert backend.wait_arrivals(3)
    assert backend.arrivals[2]["messages"][0]["content"] == "one-2"
    backend.release_all()
    for t in threads.values():
        t.join(10)
    assert results == {"one-1": 200, "one-2": 200, "other": 200}
    assert backend.max_seen == 2                # never both of model one at once


def test_env_max_concurrency_limits_the_seeds_model(make_app, backend):
    app = make_app({"SLUICE_FAST_URL": backend.url, "SLUICE_REASONING_URL": backend.url,
                    "SLUICE_FAST_MAX_CONCURRENCY": 1}, toml='[[gates]]\nname = "gpu"\nslots = 3\n')
    backend.holding = True
    ask = lambda model: threading.Thread(target=call, args=(app, "POST", "/v1/chat/completions", {**CHAT, "model": model}))
    threads = [ask("fast"), ask("fast"), ask("reasoning")]
    threads[0].start()
    assert backend.wait_arrivals(1)
    threads[1].start()
    until(lambda: pending(app) == 1, what="the second fast request queued")
    threads[2].start()
    assert backend.wait_arrivals(2) and pending(app) == 1       # reasoning went by; fast waits for its own
    backend.release_all()
    for t in threads:
        t.join(10)
    assert len(backend.arrivals) == 3 and pending(app) == 0
