"""Configuration: defaults in one place, then a TOML file, then environment variables.

Parsed once into frozen dataclasses. Every error names where the bad value came from (the environment
variable or the dotted TOML path) and the value, e.g. `backends.fast.slots: must be >= 1, got 0`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

# The value parsers under short local names: each table below reads one rule a line.
from sluice.config_values import (argv as _argv, boolean as _bool, command as _command,
                                  env_table as _env_table, file_path as _path, host_name as _host,
                                  http_url as _url, integer as _int, list_of as _list_of,
                                  name_list as _names, number as _float, one_of as _choice, origin as _origin,
                                  str_list as _keys, text as _str)
from sluice.policies import POLICIES
from sluice import processes

GATE_MODES = ("shared", "exclusive")
SWITCH_METHODS = ("none", "vllm-sleep-1", "vllm-sleep-2", "vllm-sleep-auto", "command")
BACKEND_APIS = ("openai", "anthropic", "responses", "ollama")
CLOUD = "cloud"


class ConfigError(ValueError):
    """A bad setting. str() is the whole message: `where: what is wrong, got VALUE`."""


@dataclass(frozen=True)
class GateConfig:
    name: str
    slots: int = 1
    mode: str = "shared"
    policy: str = "lookahead"      # matches or beats llmux's policies on 52 of 53 workloads (bench/README.md)
    drain_timeout_s: float = 60.0
    min_active_s: float = 0.0
    max_wait_s: float = 120.0
    switch_cost_s: float = 5.0      # first guess of a switch's seconds, before any is measured


@dataclass(frozen=True)
class BackendConfig:
    name: str
    url: str = ""                   # OpenAI base URL, ending in /v1 (managed backends: derived from the port)
    gate: str = "gpu"
    slots: int | None = None        # None: as many as the gate allows
    models: tuple[str, ...] = ()    # its manifest by hand: the upstream model ids it serves (see discover)
    discover: bool = False          # learn the manifest from GET {url}/models instead (no `models` given)
    api_key: str | None = field(default=None, repr=False)
    forward_priority: bool = False  # vLLM --scheduling-policy priority takes a `priority` field
    health_path: str | None = None  # None: GET /health, falling back to GET {url}/models
    jit_swap: bool = False          # the server swaps models on demand (LM Studio JIT): never mix in flight
    api: tuple[str, ...] = ("openai",)   # the APIs it speaks natively (see BACKEND_APIS): sent as-is, no translation
    switch: str = "none"            # how an exclusive gate takes it down and up: see SWITCH_METHODS
    sleep_cmd: tuple[str, ...] = () # switch = "command": argv run to free the GPU, and to load again
    wake_cmd: tuple[str, ...] = ()
    # switch = "vllm-sleep-auto" (docs/design.md, "Exclusive gate states"); also for a managed vLLM engine
    weights_gb: float | None = None # CPU RAM its level-1 sleep holds (about its weights' size)
    demote_after_s: float = 900.0   # a last sleep this long or longer: the next one is level 2
    stop_after_s: float | None = None   # managed: stopped once asleep this long; None: never
    # A managed backend: a process sluice starts on demand, restarts on crash and unloads when idle.
    engine: str | None = None       # mlx-lm | llama.cpp | vllm (a preset command, probe and sleep method)
    command: str | tuple[str, ...] | None = None   # or your own: "{model}", "{host}", "{port}" are filled in
    model_path: str = ""            # what {model} stands for
    port: int | None = None         # None: a free port is picked
    start: str = "lazy"             # lazy: on the first request; eager: when sluice starts
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 10.0
    sleep_timeout_s: float = 120.0  # each sleep/wake call (vLLM /sleep, sleep_cmd); past it the sleep failed
    start_retries: int = 3
    unhealthy_after: int = 3
    idle_unload_s: float | None = None   # None: from the RAM tier (600/300/180 s); 0: never
    env: tuple[tuple[str, str], ...] = ()

    @property
    def managed(self) -> bool:
        return self.engine is not None or self.command is not None

@dataclass(frozen=True)
class ModelConfig:
    name: str
    upstream_model: str
    backends: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    fallback: str | None = None      # "cloud": send to Anthropic when no local backend takes it in time
    fallback_after_s: float = 30.0
    # Per-model limits (None: the server-wide setting).
    max_concurrency: int | None = None   # requests of this model in flight at once, across its backends
    timeout_s: float | None = None       # queue wait for this model (every route; /v1/query's `timeout` wins)
    max_tokens: int | None = None        # a larger (or missing) max_tokens is clamped to this
    default_priority: int | None = None  # the priority of a request that names none


@dataclass(frozen=True)
class KeyConfig:
    name: str
    key: str = field(repr=False)
    max_priority: int = 0            # the most urgent level this key may ask for (asking higher is clamped)
    models: tuple[str, ...] = ()     # allowed model names/aliases; empty = all
    max_queued: int | None = None    # this key's own queued requests beyond which it gets 429
    admin: bool = False              # may use /admin/* and /metrics


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 5590
    ollama_port: int | None = None   # a second listener for Ollama clients (e.g. 11434); None: off
    log_dir: Path = Path("~/.sluice/logs").expanduser()
    state_dir: Path = Path("~/.sluice/run").expanduser()
    max_queue_depth: int = 20
    max_tokens: int = 8192
    max_prompt_chars: int = 48000
    max_body_bytes: int = 64 << 20     # two 20 MB images, base64'd; ~1x the body in RAM (bigjson.py)
    queue_timeout_s: float = 300.0
    aging_s: float = 60.0
    default_priority: int = 2
    sse_keepalive_s: float = 10.0
    health_interval_s: float = 2.0
    manifest_interval_s: float = 30.0   # discovering backends' GET /v1/models is re-read this often
    client_timeout_s: float = 30.0
    max_connections: int = 512
    max_connections_per_client: int = 128   # per client address (loopback exempt: every local program shares it)
    allowed_hosts: tuple[str, ...] = ()     # Host names besides this machine's own (DNS-rebinding protection)
    cors_origins: tuple[str, ...] = ()      # web pages (scheme://host[:port]) that may call sluice from a browser
    shutdown_timeout_s: float = 30.0
    cloud_model: str = "claude-sonnet-4-6"
    cloud_timeout_s: float = 300.0
    cloud_concurrency: int = 4
    claude_bin: str = "claude"
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    keys: tuple[KeyConfig, ...] = field(default=(), repr=False)   # SLUICE_API_KEYS (admin) + [[keys]]
    allow_unauthenticated: bool = False
    log_prompts: bool = False
    l1_ram_budget_gb: float | None = None   # level-1 sleepers' weights in CPU RAM at most; None: half the RAM
    gates: tuple[GateConfig, ...] = ()
    backends: tuple[BackendConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    config_path: Path | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def model_names(self) -> list[str]:
        """Every name a client may ask for: models, their aliases, and `cloud`."""
        names = [n for m in self.models for n in (m.name, *m.aliases)]
        return names + [CLOUD]


# Scalar settings: attribute -> (environment variable, parser). The TOML `[server]` table uses the attribute names.
SCALARS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "host": ("SLUICE_HOST", _str),
    "port": ("SLUICE_PORT", _int(0, 65535)),
    "ollama_port": ("SLUICE_OLLAMA_PORT", _int(0, 65535)),
    "log_dir": ("SLUICE_LOG_DIR", _path),
    "state_dir": ("SLUICE_STATE_DIR", _path),
    "max_queue_depth": ("SLUICE_MAX_QUEUE_DEPTH", _int(1)),
    "max_tokens": ("SLUICE_MAX_TOKENS", _int(1)),
    "max_prompt_chars": ("SLUICE_MAX_PROMPT_CHARS", _int(1)),
    "max_body_bytes": ("SLUICE_MAX_BODY_BYTES", _int(1024)),
    "queue_timeout_s": ("SLUICE_QUEUE_TIMEOUT", _float(0, positive=True)),
    "aging_s": ("SLUICE_AGING_S", _float(0, positive=True)),
    "default_priority": ("SLUICE_DEFAULT_PRIORITY", _int(0, 4)),
    "sse_keepalive_s": ("SLUICE_SSE_KEEPALIVE_S", _float(0, positive=True)),
    "health_interval_s": ("SLUICE_HEALTH_INTERVAL_S", _float(0, positive=True)),
    "manifest_interval_s": ("SLUICE_MANIFEST_INTERVAL_S", _float(0, positive=True)),
    "client_timeout_s": ("SLUICE_CLIENT_TIMEOUT_S", _float(0, positive=True)),
    "shutdown_timeout_s": ("SLUICE_SHUTDOWN_TIMEOUT_S", _float(0)),
    "max_connections": ("SLUICE_MAX_CONNECTIONS", _int(1)),
    "max_connections_per_client": ("SLUICE_MAX_CONNECTIONS_PER_CLIENT", _int(1)),
    "allowed_hosts": ("SLUICE_ALLOWED_HOSTS", lambda v: _list_of(v, _host)),
    "cors_origins": ("SLUICE_CORS_ORIGINS", lambda v: _list_of(v, _origin)),
    "cloud_model": ("SLUICE_CLOUD_MODEL", _str),
    "cloud_timeout_s": ("SLUICE_CLOUD_TIMEOUT", _float(0, positive=True)),
    "cloud_concurrency": ("SLUICE_CLOUD_CONCURRENCY", _int(1)),
    "claude_bin": ("SLUICE_CLAUDE_BIN", _str),
    "api_keys": ("SLUICE_API_KEYS", _keys),
    "allow_unauthenticated": ("SLUICE_ALLOW_UNAUTHENTICATED", _bool),
    "log_prompts": ("SLUICE_LOG_PROMPTS", _bool),
    "l1_ram_budget_gb": ("SLUICE_L1_RAM_BUDGET_GB", _float(0)),
}

# The seed's two local models. Used when the TOML file defines no [[models]].
DEFAULT_MODELS = (
    # (model, aliases, URL variable, URL default, model-id variable, model-id default)
    ("reasoning", (), "SLUICE_REASONING_URL", "http://localhost:8080/v1",
     "SLUICE_REASONING_MODEL", "mlx-community/Qwen3-8B-4bit"),
    ("fast", ("tiny",), "SLUICE_FAST_URL", "http://localhost:8081/v1",
     "SLUICE_FAST_MODEL", "mlx-community/Qwen3-1.7B-4bit"),
)


def _get(where: str, value: Any, parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}, got {value!r}") from None


def _table(where: str, raw: Any, cls: type, parsers: Mapping[str, Callable[[Any], Any]], **fixed: Any):
    """Build dataclass `cls` from a TOML table, rejecting unknown keys by their dotted path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table, got {raw!r}")
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
    values = {k: _get(f"{where}.{k}", v, parsers[k]) for k, v in raw.items() if k in parsers}
    return cls(**{**values, **fixed})


