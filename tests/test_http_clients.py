"""Real clients at the front door: the official SDKs after an error on a pooled connection, Node's fetch with
a streamed (chunked) body, curl's chunked upload."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import call


def test_openai_sdk_call_after_a_404_on_the_same_connection(app):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="fast", prompt="a body sluice never reads")      # no such route
    r = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "next"}])
    assert r.choices[0].message.content == "echo: next"
    assert client.models.retrieve("fast").id == "fast"


def test_anthropic_sdk_call_after_two_404s_on_the_same_connection(app):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{app.port}", api_key="unused", max_retries=0)
    for _ in range(2):
        with pytest.raises(anthropic.NotFoundError):
            client.post("/v1/nope", body={"model": "fast", "max_tokens": 5}, cast_to=object)
    r = client.post("/v1/query", body={"model": "fast", "prompt": "after"}, cast_to=object)
    assert r["result"] == "echo: after"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_fetch_with_a_stream_body(app):
    script = """
const body = new ReadableStream({start(c) {
  c.enqueue(new TextEncoder().encode('{"model": "fast", '));
  c.enqueue(new TextEncoder().encode('"prompt": "from node"}'));
  c.close();
}});
const r = await fetch(process.argv[1], {method: "POST", body, duplex: "half",
                                        headers: {"Content-Type": "application/json"}});
console.log(JSON.stringify({status: r.status, body: await r.json()}));
"""
    out = subprocess.run(["node", "--input-type=module", "-e", script, f"http://127.0.0.1:{app.port}/v1/query"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["status"] == 200 and got["body"]["result"] == "echo: from node"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_chunked_upload_and_form_content_type(app):
    url = f"http://127.0.0.1:{app.port}/v1/query"
    chunked = subprocess.run(["curl", "-sS", "-H", "Transfer-Encoding: chunked", "-H", "Content-Type: application/json",
                              "--data-binary", "@-", url], input='{"model": "fast", "prompt": "curl"}',
                             capture_output=True, text=True, timeout=30)
    assert json.loads(chunked.stdout)["result"] == "echo: curl", chunked.stdout + chunked.stderr
    plain = subprocess.run(["curl", "-sS", "-d", '{"model": "fast", "prompt": "form"}', url],
                           capture_output=True, text=True, timeout=30)      # application/x-www-form-urlencoded
    assert json.loads(plain.stdout)["result"] == "echo: form"
    assert call(app, "GET", "/v1/queue/status")[2]["total_served"] == 2
