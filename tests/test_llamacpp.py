"""Against a second real engine: llama.cpp's llama-server on a tiny offline GGUF model, behind sluice.

Unmanaged (a server this file starts itself) and managed (`engine = "llama.cpp"`: sluice's own preset argv,
health probe and stop/start), and an exclusive gate switching between it and a managed mlx_lm.server.
Skipped, with the install command, where llama-server or the `gguf` package is missing.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import call, until

SERVER = os.environ.get("SLUICE_LLAMA_SERVER") or shutil.which("llama-server")
INSTALL = "needs llama.cpp's llama-server on PATH (or SLUICE_LLAMA_SERVER): bash .ci/llamacpp_install.sh"
needs_server = pytest.mark.skipif(SERVER is None, reason=INSTALL)
gguf = pytest.importorskip("gguf", reason="needs gguf: pip install -e '.[dev]'")

import tiny_gguf  # noqa: E402  (needs gguf)


def chat_body(model="fast", text="hi", **kw):
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0,
            "seed": 0, **kw}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200      # 503 while the model loads
    except OSError:
        return False
    finally:
        conn.close()


class LlamaServer:
    """A llama-server this test module started (not supervised by sluice); its log stays for a post-mortem."""

    def __init__(self, model: Path, log: Path, timeout: float = 60):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"       # the OpenAI base URL, as sluice's backend url
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([SERVER, "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not healthy(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"llama-server never became healthy; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory) -> Path:
    return tiny_gguf.build(tmp_path_factory.mktemp("tiny-gguf"))


@pytest.fixture(scope="module")
def llama_server(gguf_model, tmp_path_factory):
    server = LlamaServer(gguf_model, tmp_path_factory.mktemp("llama") / "llama-server.log")
    yield server
    server.stop()


@pytest.fixture
def llama_app(make_app, llama_server, gguf_model):
    return make_app({"SLUICE_FAST_URL": llama_server.url, "SLUICE_REASONING_URL": llama_server.url,
                     "SLUICE_FAST_MODEL": gguf_model.name, "SLUICE_REASONING_MODEL": gguf_model.name})


def sse(lines: list[bytes]) -> list[bytes]:
    return [line[6:].rstrip(b"\n") for line in lines if line.startswith(b"data: ")]


def test_tiny_gguf_is_byte_identical_on_every_build(tmp_path, gguf_model):
    again = tiny_gguf.build(tmp_path)
    assert again.read_bytes() == gguf_model.read_bytes()
    stamp = again.stat().st_mtime_ns
    tiny_gguf.build(tmp_path)                                     # a rebuild writes nothing
    assert again.stat().st_mtime_ns == stamp
    reader = gguf.GGUFReader(str(again))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == tiny_gguf.VOCAB_SIZE


# ---- unmanaged: a server sluice only routes to ------------------------------------------------------------
@needs_server
def test_native_query_and_health_against_llama_server(llama_app, llama_server):
    health = call(llama_app, "GET", "/v1/health")[2]
    assert health["status"] == "ok" and health["backends"] == {llama_server.url: "ready"}
    status, _, body = call(llama_app, "POST", "/v1/query", {"model": "tiny", "prompt": "What is 2+2?",
                                                            "max_tokens": 8, "temperature": 0}, timeout=60)
    assert status == 200 and body["status"] == "ok" and isinstance(body["result"], str) and body["result"]


@needs_server
def test_openai_sdk_stream_equals_non_stream_with_usage(llama_app):
    import openai
    client = openai.OpenAI(base_url=llama_app.url + "/v1", api_key="x", max_retries=0, timeout=60)
    full = client.chat.completions.create(**chat_body())
    text = full.choices[0].message.content
    chunks = list(client.chat.completions.create(**chat_body(), stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and streamed == text
    assert full.usage.completion_tokens == 8 and chunks[-1].usage.completion_tokens == 8
    comp = client.completions.create(model="reasoning", prompt="Once upon a time", max_tokens=4, temperature=0)
    assert comp.choices[0].text is not None and comp.usage.completion_tokens == 4


@needs_server
def test_raw_stream_relays_llama_server_events_and_done(llama_app):
    status, headers, raw = call(llama_app, "POST", "/v1/chat/completions", chat_body(stream=True), timeout=60)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    deltas = [json.loads(e[6:]) for e in events[:-1]]
    assert all(d["object"] == "chat.completion.chunk" for d in deltas)
    assert deltas[-1]["choices"][0]["finish_reason"] == "length"


# ---- managed: sluice runs llama-server itself from the engine preset ----------------------------------
def managed_toml(model: Path, idle_unload_s: float = 0) -> str:
    # PATH reaches the child: the preset's bare `llama-server` resolves where SLUICE_LLAMA_SERVER points.
    path = f"{Path(SERVER).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return f"""