def _named_list(doc: dict, key: str) -> list[tuple[str, dict]]:
    """`[[key]]` entries as (dotted prefix, table), each with a unique non-empty name."""
    raw = doc.get(key, [])
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]]), got {raw!r}")
    out, seen = [], set()
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise ConfigError(f"{key}[{i}]: must be a table, got {t!r}")
        name = _get(f"{key}[{i}].name", t.get("name"), _str)
        if name in seen:
            raise ConfigError(f"{key}.{name}: duplicate name")
        seen.add(name)
        out.append((f"{key}.{name}", t))
    return out


_GATE_PARSERS = {"slots": _int(1), "mode": _choice(GATE_MODES), "policy": _choice(POLICIES),
                 "drain_timeout_s": _float(0), "min_active_s": _float(0), "max_wait_s": _float(0, positive=True),
                 "switch_cost_s": _float(0)}
ENGINES = tuple(processes.ENGINES)
_BACKEND_PARSERS = {"url": _url, "gate": _str, "slots": _int(1), "models": _names, "discover": _bool,
                    "api_key": _str,
                    "forward_priority": _bool, "health_path": _str, "jit_swap": _bool,
                    "api": lambda v: tuple(_choice(BACKEND_APIS)(x) for x in _names(v)),
                    "switch": _choice(SWITCH_METHODS), "sleep_cmd": _argv, "wake_cmd": _argv,
                    "engine": _choice(ENGINES), "command": _command, "model_path": _str, "port": _int(1, 65535),
                    "start": _choice(("lazy", "eager")), "start_timeout_s": _float(0, positive=True),
                    "stop_timeout_s": _float(0, positive=True), "start_retries": _int(0),
                    "sleep_timeout_s": _float(0, positive=True),
                    "unhealthy_after": _int(1), "idle_unload_s": _float(0), "env": _env_table,
                    "weights_gb": _float(0), "demote_after_s": _float(0), "stop_after_s": _float(0, positive=True)}
