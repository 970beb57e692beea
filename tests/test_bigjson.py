"""Large bodies (images) go through sluice at about their own size in memory, byte for byte."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import call
from sluice import bigjson

IMAGE = "data:image/png;base64," + base64.b64encode(os.urandom(150_000)).decode()


def chat(image: str = IMAGE, **extra) -> dict:
    return {"model": "fast", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": image}}]}], **extra}


def test_long_strings_become_marks_and_come_back():
    raw = json.dumps(chat(temperature=0.5)).encode()
    obj, bigs = bigjson.parse(raw, json.loads)
    url = obj["messages"][0]["content"][1]["image_url"]["url"]
    assert bigs is not None and url != IMAGE and url.startswith("data:image/png;base64,") and len(url) < 100
    out = b"".join(bytes(p) for p in bigs.encode(json.dumps({**obj, "model": "up"}).encode()))
    assert json.loads(out) == {**chat(temperature=0.5), "model": "up"}
    assert bigs.expand(obj) == chat(temperature=0.5)


@pytest.mark.parametrize("raw", [
    b'{"a": "x\\"' + b"y" * 70_000 + b'"}',                      # a run starting at an escaped quote
    b'{"a": "b", "n": [' + b"1," * 40_000 + b'1], "c": "d"}',     # a run between two strings
    json.dumps({"a": "\u0000big:forged:0" + "z" * 70_000}).encode(),   # client text that looks like a mark
], ids=["escaped-quote", "between-strings", "forged-mark"])
def test_what_is_not_certain_is_parsed_the_ordinary_way(raw):
    obj, bigs = bigjson.parse(raw, json.loads)
    assert obj == json.loads(raw)
    if bigs is not None:                      # marks only where they stand for whole strings
        assert bigs.expand(obj) == json.loads(raw)


def test_an_image_reaches_the_backend_byte_for_byte(app, backend):
    raw = json.dumps(chat()).encode()
    assert call(app, "POST", "/v1/chat/completions", raw=raw)[0] == 200
    assert backend.raw_arrivals[-1] == raw.replace(b'"model": "fast"', b'"model": "mlx-community/Qwen3-1.7B-4bit"')


def test_an_image_survives_a_re_encode(app, backend):
    """A body sluice must change (here: its `priority` removed) is re-encoded with the image put back."""
    assert call(app, "POST", "/v1/chat/completions", body=chat(priority=1))[0] == 200
    sent = json.loads(backend.raw_arrivals[-1])
    assert sent["messages"][0]["content"][1]["image_url"]["url"] == IMAGE and "priority" not in sent


def test_memory_per_request_is_about_its_body():
    """8 concurrent 16 MB requests in flight at once: sluice's RSS grows by at most 1.5 x the bodies."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import body_memory
    r = body_memory.measure(8, 16)
    assert r["statuses"] == [200]
    assert r["growth"] <= 1.5, r


def test_marks_moved_or_repeated_by_a_translation_get_their_own_strings_back():
    """A translation may reorder fields (instructions after a large input become the first message) or
    repeat a string: each mark is replaced by its own original bytes wherever it now stands."""
    import json
    from sluice import bigjson
    one, two = "A" * (bigjson.THRESHOLD + 10), "B" * (bigjson.THRESHOLD + 20)
    raw = json.dumps({"first": one, "second": two}).encode()
    obj, bigs = bigjson.parse(raw, json.loads)
    assert bigs is not None
    moved = json.dumps({"x": obj["second"], "y": [obj["first"], obj["second"]]}).encode()
    sent = b"".join(bytes(p) for p in bigs.encode(moved))
    assert json.loads(sent) == {"x": two, "y": [one, two]}