[[backends]]
name = "llama"
engine = "llama.cpp"
model_path = "{model}"
idle_unload_s = {idle_unload_s}
env = {{ PATH = {json.dumps(path)} }}

[[models]]
name = "fast"
upstream_model = "{model.name}"
backends = ["llama"]
"""


def info(app, name="llama") -> dict:
    return next(b for b in call(app, "GET", "/admin/status")[2]["backends"] if b["name"] == name)


@needs_server
def test_managed_lazy_start_and_idle_unload(make_app, gguf_model):
    app = make_app(toml=managed_toml(gguf_model, idle_unload_s=1))
    assert info(app)["state"] == "stopped" and info(app)["pid"] is None     # lazy: nothing runs before a request
    assert call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[0] == 200
    first = info(app)
    assert first["state"] == "ready" and first["pid"] and first["managed"]
    assert Path(f"/proc/{first['pid']}/exe").resolve().name == "llama-server"
    until(lambda: info(app)["state"] == "stopped", timeout=30, what="idle unload")
    assert not alive(first["pid"])
    assert call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[0] == 200
    assert info(app)["pid"] not in (None, first["pid"])


@needs_server
def test_managed_sigkill_mid_stream_ends_cleanly_then_restarts(make_app, gguf_model):
    app = make_app(toml=managed_toml(gguf_model))
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(max_tokens=1500, stream=True)),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    lines = []
    while not (lines and lines[-1].startswith(b'data: {"choices"')):    # the first token arrived
        lines.append(resp.readline())
        assert lines[-1], b"".join(lines)
    pid = info(app)["pid"]
    os.kill(pid, signal.SIGKILL)                                  # a crash mid-generation (as on an OOM)
    while line := resp.readline():
        lines.append(line)
    conn.close()
    data = sse(lines)
    assert data[-1] == b"[DONE]", data[-3:]                       # the stream is closed properly...
    err = json.loads(data[-2])
    assert err["error"]["type"] == "api_error" and "mid-stream" in err["error"]["message"], err   # ...and says why
    chunks = [json.loads(d) for d in data[:-2]]
    assert chunks and not any(c["choices"][0]["finish_reason"] for c in chunks if c.get("choices"))  # cut short
    until(lambda: call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[0] == 200, timeout=60,
          what="served after restart")
    after = info(app)
    assert after["pid"] != pid and after["restarts"] >= 1 and after["state"] == "ready"


@needs_server
def test_managed_killed_between_requests_gives_502_or_a_restarted_answer(make_app, gguf_model):
    app = make_app(toml=managed_toml(gguf_model))
    assert call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[0] == 200
    pid = info(app)["pid"]
    os.kill(pid, signal.SIGKILL)
    status, _, body = call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)
    if status == 200:                                             # the restart may already have happened
        assert info(app)["pid"] != pid
    else:
        assert status == 502 and set(body["error"]) >= {"message", "type"}, body
    until(lambda: call(app, "POST", "/v1/chat/completions", chat_body(), timeout=120)[0] == 200, timeout=60,
          what="served after restart")


# ---- one exclusive gate, two real engines: llama.cpp and mlx_lm.server --------------------------------
def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")                                # a zombie has already let go of its memory


def engines(under: Path) -> dict[int, str]:
    """This process's live engine children serving a model under `under` (not the module's own server),
    pid -> which engine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        if int(rest[1]) != os.getpid() or rest[0] in ("Z", "X") or os.fsencode(under) not in cmd:
            continue
        kind = "llama" if b"llama-server" in cmd else "mlx" if b"mlx_lm" in cmd else None
        if kind:
            found[int(entry.name)] = kind
    return found