_MODEL_PARSERS = {"upstream_model": _str, "backends": _names, "aliases": _names,
                  "fallback": _choice((CLOUD,)), "fallback_after_s": _float(0)}
_MODEL_LIMITS = {"max_concurrency": _int(1), "timeout_s": _float(0, positive=True), "max_tokens": _int(1),
                 "default_priority": _int(0, 4)}
_MODEL_PARSERS.update(_MODEL_LIMITS)
# The same for the seed's env-only models: SLUICE_FAST_TIMEOUT, SLUICE_REASONING_MAX_CONCURRENCY, ...
_MODEL_LIMIT_ENV = {"max_concurrency": "MAX_CONCURRENCY", "timeout_s": "TIMEOUT", "max_tokens": "MAX_TOKENS",
                    "default_priority": "PRIORITY"}


def _backend(where: str, t: dict, pinned: set[str]) -> BackendConfig:
    """A `[[backends]]` entry. With `models = "discover"` (or `discover = true`), or with neither a `models`
    list nor a `[[models]]` entry naming it, an unmanaged backend's manifest is discovered from its
    GET /v1/models. A backend the file maps by hand is not asked: a server that lists every model in its
    cache (mlx_lm.server does) would otherwise make all of them routable. A managed one (sluice starts it
    on demand, so it is often not there to ask) serves only the models that name it."""
    raw = {k: v for k, v in t.items() if k != "name"}
    if raw.get("models") == "discover":
        del raw["models"]
        raw.setdefault("discover", True)
    b = _table(where, raw, BackendConfig, _BACKEND_PARSERS, name=t["name"])
    discover = b.discover if "discover" in raw else "models" not in raw and b.name not in pinned
    if discover and "models" in raw:
        raise ConfigError(f"{where}.discover: give either a models list or discover = true, not both")
    if discover and b.managed:
        if "discover" in raw:
            raise ConfigError(f"{where}.models: a backend sluice runs itself cannot discover its models; "
                              "list them, or name it in [[models]] backends")
        return b
    return replace(b, discover=discover)


