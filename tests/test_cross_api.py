"""Every API is one queue: priority and serialization hold across /v1/chat/completions, /v1/messages
(Anthropic) and /api/chat (Ollama). One slot, a P4 flood on the OpenAI route, then P0 requests on the
other two: the P0 ones go next, and the backend never has two at once."""

from __future__ import annotations

import threading

from conftest import call, until


def test_p0_on_messages_and_ollama_chat_overtake_a_p4_openai_flood(app, backend):
    backend.limit = 1                               # a second request in flight at once is a violation
    backend.holding = True
    results: dict[str, int] = {}

    def send(name: str, path: str, body: dict, priority: int) -> threading.Thread:
        def run():
            results[name] = call(app, "POST", path, body, headers={"X-Sluice-Priority": str(priority)},
                                 timeout=30)[0]
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def chat(text):
        return {"model": "fast", "messages": [{"role": "user", "content": text}]}

    threads = [send("flood-0", "/v1/chat/completions", chat("flood-0"), 4)]
    assert backend.wait_arrivals(1)                 # in flight: the slot is taken
    for i in (1, 2, 3):                             # queued one by one: FIFO within P4 is then known
        threads.append(send(f"flood-{i}", "/v1/chat/completions", chat(f"flood-{i}"), 4))
        until(lambda: app.scheduler.snapshot()["pending"] == i, what=f"flood-{i} queued")
    threads.append(send("messages", "/v1/messages", {"model": "fast", "max_tokens": 16,
                                                     "messages": [{"role": "user", "content": "p0-messages"}]}, 0))
    until(lambda: app.scheduler.snapshot()["pending"] == 4, what="the Anthropic P0 queued")
    threads.append(send("ollama", "/api/chat", {"model": "fast", "stream": False,
                                                "messages": [{"role": "user", "content": "p0-ollama"}]}, 0))
    until(lambda: app.scheduler.snapshot()["pending"] == 5, what="the Ollama P0 queued")
    for n in range(2, 7):                           # one at a time: each release lets the next one in
        backend.release()
        assert backend.wait_arrivals(n), f"request {n} never reached the backend"
    backend.release_all()
    for t in threads:
        t.join(30)
    assert backend.prompts() == ["flood-0", "p0-messages", "p0-ollama", "flood-1", "flood-2", "flood-3"]
    assert backend.violations == [] and backend.max_seen == 1
    assert set(results.values()) == {200} and len(results) == 6
    routes = [e["route"] for e in call(app, "GET", "/admin/log?n=6")[2]["data"]]
    assert sorted(routes) == ["/api/chat", "/v1/chat/completions", "/v1/chat/completions",
                              "/v1/chat/completions", "/v1/chat/completions", "/v1/messages"]
