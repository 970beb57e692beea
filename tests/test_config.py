"""Configuration: seed defaults, env and TOML, and errors that name the place and the value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sluice.config import ConfigError, load


def test_seed_defaults():
    s = load(environ={})
    assert (s.host, s.port, s.max_queue_depth, s.max_tokens, s.max_prompt_chars) == ("127.0.0.1", 5590, 20, 8192, 48000)
    assert s.cloud_model == "claude-sonnet-4-6" and s.aging_s == 60 and s.cloud_concurrency == 4
    assert s.max_body_bytes == 64 << 20
    assert [(m.name, m.aliases, m.upstream_model) for m in s.models] == [
        ("reasoning", (), "mlx-community/Qwen3-8B-4bit"), ("fast", ("tiny",), "mlx-community/Qwen3-1.7B-4bit")]
    assert {b.name: b.url for b in s.backends} == {"reasoning": "http://localhost:8080/v1",
                                                   "fast": "http://localhost:8081/v1"}
    assert [(g.name, g.slots, g.mode) for g in s.gates] == [("gpu", 1, "shared")]
    assert s.model_names() == ["reasoning", "fast", "tiny", "cloud"]


def test_env_overrides():
    s = load(environ={"SLUICE_PORT": "6000", "SLUICE_FAST_URL": "http://127.0.0.1:9/v1/",
                      "SLUICE_FAST_MODEL": "m", "SLUICE_API_KEYS": "a, b,,", "SLUICE_ALLOW_UNAUTHENTICATED": "yes",
                      "SLUICE_QUEUE_TIMEOUT": "2.5"})
    assert s.port == 6000 and s.queue_timeout_s == 2.5 and s.api_keys == ("a", "b") and s.allow_unauthenticated
    fast = next(b for b in s.backends if b.name == "fast")
    assert fast.url == "http://127.0.0.1:9/v1"
    assert s.sources["port"] == "env"


@pytest.mark.parametrize("env,message", [
    ({"SLUICE_PORT": "abc"}, "SLUICE_PORT: must be an integer, got 'abc'"),
    ({"SLUICE_PORT": "70000"}, "SLUICE_PORT: must be <= 65535"),
    ({"SLUICE_MAX_QUEUE_DEPTH": "0"}, "SLUICE_MAX_QUEUE_DEPTH: must be >= 1, got '0'"),
    ({"SLUICE_AGING_S": "-1"}, "SLUICE_AGING_S: must be > 0"),
    ({"SLUICE_QUEUE_TIMEOUT": "nan"}, "SLUICE_QUEUE_TIMEOUT: must be > 0"),
    ({"SLUICE_FAST_URL": "localhost:8081"}, "SLUICE_FAST_URL: must be an http:// or https:// URL"),
    ({"SLUICE_ALLOW_UNAUTHENTICATED": "maybe"}, "SLUICE_ALLOW_UNAUTHENTICATED: must be true or false"),
])
def test_bad_env_names_the_variable_and_value(env, message):
    with pytest.raises(ConfigError) as e:
        load(environ=env)
    assert message in str(e.value)


def write(tmp_path, text):
    p = tmp_path / "sluice.toml"
    p.write_text(text)
    return p


def test_toml_topology(tmp_path):
    p = write(tmp_path, """
[server]
port = 7000
max_queue_depth = 50

[[gates]]
name = "gpu0"
slots = 2
mode = "exclusive"
policy = "cost-aware"

[[backends]]
name = "a"
url = "http://127.0.0.1:9001/v1"
gate = "gpu0"
forward_priority = true

