"""The one typed configuration object, and how it is assembled.

Precedence, lowest to highest: the dataclass defaults (which equal
`configs/default.yaml`), a YAML file, `INFERFLUX_<SECTION>__<KEY>` environment
variables (e.g. `INFERFLUX_RUNTIME__PAGE_SIZE=32`; nested sections add a level, as in
`INFERFLUX_SECURITY__OIDC__ISSUER`), then `key=value`
overrides from the command line (`--set runtime.page_size=32`). Unknown keys
are errors, so a typo never silently does nothing.

Every key declares its allowed values once, next to its field in
`config_schema.py` (`key(default, lo=..., hi=..., choices=...)`, kept in the
field's metadata; the sections are re-exported here), and `load_config`
checks every field of every section, plus the rules between keys
(`CROSS_RULES`), before anything heavy starts: a bad value is a one-line
`ConfigError` naming the key, where it came from and the allowed range, not a
ZeroDivisionError or a dead engine at the first request.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from inferflux.config_schema import (  # noqa: F401  (re-exported: the keys are part of this module's API)
    AuditConfig,
    Check,
    Config,
    OidcConfig,
    RuntimeConfig,
    SecurityConfig,
    ServerConfig,
    SpeculativeConfig,
    StateConfig,
    TelemetryConfig,
)
from inferflux.errors import InferFluxError


class ConfigError(InferFluxError):
    """A configuration key or value is wrong."""


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Defaults <- YAML file <- INFERFLUX_* environment <- overrides, then every value checked."""
    config = Config()
    sources: dict[str, str] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        _apply_mapping(config, data, source=str(path), sources=sources)
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if name.startswith("INFERFLUX_") and "__" in name:
            dotted = name[len("INFERFLUX_"):].lower().replace("__", ".")
            set_key(config, dotted, value, source=name, sources=sources)
    if isinstance(overrides, list):
        overrides = dict(_split_assignment(item) for item in overrides)
    for dotted, value in (overrides or {}).items():
        set_key(config, dotted, value, source="override", sources=sources)
    return validate_config(config, sources)


def set_key(config: Any, dotted: str, value: Any, source: str = "override",
            sources: dict[str, str] | None = None) -> None:
    """Set `section.key` on a config, converting strings to the field's type; `sources` records who set it."""
    *sections, name = dotted.split(".")
    target = config
    for section in sections:
        if not dataclasses.is_dataclass(target) or section not in _field_names(target):
            raise ConfigError(f"{source}: unknown config section {section!r} in {dotted!r}")
        target = getattr(target, section)
    if not dataclasses.is_dataclass(target) or name not in _field_names(target):
        raise ConfigError(f"{source}: unknown config key {dotted!r}")
    current = getattr(target, name)
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{source}: {dotted!r} is a section, not a key")
    setattr(target, name, _coerce(value, type(current), dotted, source))
    if sources is not None:
        sources[dotted] = source