def _topology(doc: dict, env: Mapping[str, str], sources: dict[str, str]):
    gates = [_table(w, {k: v for k, v in t.items() if k != "name"}, GateConfig, _GATE_PARSERS, name=t["name"])
             for w, t in _named_list(doc, "gates")]
    models = [_table(w, {k: v for k, v in t.items() if k != "name"}, ModelConfig, _MODEL_PARSERS,
                     name=t["name"], **({} if "backends" in t else {"backends": ()}),
                     **({} if "upstream_model" in t else {"upstream_model": t["name"]}))
              for w, t in _named_list(doc, "models")]
    pinned = {b for m in models for b in m.backends}
    backends = [_backend(w, t, pinned) for w, t in _named_list(doc, "backends")]
    # The seed's two models, unless the file names its own models or lets backends say what they serve.
    if not models and not any(b.discover for b in backends):
        for name, aliases, url_var, url_default, id_var, id_default in DEFAULT_MODELS:
            url = _get(url_var, env.get(url_var, url_default), _url)
            upstream = _get(id_var, env.get(id_var, id_default), _str)
            sources[f"models.{name}"] = "env" if url_var in env or id_var in env else "default"
            if not any(b.name == name for b in backends):
                backends.append(BackendConfig(name=name, url=url, models=(upstream,)))
            limits = {k: _get(var, env[var], _MODEL_LIMITS[k]) for k, suffix in _MODEL_LIMIT_ENV.items()
                      if (var := f"SLUICE_{name.upper()}_{suffix}") in env}
            models.append(ModelConfig(name=name, upstream_model=upstream, backends=(name,), aliases=aliases,
                                      **limits))
    if not gates:
        gates = [GateConfig(name="gpu")]
    _check_topology(gates, backends, models)
    return tuple(gates), tuple(backends), tuple(models)


def _check_topology(gates: list[GateConfig], backends: list[BackendConfig], models: list[ModelConfig]) -> None:
    gate_names = {g.name for g in gates}
    for b in backends:
        if b.gate not in gate_names:
            raise ConfigError(f"backends.{b.name}.gate: no gate named {b.gate!r} "
                              f"(gates: {', '.join(sorted(gate_names))})")
        if not b.url and not b.managed:
            raise ConfigError(f"backends.{b.name}.url: required (or give engine/command to have sluice run it)")
        if b.managed and b.url:
            raise ConfigError(f"backends.{b.name}.url: a managed backend's URL comes from its port; drop url")
        if b.switch == "command" and not (b.sleep_cmd and b.wake_cmd):
            raise ConfigError(f"backends.{b.name}.switch: \"command\" needs sleep_cmd and wake_cmd")
        _check_sleep_levels(b)
    for g in gates:
        eager = [b.name for b in backends if b.gate == g.name and b.managed and b.start == "eager"]
        if g.mode == "exclusive" and len(eager) > 1:     # both would load onto the GPU at once at start
            raise ConfigError(f"backends.{eager[1]}.start: gate {g.name!r} is exclusive (one model on the GPU at a "
                              f"time) and {eager[0]!r} already starts eager; make at most one eager (start = "
                              '"lazy" loads it on its first request)')
    backend_names = {b.name for b in backends}
    seen: dict[str, str] = {}
    for m in models:
        for n in (m.name, *m.aliases):
            if n == CLOUD:
                raise ConfigError(f"models.{m.name}: the name {CLOUD!r} is reserved for the Anthropic route")
            if n in seen:
                raise ConfigError(f"models.{m.name}: name or alias {n!r} is already used by models.{seen[n]}")
            seen[n] = m.name
        if not m.backends and not any(b.discover or b.models for b in backends):
            raise ConfigError(f"models.{m.name}.backends: must name at least one backend (or let a backend "
                              f"list it: [[backends]] models = [{m.upstream_model!r}], or discover it)")
        for b in m.backends:
            if b not in backend_names:
                raise ConfigError(f"models.{m.name}.backends: no backend named {b!r} "
                                  f"(backends: {', '.join(sorted(backend_names)) or 'none'})")


