"""Answers name the model the client asked for, not the backend's id; X-Sluice-Backend names the backend."""

from __future__ import annotations

import pytest

from conftest import call


def test_non_stream_answer_names_the_asked_model(app, backend):
    status, headers, body = call(app, "POST", "/v1/chat/completions",
                                 {"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and body["model"] == "tiny" and headers["X-Sluice-Backend"] == "fast"
    assert backend.arrivals[-1]["model"] == "mlx-community/Qwen3-1.7B-4bit"     # what the backend was asked


def test_stream_chunks_name_the_asked_model(app):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="fast", stream=True,
                                                 messages=[{"role": "user", "content": "x"}]))
    named = [c.model for c in chunks if c.model is not None]     # the stand-in's usage chunk names none
    assert len(named) == 3 and set(named) == {"fast"}
