"""The tiny offline model (sluice/tinymodel.py) and the real mlx_lm.server on it (sluice/demo.py helpers).

These pin down what sluice relies on from mlx_lm.server: /health, /v1/models, the chat completion shapes,
SSE framing, usage counts, max_tokens and determinism. Only the standard library speaks HTTP here.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import pytest

from mlx_backend import require_mlx
from sluice.demo import MlxServerError, start_mlx_server

PROMPT = [{"role": "user", "content": "hi"}]
RENDERED = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
EOS_ID = 2                                   # <|im_end|>


def request(server, method: str, path: str, body=None, timeout: float = 60):
    """One exchange with a fresh connection (mlx_lm.server speaks HTTP/1.0): (status, headers, raw body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def chat(server, model, **kw) -> dict:
    status, _, raw = request(server, "POST", "/v1/chat/completions",
                             {"model": model, "messages": PROMPT, "temperature": 0, **kw})
    assert status == 200, raw
    return json.loads(raw)


def sse_events(raw: bytes) -> tuple[list[str], list[str]]:
    """Split an SSE body into (data payloads, comment lines), checking the framing on the way."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    data, comments = [], []
    for event in raw.decode().split("\n\n")[:-1]:
        for line in event.split("\n"):
            if line.startswith(":"):
                comments.append(line)
            else:
                assert line.startswith("data: "), line
                data.append(line[len("data: "):])
    return data, comments


@pytest.fixture(scope="module")
def model_id(mlx_server, tiny_model_dir) -> str:
    """The id /v1/models gives the served directory: what requests must name as `model`."""
    status, _, raw = request(mlx_server, "GET", "/v1/models")
    assert status == 200, raw
    ids = [m["id"] for m in json.loads(raw)["data"]]
    assert ids == [str(tiny_model_dir.resolve())]          # the empty HF_HUB_CACHE lists nothing else
    return ids[0]


# --- the model files ----------------------------------------------------------------------------------------

def test_two_builds_are_byte_identical_and_a_rebuild_writes_nothing(tmp_path):
    for mod in ("numpy", "safetensors", "tokenizers"):
        pytest.importorskip(mod, reason="needs the mlx extra: pip install -e '.[mlx]'")
    from sluice.tinymodel import build
    a, b = build(tmp_path / "a"), build(tmp_path / "b", seed=0)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    before = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    (b / "tokenizer.json").write_text("damaged")
    assert build(a) == a and build(b) == b
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == before        # nothing rewritten
    assert (b / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()   # repaired

    other = build(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()


def test_importing_the_helpers_loads_nothing_outside_the_stdlib():
    code = ("import sys, sluice.tinymodel, sluice.demo; "
            "print(sorted(m for m in ('numpy', 'safetensors', 'tokenizers', 'mlx', 'mlx_lm', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tokenizer_round_trips_and_the_chat_template_renders(tiny_model_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer               # what mlx_lm.server loads it with

    config = json.loads((tiny_model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"] == 1024
    for text in ["hi", "The quick brown fox, 2+2=4.\n\tindented", "naïve café 日本語 🙂", "  spaces  ", ""]:
        assert tok.decode(tok.encode(text).ids) == text
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, EOS_ID]

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == EOS_ID == config["eos_token_id"]
    rendered = hf.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert rendered == RENDERED
    two = hf.apply_chat_template([{"role": "system", "content": "be brief"}, *PROMPT], tokenize=False)
    assert two == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    ids = hf(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(EOS_ID) == 1   # specials are single tokens


# --- the real mlx_lm.server --------------------------------------------------------------------------------

def test_health_and_models(mlx_server, model_id):
    status, headers, raw = request(mlx_server, "GET", "/health")
    assert status == 200 and json.loads(raw) == {"status": "ok"}
    assert headers["Content-Type"] == "application/json"
    assert mlx_server.url == f"http://127.0.0.1:{mlx_server.port}/v1"
    status, _, raw = request(mlx_server, "GET", "/v1/models")
    assert json.loads(raw)["object"] == "list" and json.loads(raw)["data"][0]["object"] == "model"


def test_chat_completion_is_deterministic_and_stream_matches(mlx_server, model_id, tiny_model_dir):
    first = chat(mlx_server, model_id, max_tokens=8, seed=0)
    assert first["object"] == "chat.completion" and first["model"] == model_id
    choice = first["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert chat(mlx_server, model_id, max_tokens=8, seed=0)["choices"][0] == choice     # temperature 0
    # Sampling with a seed repeats too.
    sampled = [chat(mlx_server, model_id, max_tokens=8, temperature=1.0, seed=7)["choices"][0] for _ in range(2)]
    assert sampled[0] == sampled[1]

    status, headers, raw = request(mlx_server, "POST", "/v1/chat/completions",
                                   {"model": model_id, "messages": PROMPT, "temperature": 0, "seed": 0,
                                    "max_tokens": 8, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    data, comments = sse_events(raw)
    assert data[-1] == "[DONE]"
    assert all(c.startswith(": keepalive") for c in comments)        # prompt-progress comments
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == choice["finish_reason"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == choice["message"]["content"]


@pytest.mark.parametrize("n", [1, 5, 12])
def test_max_tokens_is_honoured_and_usage_counts_tokens(mlx_server, model_id, tiny_model_dir, n):
    from tokenizers import Tokenizer
    prompt_tokens = len(Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).encode(RENDERED).ids)
    # A strong bias against <|im_end|>: the random model cannot stop early, so it must stop at max_tokens.
    no_eos = {str(EOS_ID): -100}
    body = chat(mlx_server, model_id, max_tokens=n, logit_bias=no_eos)
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == n
    assert usage["prompt_tokens"] == prompt_tokens          # the chat template was applied, nothing more
    assert usage["total_tokens"] == usage["prompt_tokens"] + n
    # max_completion_tokens (the newer OpenAI name) wins over max_tokens.
    body = chat(mlx_server, model_id, max_tokens=50, max_completion_tokens=n, logit_bias=no_eos)
    assert body["usage"]["completion_tokens"] == n

    # Streaming: usage only on request, as a last chunk with no choices, just before [DONE].
    status, _, raw = request(mlx_server, "POST", "/v1/chat/completions",
                             {"model": model_id, "messages": PROMPT, "temperature": 0, "max_tokens": n,
                              "logit_bias": no_eos, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    data, _ = sse_events(raw)
    assert data[-1] == "[DONE]"
    final = json.loads(data[-2])
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == n
    assert json.loads(data[-3])["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in json.loads(d) for d in data[:-2])


def test_a_model_that_cannot_load_fails_fast_with_the_log(tmp_path):
    require_mlx()
    (tmp_path / "empty").mkdir()
    log = tmp_path / "server.log"
    t0 = time.monotonic()
    with pytest.raises(MlxServerError) as e:
        start_mlx_server(tmp_path / "empty", log_path=log, ready_timeout=60)
    assert time.monotonic() - t0 < 60
    assert "cannot generate" in str(e.value) or "exited" in str(e.value)
    assert "Traceback" in str(e.value)                   # the log's tail is in the message
    assert log.stat().st_size > 0