# Rules between keys: (the keys, what must hold, the rule as the error states it).
CROSS_RULES: list[tuple[tuple[str, ...], Callable[[Config], bool], str]] = [
    (("runtime.min_token_bucket", "runtime.max_num_batched_tokens"),
     lambda c: c.runtime.min_token_bucket <= c.runtime.max_num_batched_tokens,
     "runtime.min_token_bucket must be <= runtime.max_num_batched_tokens"),
    (("runtime.max_num_seqs", "runtime.max_num_batched_tokens"),
     lambda c: c.runtime.max_num_seqs <= c.runtime.max_num_batched_tokens,
     "runtime.max_num_seqs must be <= runtime.max_num_batched_tokens (each sequence in a step has a token)"),
    (("speculative.prompt_lookup_min", "speculative.prompt_lookup_max"),
     lambda c: c.speculative.prompt_lookup_min <= c.speculative.prompt_lookup_max,
     "speculative.prompt_lookup_min must be <= speculative.prompt_lookup_max"),
    (("speculative.method", "speculative.draft_model"),
     lambda c: c.speculative.method != "draft" or bool(c.speculative.draft_model),
     "speculative.method=draft needs speculative.draft_model (a model path or a stored model's name)"),
    (("server.ollama_port", "server.port"),
     lambda c: c.server.ollama_port == 0 or c.server.ollama_port != c.server.port,
     "server.ollama_port must differ from server.port"),
    (("server.lmstudio_port", "server.port", "server.ollama_port"),
     lambda c: c.server.lmstudio_port == 0 or c.server.lmstudio_port not in (c.server.port, c.server.ollama_port),
     "server.lmstudio_port must differ from server.port and server.ollama_port"),
    (("security.oidc.issuer", "security.oidc.audience"),
     lambda c: not c.security.oidc.issuer or bool(c.security.oidc.audience),
     "security.oidc.issuer needs security.oidc.audience (the aud tokens must name)"),
    (("security.oidc.issuer", "security.oidc.jwks_url"),
     lambda c: all(secure_url(u) for u in (c.security.oidc.issuer, c.security.oidc.jwks_url) if u),
     "security.oidc.issuer and security.oidc.jwks_url must be https:// (http:// only on a loopback host): "
     "keys fetched in clear text could be swapped by anyone on the path"),
    (("security.oidc.client_id", "security.oidc.client_secret"),
     lambda c: bool(c.security.oidc.client_id) == bool(c.security.oidc.client_secret),
     "security.oidc.client_id and security.oidc.client_secret (secret:NAME) must be given together"),
    (("security.oidc.client_id", "security.oidc.issuer", "security.oidc.introspection_url"),
     lambda c: not c.security.oidc.client_id or (bool(c.security.oidc.issuer) and (
         not c.security.oidc.introspection_url or secure_url(c.security.oidc.introspection_url))),
     "security.oidc.client_id needs security.oidc.issuer, and security.oidc.introspection_url must be https:// "
     "(http:// only on a loopback host): the client secret and tokens travel in that request"),
    (("security.oidc.issuer", "security.auth"),
     lambda c: not c.security.oidc.issuer or c.security.auth == "required",
     "security.oidc.issuer needs security.auth=required (with auth off no credential is checked)"),
    (("server.tls_certfile", "server.tls_keyfile"),
     lambda c: bool(c.server.tls_certfile) == bool(c.server.tls_keyfile),
     "server.tls_certfile and server.tls_keyfile must be given together (both or neither)"),
    (("state.backend", "state.redis_url"),
     lambda c: c.state.backend != "redis" or bool(c.state.redis_url),
     "state.backend=redis needs state.redis_url"),
]


def secure_url(url: str) -> bool:
    """True for an https URL, or an http one on a loopback host (a test provider); no DNS lookup."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        return parts.scheme == "https" and bool(host)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def validate_config(config: Config, sources: Mapping[str, str] | None = None) -> Config:
    """Check every field of every section against its declared `Check`, then `CROSS_RULES`.

    Raises one `ConfigError` whose single line names each bad key, its value, where the value came from
    (`sources`: dotted key -> YAML path, environment variable or "override") and what is allowed.
    Returns `config` so callers can chain it.
    """
    sources = sources or {}
    problems: list[str] = []
    for dotted, value, kind, check in iter_fields(config):
        where = f"{sources[dotted]}: " if dotted in sources else ""
        if not _is_type(value, kind):
            problems.append(f"{where}{dotted} must be {kind.__name__}, got {value!r}")
        elif not check.allows(value):
            problems.append(f"{where}{dotted}={value!r} is out of range: allowed {check.describe()}")
    for keys, holds, rule in CROSS_RULES if not problems else ():
        if not holds(config):
            values = ", ".join(f"{k}={_get(config, k)!r}" for k in keys)
            where = ", ".join(sorted({sources[k] for k in keys if k in sources}))
            problems.append(f"{where + ': ' if where else ''}{rule} (got {values})")
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def iter_fields(config: Any, prefix: str = "") -> list[tuple[str, Any, type, Check]]:
    """(dotted key, value, field type, Check) for every key of every section, in declaration order."""
    out: list[tuple[str, Any, type, Check]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out += iter_fields(value, prefix=f"{prefix}{f.name}.")
        else:
            kind = type(f.default) if f.default is not dataclasses.MISSING else type(value)
            out.append((f"{prefix}{f.name}", value, kind, f.metadata.get("check", Check())))
    return out


def _is_type(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _apply_mapping(config: Any, data: Mapping[str, Any], source: str, prefix: str = "",
                   sources: dict[str, str] | None = None) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at {prefix or 'top level'}")
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _apply_mapping(config, value, source, prefix=dotted + ".", sources=sources)
        else:
            set_key(config, dotted, value, source, sources)


def _coerce(value: Any, kind: type, dotted: str, source: str) -> Any:
    try:
        if kind is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return lowered in ("1", "true", "yes", "on")
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        if kind is str and isinstance(value, bool):
            return "on" if value else "off"  # YAML 1.1 reads a bare `auth: off` as false
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