class OverlapWatch:
    """Scans for the two engines alive at once. A pid seen in scans 1 and 3 lived through scan 2, so an
    engine of the other kind in scan 2 means both ran at the same moment: no false alarm from a scan that
    straddles a stop and the next start."""

    def __init__(self, under: Path):
        self.under = under
        self.overlaps: list[tuple] = []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        scans = [engines(self.under), engines(self.under)]
        while not self._stop.wait(0.01):
            scans = [scans[-2], scans[-1], engines(self.under)]
            s1, s2, s3 = scans
            self.seen.update(s2.values())
            for p in s1.keys() & s3.keys():
                if any(kind != s1[p] for q, kind in s2.items() if q != p):
                    self.overlaps.append((s1, s2, s3))

    def stop(self):
        self._stop.set()
        self._thread.join(5)


@needs_server
def test_exclusive_gate_switches_between_mlx_and_llama_cpp_never_both_running(make_app, tmp_path):
    from mlx_backend import require_mlx
    require_mlx()
    from sluice.tinymodel import build
    mlx_model = build(tmp_path / "mlx-model")
    gguf_model = tiny_gguf.build(tmp_path / "gguf")         # its own path: the watch tells its engines by it
    cache = tmp_path / "hf"
    cache.mkdir()
    path = f"{Path(SERVER).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    app = make_app(toml=f"""
[[gates]]
name = "gpu0"
mode = "exclusive"
policy = "fifo"

[[backends]]
name = "mlx"
gate = "gpu0"
command = ["{sys.executable}", "-m", "mlx_lm", "server", "--model", "{{model}}", "--host", "{{host}}", "--port", "{{port}}"]
model_path = "{mlx_model}"
idle_unload_s = 0
env = {{ HF_HUB_OFFLINE = "1", HF_HUB_CACHE = "{cache}" }}

[[backends]]
name = "llama"
gate = "gpu0"
engine = "llama.cpp"
model_path = "{gguf_model}"
idle_unload_s = 0
env = {{ PATH = {json.dumps(path)} }}

[[models]]
name = "qwen"
upstream_model = "{mlx_model}"
backends = ["mlx"]

[[models]]
name = "llama"
upstream_model = "{gguf_model.name}"
backends = ["llama"]
""")
    watch = OverlapWatch(tmp_path)
    try:
        for model, awake, asleep in (("qwen", "mlx", "llama"), ("llama", "llama", "mlx"), ("qwen", "mlx", "llama"),
                                     ("llama", "llama", "mlx")):
            status, headers, body = call(app, "POST", "/v1/chat/completions", chat_body(model=model), timeout=180)
            assert status == 200 and headers["X-Sluice-Backend"] == awake, body
            assert body["choices"][0]["message"]["content"]
            assert info(app, awake)["state"] == "ready" and info(app, asleep)["state"] == "stopped"
            assert sorted(engines(tmp_path).values()) == [awake]   # the other one's process is gone
    finally:
        watch.stop()
    assert watch.seen == {"mlx", "llama"}                         # the watch saw both engines run...
    assert watch.overlaps == []                                   # ...never at the same time
    gate = call(app, "GET", "/admin/status")[2]["gates"][0]
    assert gate["switches"] == 4 and gate["resident"] == "llama"
