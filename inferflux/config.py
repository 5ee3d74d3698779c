"""The one typed configuration object, and how it is assembled.

Precedence, lowest to highest: the dataclass defaults (which equal
`configs/default.yaml`), a YAML file, `INFERFLUX_<SECTION>__<KEY>` environment
variables (e.g. `INFERFLUX_RUNTIME__PAGE_SIZE=32`), then `key=value`
overrides from the command line (`--set runtime.page_size=32`). Unknown keys
are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from inferflux.errors import InferFluxError


class ConfigError(InferFluxError):
    """A configuration key or value is wrong."""


@dataclasses.dataclass
class RuntimeConfig:
    """How the model runs: KV cache size, batching limits, compilation buckets."""

    # Tokens per KV-cache page.
    page_size: int = 16
    # Pages in the KV cache (page 0 is reserved as the null page). 0 = derive from memory_fraction.
    num_pages: int = 0
    # Reuse KV pages of prompts that share a prefix (chained page hashes, LRU eviction).
    prefix_caching: bool = True
    # Fraction of free device memory (after weights) given to the KV cache when num_pages is 0.
    memory_fraction: float = 0.5
    # Hard cap on pages when derived from memory (CPU hosts report little about free memory).
    max_pages_from_memory: int = 16384
    # Longest sequence (prompt + output) in tokens; 0 = the model's context length.
    max_model_len: int = 0
    # Most sequences in one step.
    max_num_seqs: int = 32
    # Most tokens (prefill chunk tokens + decode tokens) in one step.
    max_num_batched_tokens: int = 512
    # Smallest bucket of tokens per step (buckets are powers of two up to max_num_batched_tokens).
    min_token_bucket: int = 8
    # Top logprobs computed per row in every step (requests may ask for up to this many).
    max_logprobs: int = 20
    # Most logit_bias entries per request (OpenAI allows 300); sets a fixed width of the compiled step.
    max_logit_bias: int = 300
    # Compile every bucket at start-up, in a thread pool.
    warmup: bool = False
    warmup_threads: int = 4
    # "auto" (float32 on CPU, bfloat16 elsewhere), "float32" or "bfloat16".
    dtype: str = "auto"
    # How LLM embeddings pool the final hidden states: "mean" or "last" (token).
    embedding_pooling: str = "mean"
    # Default seed for requests that give none (each request still gets its own stream).
    seed: int = 0


@dataclasses.dataclass
class ServerConfig:
    """The HTTP server: where it listens, which model names it answers to, and its limits."""

    host: str = "127.0.0.1"
    port: int = 8080
    # The model id clients use; empty = the model file's name. Aliases: comma-separated extra ids.
    served_model_name: str = ""
    model_aliases: str = ""
    # Accept any model id in requests (single-model servers behind tools that send fixed names).
    accept_any_model: bool = False
    # On SIGTERM/SIGINT: stop accepting, let running streams finish for this long, then abort the rest.
    drain_seconds: float = 30.0
    max_body_bytes: int = 4_194_304
    # Requests waiting for the engine beyond this get 503.
    max_queued_requests: int = 1024
    # Browser origins allowed to call the server, comma-separated, any port; "*" allows any. Requests from
    # other origins get 403 (as Ollama does). OLLAMA_ORIGINS, if set, adds to the list.
    cors_origins: str = "http://localhost,https://localhost,http://127.0.0.1,https://127.0.0.1,http://0.0.0.0"
    # Also listen on this port (e.g. 11434, Ollama's), serving the same app; 0 = off.
    ollama_port: int = 0
    # /admin/* routes (model reload) are served only when true, until API-key auth exists.
    admin_enabled: bool = False
    # Default max_tokens when a request gives none; 0 = up to the context window.
    default_max_tokens: int = 0
    # How long a model loaded on demand (a stored model) stays loaded after its last request when the
    # request gives no keep_alive: a duration ("5m", "1h30m", "30s"), seconds ("300"), "0" (unload once
    # idle) or negative (forever). The model given to `inferctl serve` stays loaded unless a request's
    # keep_alive (or the loaded-model cap) says otherwise.
    keep_alive: str = "5m"
    # Most models loaded at once, each with its own engine and KV cache; 0 = no limit. A request for
    # another model first unloads the least recently used idle one.
    max_loaded_models: int = 1


@dataclasses.dataclass
class Config:
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    # Where models, the XLA compilation cache and state live. Default: $INFERFLUX_HOME or ~/.inferflux.
    home: str = ""

    @property
    def home_path(self) -> Path:
        return Path(self.home or os.environ.get("INFERFLUX_HOME") or Path.home() / ".inferflux").expanduser()


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Defaults <- YAML file <- INFERFLUX_* environment <- overrides."""
    config = Config()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        _apply_mapping(config, data, source=str(path))
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if name.startswith("INFERFLUX_") and "__" in name:
            dotted = name[len("INFERFLUX_"):].lower().replace("__", ".")
            set_key(config, dotted, value, source=name)
    if isinstance(overrides, list):
        overrides = dict(_split_assignment(item) for item in overrides)
    for dotted, value in (overrides or {}).items():
        set_key(config, dotted, value, source="override")
    return config


def set_key(config: Any, dotted: str, value: Any, source: str = "override") -> None:
    """Set `section.key` on a config, converting strings to the field's type."""
    *sections, key = dotted.split(".")
    target = config
    for section in sections:
        if not dataclasses.is_dataclass(target) or section not in _field_names(target):
            raise ConfigError(f"{source}: unknown config section {section!r} in {dotted!r}")
        target = getattr(target, section)
    if not dataclasses.is_dataclass(target) or key not in _field_names(target):
        raise ConfigError(f"{source}: unknown config key {dotted!r}")
    current = getattr(target, key)
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{source}: {dotted!r} is a section, not a key")
    setattr(target, key, _coerce(value, type(current), dotted, source))


def _apply_mapping(config: Any, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at {prefix or 'top level'}")
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _apply_mapping(config, value, source, prefix=dotted + ".")
        else:
            set_key(config, dotted, value, source)


def _coerce(value: Any, kind: type, dotted: str, source: str) -> Any:
    try:
        if kind is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("1", "true", "yes", "on")
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {dotted} must be {kind.__name__}, got {value!r}") from None


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _split_assignment(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()