[[models]]
name = "qwen"
aliases = ["q"]
upstream_model = "Qwen/Qwen3-8B"
backends = ["a"]
""")
    s = load(p, environ={"SLUICE_PORT": "7100"})
    assert s.port == 7100 and s.max_queue_depth == 50       # env beats file beats default
    assert s.sources == {"port": "env", "max_queue_depth": "file"}
    assert s.gates[0].mode == "exclusive" and s.gates[0].slots == 2 and s.gates[0].policy == "cost-aware"
    assert s.backends[0].forward_priority and s.models[0].aliases == ("q",)
    assert s.model_names() == ["qwen", "q", "cloud"]


@pytest.mark.parametrize("text,message", [
    ('[[gates]]\nname="g"\nslots=0\n', "gates.g.slots: must be >= 1, got 0"),
    ('[[gates]]\nname="g"\nmode="sometimes"\n', "gates.g.mode: must be one of shared, exclusive"),
    ('[[backends]]\nname="a"\nurl="http://x/v1"\ngate="nope"\n', "backends.a.gate: no gate named 'nope'"),
    ('[[backends]]\nname="a"\nurl="http://x/v1"\nslots=0\n', "backends.a.slots: must be >= 1, got 0"),
    ('[[backends]]\nname="a"\nurl="http://x/v1"\n[[backends]]\nname="a"\nurl="http://y/v1"\n',
     "backends.a: duplicate name"),
    ('[[backends]]\nname="a"\nurl="http://x/v1"\ncolour="red"\n', "backends.a.colour: unknown setting"),
    ('[[models]]\nname="m"\nbackends=["ghost"]\n', "models.m.backends: no backend named 'ghost'"),
    ('[[backends]]\nname="a"\nurl="http://x/v1"\n[[models]]\nname="cloud"\nbackends=["a"]\n', "reserved"),
    ('[[backends]]\nname="a"\nurl="http://x/v1"\n[[models]]\nname="m"\nbackends=["a"]\n'
     '[[models]]\nname="n"\naliases=["m"]\nbackends=["a"]\n', "models.n: name or alias 'm' is already used"),
    ('[server]\nport="x"\n', "server.port: must be an integer"),
    ('[server]\nbogus=1\n', "server.bogus: unknown setting"),
    ('[wat]\n', "wat: unknown table"),
    ('this is = = not toml', "not valid TOML"),
])
def test_bad_toml_names_the_dotted_path(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), environ={})
    assert message in str(e.value)


def test_cli_exits_2_with_the_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sluice", "config"], capture_output=True, text=True, timeout=30,
                       env={"SLUICE_MAX_QUEUE_DEPTH": "many", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert "SLUICE_MAX_QUEUE_DEPTH: must be an integer, got 'many'" in r.stderr


def test_cli_config_masks_secrets(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sluice", "config"], capture_output=True, text=True, timeout=30,
                       env={"SLUICE_API_KEYS": "supersecretkey", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "supersecretkey" not in r.stdout and '"source": "env"' in r.stdout


def test_cli_config_shows_the_ram_tier():
    import json
    r = subprocess.run([sys.executable, "-m", "sluice", "config"], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin"})
    tier = json.loads(r.stdout)["ram_tier"]
    assert tier["idle_unload_default_s"] in (180, 300, 600) and tier["total_memory_gb"] > 0


def test_ram_tiers():
    from sluice.processes import ram_tier_idle_s
    assert [ram_tier_idle_s(g * 10 ** 9) for g in (8, 24, 63, 64, 128)] == [180, 300, 300, 600, 600]


def test_backend_models_list_or_discovery(tmp_path):
    p = write(tmp_path, """
[[backends]]
name = "given"
url = "http://127.0.0.1:9001/v1"
models = ["Qwen/Qwen3-8B"]

[[backends]]
name = "asks"
url = "http://127.0.0.1:9002/v1"

[[backends]]
name = "says"
url = "http://127.0.0.1:9003/v1"
models = "discover"

[[backends]]
name = "run"
engine = "mlx-lm"
model_path = "m"

[[backends]]
name = "mapped"
url = "http://127.0.0.1:9004/v1"

[[models]]
name = "qwen"
upstream_model = "Qwen/Qwen3-8B"