def _check_sleep_levels(b: BackendConfig) -> None:
    where = f"backends.{b.name}"
    if b.switch == "vllm-sleep-auto":
        if b.managed and (processes.ENGINES[b.engine].sleep_method if b.engine else "stop") == "stop":
            raise ConfigError(f"{where}.switch: \"vllm-sleep-auto\" needs vLLM's sleep mode; give engine = \"vllm\"")
        if b.weights_gb is None:
            raise ConfigError(f"{where}.weights_gb: \"vllm-sleep-auto\" needs the GB of RAM a level-1 sleep holds "
                              "(about the size of its weights)")
    if b.stop_after_s is not None and not b.managed:
        raise ConfigError(f"{where}.stop_after_s: sluice does not run this server, so it cannot stop it; drop "
                          "stop_after_s, or give it engine/command")


def _keys_table(doc: dict, env: Mapping[str, str], model_names: set[str]) -> tuple[KeyConfig, ...]:
    out = []
    parsers = {"max_priority": _int(0, 4), "models": _names, "max_queued": _int(1), "admin": _bool}
    for where, t in _named_list(doc, "keys"):
        extra = set(t) - {"name", "key", "key_env"} - set(parsers)
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}: unknown setting "
                              f"(known: key, key_env, {', '.join(parsers)})")
        if ("key" in t) == ("key_env" in t):
            raise ConfigError(f"{where}: give exactly one of key or key_env")
        if "key_env" in t:
            var = _get(f"{where}.key_env", t["key_env"], _str)
            if not env.get(var):
                raise ConfigError(f"{where}.key_env: environment variable {var} is not set")
            key = env[var]
        else:
            key = _get(f"{where}.key", t["key"], _str)
        values = {k: _get(f"{where}.{k}", t[k], p) for k, p in parsers.items() if k in t}
        for m in values.get("models", ()):
            if m not in model_names:
                raise ConfigError(f"{where}.models: no model named {m!r}")
        out.append(KeyConfig(name=t["name"], key=key, **values))
    return tuple(out)


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve the settings: defaults, then the TOML file (`path` or SLUICE_CONFIG), then the environment."""
    env = os.environ if environ is None else environ
    path = path or env.get("SLUICE_CONFIG") or None
    doc: dict = {}
    if path:
        try:
            with open(Path(path).expanduser(), "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"SLUICE_CONFIG: cannot read {str(path)!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    known_tables = {"server", "gates", "backends", "models", "keys"}
    for key in doc:
        if key not in known_tables:
            raise ConfigError(f"{key}: unknown table (known: {', '.join(sorted(known_tables))})")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    server = doc.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"server: must be a table, got {server!r}")
    for key, v in server.items():
        if key not in SCALARS:
            raise ConfigError(f"server.{key}: unknown setting (known: {', '.join(sorted(SCALARS))})")
        values[key] = _get(f"server.{key}", v, SCALARS[key][1])
        sources[key] = "file"
    for key, (var, parse) in SCALARS.items():
        if var in env:
            values[key] = _get(var, env[var], parse)
            sources[key] = "env"
    gates, backends, models = _topology(doc, env, sources)
    keys = tuple(KeyConfig(name=f"key{i + 1}", key=k, admin=True) for i, k in enumerate(values.get("api_keys", ())))
    keys += _keys_table(doc, env, {n for m in models for n in (m.name, *m.aliases)} | {CLOUD})
    return Settings(**values, gates=gates, backends=backends, models=models, keys=keys,
                    config_path=Path(path) if path else None, sources=sources)
