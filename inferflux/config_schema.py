"""Every configuration key: the section dataclasses, each field with its default and allowed values.

`key(default, lo=..., hi=..., choices=...)` keeps a field's check in its metadata, and `config.py`
(the loader: files, environment, overrides, the rules between keys) checks every field through it.
Split from config.py so that the list of keys, which grows with every feature, and the machinery
that reads them are each a file a reader can take in at once. `configs/default.yaml` equals these
defaults (a test checks it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Check:
    """The values one key allows. Empty means any value of the field's type (booleans, free text)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed (e.g. memory_fraction > 0)
    zero: bool = False  # 0 is allowed besides [lo, hi]: the "derive it" / "off" value
    choices: tuple[str, ...] = ()
    pattern: str = ""  # a full-match regex for strings, described by `what`
    what: str = ""

    def describe(self) -> str:
        """The allowed range as an error message shows it."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.pattern:
            return self.what
        lo, hi = _number(self.lo), _number(self.hi)
        if self.lo is None or self.hi is None:
            text = (f"at least {lo}" if self.lo is not None else f"at most {hi}" if self.hi is not None
                    else self.what or "any value")
        else:
            text = f"more than {lo} and at most {hi}" if self.lo_open else f"{lo} to {hi}"
        return f"0, or {text}" if self.zero else text

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.pattern:
            return isinstance(value, str) and re.fullmatch(self.pattern, value) is not None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # the type is checked separately
        if self.zero and value == 0:
            return True
        if math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi


def _number(value: float | None) -> str:
    return "" if value is None else str(int(value)) if float(value).is_integer() else f"{value:g}"


def key(default: Any, **check: Any) -> Any:
    """A config field with its default and its allowed values (`Check`'s fields) in one place."""
    return dataclasses.field(default=default, metadata={"check": Check(**check)})


_MAX = 1 << 24  # upper bound for counts that only need to be "not absurd" (pages, tokens, lengths)
_PORT = {"lo": 1, "hi": 65535}
# Ollama's keep_alive forms: seconds ("300", "-1") or a Go duration ("5m", "1h30m", "250ms").
_DURATION = r"[+-]?((\d+\.?\d*|\.\d+)|((\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)"


@dataclasses.dataclass
class RuntimeConfig:
    """How the model runs: KV cache size, batching limits, compilation buckets."""

    # Tokens per KV-cache page.
    page_size: int = key(16, lo=1, hi=1024)
    # Pages in the KV cache (page 0 is reserved as the null page). 0 = derive from memory_fraction.
    num_pages: int = key(0, lo=2, hi=_MAX, zero=True)
    # Reuse KV pages of prompts that share a prefix (chained page hashes, LRU eviction).
    prefix_caching: bool = key(True)
    # Fraction of free device memory (after weights) given to the KV cache when num_pages is 0.
    memory_fraction: float = key(0.5, lo=0.0, lo_open=True, hi=1.0)
    # On CPU, the most host memory a derived KV cache takes (GiB): RAM is shared with the weights, the page cache
    # and other processes, and zero-filling a larger cache at start costs seconds (vLLM's CPU default is 4 GiB).
    kv_cache_cpu_gib: float = key(4.0, lo=0.0, lo_open=True, hi=1 << 20)
    # Hard cap on pages when derived from memory (CPU hosts report little about free memory).
    max_pages_from_memory: int = key(16384, lo=2, hi=_MAX)
    # Longest sequence (prompt + output) in tokens; 0 = the model's context length.
    max_model_len: int = key(0, lo=1, hi=_MAX, zero=True)
    # Most sequences in one step.
    max_num_seqs: int = key(32, lo=1, hi=4096)
    # Most tokens (prefill chunk tokens + decode tokens) in one step.
    max_num_batched_tokens: int = key(512, lo=1, hi=1 << 20)
    # Smallest bucket of tokens per step (buckets are powers of two up to max_num_batched_tokens). 0 = by
    # backend: 2 where attention updates the KV cache in place at any step size (CPU with the kernel library:
    # the kernels skip padding rows; 1 would break bitwise batch invariance, docs/runtime.md), else 8.
    min_token_bucket: int = key(0, lo=1, hi=1 << 20, zero=True)
    # Top logprobs computed per row in every step (requests may ask for up to this many).
    max_logprobs: int = key(20, lo=0, hi=1024)
    # Most logit_bias entries per request (OpenAI allows 300); sets a fixed width of the compiled step.
    max_logit_bias: int = key(300, lo=0, hi=16384)
    # Buckets of pages per sequence grow by this factor: 1, 16, 256, ... up to max_model_len / page_size.
    # Coarser buckets mean fewer programs; attention loops over a sequence's real pages only, so a padded
    # block table costs little (docs/runtime.md).
    page_bucket_growth: int = key(16, lo=2, hi=1024)
    # Most compiled programs kept (step, prompt-scoring and embedding programs together). Past it, or while
    # the process holds over half of vm.max_map_count memory maps (XLA:CPU maps every kernel), the least
    # recently used program is dropped and compiled again when needed. Warm-up never compiles more.
    max_compiled_programs: int = key(128, lo=1, hi=100_000)
    # Keep compiled step programs whole on disk next to the XLA cache, so a warm restart deserializes them
    # instead of tracing and lowering every bucket again (engine/executable_cache.py). XLA's cache is then kept
    # per code version, so a code change means a cold start: on in the images and the chart, off for development.
    cache_executables: bool = key(False)
    # Overlapped steps (docs/runtime.md): while a decode step runs on the device, the next one is packed and
    # dispatched with its tokens fed on the device from the running step's samples, and the running step's
    # tokens are then detokenized and streamed. "auto": on for GPU and TPU, off on CPU, where the host thread
    # competes with the kernels for the same cores; "on"/"off" force it.
    overlap_steps: str = key("auto", choices=("auto", "on", "off"))
    # Compile every bucket at start-up (at most max_compiled_programs), in a thread pool.
    warmup: bool = key(False)
    warmup_threads: int = key(4, lo=1, hi=256)
    # With warmup: step programs already stored on disk (cache_executables) past the smallest token bucket load on
    # a background thread once the engine is ready; a step needing one first loads it itself (engine/warmup.py).
    warmup_background: bool = key(True)
    # "auto" (float32 on CPU, bfloat16 elsewhere), "float32" or "bfloat16".
    dtype: str = key("auto", choices=("auto", "float32", "bfloat16", "float16"))
    # CPU matmuls on quantized GGUF weights: "auto" (the C++ kernels on the raw blocks, activations quantized
    # to int8 per block as llama.cpp does; float32 weights where the kernels are unavailable), "exact" (blocks
    # kept packed, dequantized to float32 inside the step: f32 products, slow, a check) or "off" (dequantize
    # to float32 at load). The INFERFLUX_CPU_KERNELS=off environment variable forces "off".
    cpu_kernels: str = key("auto", choices=("auto", "exact", "off"))
    # Split each model over this many devices of the host (Megatron layout: heads and MLP columns, KV cache
    # by KV head; engine/tensor_parallel.py). It must divide the attention and KV head counts. With N > 1
    # weights are dense and attention is the jax.numpy reference (the kernels are not partitioned yet).
    tensor_parallel: int = key(1, lo=1, hi=256)
    # LoRA adapter slots held on the device (docs/engine.md): 0 = LoRA off (no extra parameters, inputs or
    # cost). Each slot costs rank x (in + out) per targeted projection, and every step computes every slot.
    max_loras: int = key(0, lo=0, hi=256)
    # Largest adapter rank a slot holds (smaller ranks are zero-padded); an adapter above it is refused.
    max_lora_rank: int = key(16, lo=1, hi=1024)
    # How LLM embeddings pool the final hidden states: "mean" or "last" (token).
    embedding_pooling: str = key("mean", choices=("mean", "last"))
    # Default seed for requests that give none (each request still gets its own stream).
    seed: int = key(0, lo=0, hi=(1 << 63) - 1)


@dataclasses.dataclass
class ServerConfig:
    """The HTTP server: where it listens, which model names it answers to, and its limits."""

    host: str = key("127.0.0.1", pattern=r"\S+", what="a host name or address (not empty)")
    port: int = key(8080, **_PORT)
    # The model id clients use; empty = the model file's name. Aliases: comma-separated extra ids.
    served_model_name: str = key("")
    model_aliases: str = key("")
    # Accept any model id in requests (single-model servers behind tools that send fixed names).
    accept_any_model: bool = key(False)
    # LoRA adapters loaded into the model at start (needs runtime.max_loras): comma-separated NAME=SOURCE, SOURCE a
    # PEFT folder, a GGUF LoRA file or a stored adapter's name; a bare NAME is the stored adapter of that name.
    lora_modules: str = key("")
    # On SIGTERM/SIGINT: stop accepting, let running streams finish for this long, then abort the rest.
    drain_seconds: float = key(30.0, lo=0, hi=86400)
    max_body_bytes: int = key(4_194_304, lo=1, hi=1 << 40)
    # Requests waiting for the engine beyond this get 503 (0: any request that would have to wait).
    max_queued_requests: int = key(1024, lo=0, hi=_MAX)
    # Browser origins allowed to call the server, comma-separated, any port; "*" allows any. Requests from
    # other origins get 403 (as Ollama does). OLLAMA_ORIGINS, if set, adds to the list.
    cors_origins: str = key("http://localhost,https://localhost,http://127.0.0.1,https://127.0.0.1,http://0.0.0.0")
    # Also listen on this port (e.g. 11434, Ollama's), serving the same app; 0 = off.
    ollama_port: int = key(0, **_PORT, zero=True)
    # Also listen on this port (e.g. 1234, LM Studio's), serving the same app; 0 = off.
    lmstudio_port: int = key(0, **_PORT, zero=True)
    # /admin/* routes (reload, tenants, keys) with security.auth off; with auth required they are always
    # served, to keys with the admin scope.
    admin_enabled: bool = key(False)
    # The /debug page (KV page map, queues, token traces; docs/observability.md) with security.auth off. With
    # auth required it is always served, to keys with the admin scope.
    debug_ui: bool = key(False)
    # Default max_tokens when a request gives none; 0 = up to the context window.
    default_max_tokens: int = key(0, lo=1, hi=_MAX, zero=True)
    # How long a model loaded on demand (a stored model) stays loaded after its last request when the
    # request gives no keep_alive: a duration ("5m", "1h30m", "30s"), seconds ("300"), "0" (unload once
    # idle) or negative (forever). The model given to `inferctl serve` stays loaded unless a request's
    # keep_alive (or the loaded-model cap) says otherwise.
    keep_alive: str = key("5m", pattern=_DURATION, what="seconds or a duration like 5m, 1h30m, 30s, 0, -1")
    # Most models loaded at once, each with its own engine and KV cache; 0 = no limit. A request for
    # another model first unloads the least recently used idle one.
    max_loaded_models: int = key(1, lo=0, hi=1024)
    # How long a stored Responses API response (`store: true`, in state.db) is kept: a duration (30d, 12h,
    # 90m, 2w, 1d12h), or "0" for until deleted. Expired ones are unreadable at once and pruned on a write.
    responses_retention: str = key("30d", pattern=r"0|(\d+[smhdw])+", what="a duration like 30d, 12h, 90m, or 0")
    # TLS without a proxy in front: a PEM certificate (chain) and its private key; both or neither.
    tls_certfile: str = key("")
    tls_keyfile: str = key("")


@dataclasses.dataclass
class OidcConfig:
    """Bearer JWTs from an OpenID Connect provider, besides API keys (docs/security.md). Off while issuer is empty."""

    # The provider's issuer URL, exactly as tokens' `iss` holds it (https, or http on a loopback host).
    issuer: str = key("", pattern=r"(https?://\S+)?", what="empty or an http(s):// URL")
    # The `aud` a token must name: this server's client id / API identifier at the provider.
    audience: str = key("")
    # Where the signing keys are; empty = the `jwks_uri` of <issuer>/.well-known/openid-configuration.
    jwks_url: str = key("", pattern=r"(https?://\S+)?", what="empty or an http(s):// URL")
    # The claim naming the token's tenant (a token without it is refused with 401).
    tenant_claim: str = key("tenant", pattern=r"\S+", what="a claim name")
    # The claim holding scopes: a space-separated string or a list; unknown scopes are ignored.
    scopes_claim: str = key("scope", pattern=r"\S+", what="a claim name")
    # Clock skew allowed on exp and nbf.
    leeway_seconds: int = key(30, lo=0, hi=600)
    # Keys are fetched again after this long (a key the provider dropped stops working then).
    jwks_cache_seconds: int = key(3600, lo=10, hi=86400 * 7)
    # At most one fetch per this many seconds for tokens naming an unknown key id (garbage must not
    # hammer the provider).
    jwks_min_refresh_seconds: int = key(10, lo=1, hi=3600)
    # This server's client id at the provider: with client_secret, opaque (non-JWT) bearer tokens are checked by
    # RFC 7662 token introspection, authenticated with HTTP Basic client_id:client_secret. Empty: JWTs only.
    client_id: str = key("")
    # The client secret, as a reference to a stored secret (`secret:NAME`, set with `inferctl admin secrets set
    # NAME`): never the value itself, so no config file or log holds it.
    client_secret: str = key("", pattern=r"(secret:[A-Za-z0-9][A-Za-z0-9._:/-]{0,127})?",
                             what="empty or secret:NAME (a stored secret, never the value itself)")
    # The introspection endpoint; empty = `introspection_endpoint` of the discovery document.
    introspection_url: str = key("", pattern=r"(https?://\S+)?", what="empty or an http(s):// URL")
    # An introspection answer is reused this long (bounded by the token's exp): a revoked token works at most
    # this much longer; 0 = ask the provider on every request.
    introspection_cache_seconds: int = key(30, lo=0, hi=3600)


@dataclasses.dataclass
class SecurityConfig:
    """Who may use the server (docs/security.md). Read at start-up; a reload does not change them."""

    # "off" (no keys; the desktop default, loopback addresses only) or "required" (every route but the
    # probes needs an API key with the route's scope; keys live in $INFERFLUX_HOME/state.db).
    auth: str = key("off", choices=("off", "required"))
    # Serve with auth off on an address other machines can reach (behind a proxy that authenticates).
    allow_unauthenticated: bool = key(False)
    # /metrics without a key when auth is required (for a Prometheus that cannot send one).
    public_metrics: bool = key(False)
    oidc: OidcConfig = dataclasses.field(default_factory=OidcConfig)
    # A file holding the master key that encrypts stored secrets (32 bytes as base64 or hex, one line);
    # the INFERFLUX_MASTER_KEY environment variable, if set, wins. Empty: env only (docs/security.md).
    master_key_file: str = key("")
    # Refuse to serve, pull or load a model that no key in security.trusted_keys signed (OpenSSF
    # model-signing signatures, made with `inferctl sign` or the model_signing CLI; store/signing.py).
    require_signed_models: bool = key(False)
    # The public keys (PEM files, comma-separated) whose signatures security.require_signed_models accepts.
    trusted_keys: str = key("")


@dataclasses.dataclass
class StateConfig:
    """Where tenants, API keys (and rate-limit counters) live: one host's SQLite, or a Redis that replicas share."""

    # "sqlite" ($INFERFLUX_HOME/state.db, one host) or "redis" (state.redis_url, shared by many replicas).
    backend: str = key("sqlite", choices=("sqlite", "redis"))
    # redis://[:password@]host:port/db or rediss:// (TLS); required with backend redis.
    redis_url: str = key("", pattern=r"(rediss?|unix)://\S+|", what="empty or a redis://, rediss:// or unix:// URL")


@dataclasses.dataclass
class OpaConfig:
    """An OPA decision on each generation request (server/policy/opa.py): a remote OPA, or a local .rego file."""

    # An OPA server's base URL (http://opa:8181): POST <url>/v1/data/<path>. Empty: no remote OPA.
    url: str = key("", pattern=r"https?://\S+|", what="empty or an http(s):// URL")
    # A .rego file evaluated in-process (regorus) instead of a remote OPA. Empty: none.
    rego_file: str = key("")
    # The decision document: a boolean, or an object {allow, reason} (data.inferflux.allow = "inferflux/allow").
    path: str = key("inferflux/allow", pattern=r"[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*", what="a slash-separated rule path")
    # Allow requests when OPA cannot be reached or fails (default: deny them).
    fail_open: bool = key(False)
    # Cache each input's decision this long (the input holds policy_version); 0 = ask every time.
    cache_seconds: float = key(5.0, lo=0, hi=3600)
    timeout_ms: int = key(500, lo=10, hi=60_000)


@dataclasses.dataclass
class PolicyConfig:
    """Guardrails on the generation path (docs/security.md, "Policy"): hooks and OPA; documents are in state."""

    # Extra hooks, comma-separated `module:Class` (subclasses of inferflux.server.policy.hooks.PolicyHook).
    hooks: str = key("")
    # Seconds between checks of the stored policy_version (server/policy/watch.py): SQLite's only way to see a
    # change made outside this server, Redis's safety net under pub/sub. 0 = never (Redis: pub/sub only).
    poll_seconds: float = key(1.0, lo=0, hi=3600)
    opa: OpaConfig = dataclasses.field(default_factory=OpaConfig)


@dataclasses.dataclass
class AuditConfig:
    """The hash-chained audit log in $INFERFLUX_HOME/audit/ (docs/security.md): a line per request and admin action."""

    enabled: bool = key(True)
    # Start the next file (audit-000002.jsonl, ...) when a line would make the current one larger than this.
    max_file_bytes: int = key(64 * 1024 * 1024, lo=256, hi=1 << 40)
    # fsync the log at most this often (records are written at once, made durable in batches); 0 = every batch.
    fsync_interval_ms: int = key(1000, lo=0, hi=60_000)


@dataclasses.dataclass
class TelemetryConfig:
    """OpenTelemetry traces of GenAI requests (docs/observability.md). Off while otlp_endpoint is empty."""

    # The collector: http/protobuf posts to <endpoint>/v1/traces (an endpoint ending in /v1/traces is used
    # as is); grpc takes host:port or http(s)://host:port. Empty = no tracing and no SDK objects at all.
    otlp_endpoint: str = key("")
    protocol: str = key("http/protobuf", choices=("http/protobuf", "grpc"))
    service_name: str = key("inferflux", pattern=r"\S+", what="a service name (not empty)")
    # Fraction of new traces kept (a request that arrives with a sampled traceparent follows its parent).
    sampling_ratio: float = key(1.0, lo=0, hi=1)
    # Put prompts and generated text on the spans (gen_ai.input.messages / gen_ai.output.messages).
    capture_content: bool = key(False)


@dataclasses.dataclass
class SpeculativeConfig:
    """Speculative decoding (docs/speculative.md): proposals verified in one step, output unchanged."""

    # off; ngram: propose the tokens that followed the latest earlier occurrence of the sequence's last
    # n tokens (prompt lookup), for n from prompt_lookup_max down to prompt_lookup_min; draft: draft_model
    # proposes greedily (same vocabulary; its own KV cache and programs on the engine thread).
    method: str = key("off", choices=("off", "ngram", "draft"))
    num_speculative_tokens: int = key(4, lo=1, hi=64)
    prompt_lookup_min: int = key(2, lo=1, hi=64)
    prompt_lookup_max: int = key(4, lo=1, hi=64)
    # method=draft: a model file or folder, or a stored model's name (e.g. a smaller or more quantized GGUF).
    draft_model: str = key("")


@dataclasses.dataclass
class Config:
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    speculative: SpeculativeConfig = dataclasses.field(default_factory=SpeculativeConfig)
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    state: StateConfig = dataclasses.field(default_factory=StateConfig)
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    audit: AuditConfig = dataclasses.field(default_factory=AuditConfig)
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)
    # Where models, the XLA compilation cache and state live. Default: $INFERFLUX_HOME or ~/.inferflux.
    home: str = key("")

    @property
    def home_path(self) -> Path:
        return Path(self.home or os.environ.get("INFERFLUX_HOME") or Path.home() / ".inferflux").expanduser()