[[models]]
name = "llama"
backends = ["mapped"]
""")
    s = load(p, environ={})
    b = {x.name: x for x in s.backends}
    assert (b["given"].discover, b["given"].models) == (False, ("Qwen/Qwen3-8B",))
    assert b["asks"].discover and b["says"].discover and b["says"].models == ()
    assert not b["mapped"].discover                       # mapped by hand in [[models]]: not asked
    assert not b["run"].discover                          # sluice starts it on demand: nothing to ask yet
    assert s.models[0].backends == () and s.manifest_interval_s == 30
    # the seed's defaults stay for the env-only case, with their manifests given
    d = load(environ={})
    assert not any(x.discover for x in d.backends)
    assert {x.name: x.models for x in d.backends}["fast"] == ("mlx-community/Qwen3-1.7B-4bit",)


@pytest.mark.parametrize("text,message", [
    ('[[backends]]\nname="a"\nurl="http://x/v1"\nmodels=[]\n[[models]]\nname="m"\n',
     "models.m.backends: must name at least one backend"),
    ('[[backends]]\nname="a"\nurl="http://x/v1"\nmodels=["x"]\ndiscover=true\n', "backends.a.discover: give either"),
    ('[[backends]]\nname="a"\nengine="mlx-lm"\nmodel_path="m"\nmodels="discover"\n',
     "backends.a.models: a backend sluice runs itself cannot discover"),
    ('[server]\nmanifest_interval_s=0\n', "server.manifest_interval_s: must be > 0"),
])
def test_bad_discovery_settings_name_the_dotted_path(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), environ={})
    assert message in str(e.value)


def test_model_table_rules(tmp_path):
    from sluice.config import ModelConfig
    from sluice.models import model_table
    s = load(write(tmp_path, """
[[backends]]
name = "a"
url = "http://127.0.0.1:9001/v1"
[[backends]]
name = "b"
url = "http://127.0.0.1:9002/v1"
[[models]]
name = "qwen"
aliases = ["q"]
upstream_model = "Qwen/Qwen3-8B"
backends = ["a"]
[[models]]
name = "llama"
upstream_model = "meta/llama"
"""), environ={})
    old = ModelConfig(name="old", upstream_model="old-id", backends=("a",))
    taken = ModelConfig(name="q", upstream_model="x", backends=("a",))
    models, source = model_table(s, {"a": ["Qwen/Qwen3-8B", "q", "cloud", "phi"], "b": ["Qwen/Qwen3-8B", "meta/llama",
                                                                                       "phi"]}, [old, taken])
    table = {m.name: (m.upstream_model, m.backends) for m in models}
    assert table == {
        "qwen": ("Qwen/Qwen3-8B", ("a", "b")),   # named backend kept; b lists its upstream id
        "llama": ("meta/llama", ("b",)),          # no backend named: served where listed
        "phi": ("phi", ("a", "b")),               # unclaimed id: a model of its own name
        "old": ("old-id", ("a",)),                # retiring: as it was
    }                                             # "q" and "cloud" are configured/reserved names: skipped
    assert source == {"qwen": "config", "llama": "config", "phi": "discovered", "old": "retiring"}
    models, _ = model_table(s, {})                # nothing listed yet: only what the file pins
    assert {m.name: m.backends for m in models} == {"qwen": ("a",), "llama": ()}


def test_two_eager_backends_on_one_exclusive_gate_are_refused(tmp_path):
    """Both would load onto the GPU at start, before the gate has a resident model."""
    backend = 'name = "{n}"\ngate = "gpu"\ncommand = "python -m http.server {{port}}"\nstart = "{s}"\n'
    toml = '[[gates]]\nname = "gpu"\nmode = "exclusive"\n'
    p = tmp_path / "sluice.toml"
    p.write_text(toml + "".join("[[backends]]\n" + backend.format(n=n, s="eager") for n in "AB"))
    with pytest.raises(ConfigError) as e:
        load(p, environ={})
    assert "backends.B.start" in str(e.value) and "at most one eager" in str(e.value)
    p.write_text(toml + "[[backends]]\n" + backend.format(n="A", s="eager") + "[[backends]]\n"
                 + backend.format(n="B", s="lazy"))
    assert {b.name: b.start for b in load(p, environ={}).backends if b.name in "AB"} == {"A": "eager", "B": "lazy"}
