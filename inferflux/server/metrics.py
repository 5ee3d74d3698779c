"""Prometheus metrics for `/metrics`: request counters, latency histograms, engine gauges.

Each `ServerMetrics` owns a private `CollectorRegistry` instead of the
process-global one, so several apps (and tests) can live in one process
without "Duplicated timeseries" errors or leaking counts into each other.

Exposed names (a stable interface, see ARCHITECTURE.md). prometheus_client
appends `_total` to counter names itself, so counters are declared without it:

    inferflux:requests_total{endpoint,status}
    inferflux:prompt_tokens_total
    inferflux:generation_tokens_total
    inferflux:request_success_total{finish_reason}
    inferflux:time_to_first_token_seconds      (histogram)
    inferflux:inter_token_latency_seconds      (histogram)
    inferflux:e2e_request_latency_seconds      (histogram)
    inferflux:num_requests_running             (gauge)
    inferflux:num_requests_waiting             (gauge)
    inferflux:kv_cache_usage_perc              (gauge, 0..1)
    inferflux:num_preemptions_total
    inferflux:prefix_cache_queries_total
    inferflux:prefix_cache_hits_total
    vllm:num_requests_running                  (gauge, same value)
    vllm:num_requests_waiting                  (gauge, same value)
    vllm:kv_cache_usage_perc                   (gauge, same value)
    inferflux:backend_info{device,dtype,kernels}     (gauge, 1: what runs the model)
    inferflux:dialect_requests_total{dialect,status_class}  (blueprint: openai, ollama, ...; 2xx/4xx/5xx)
    inferflux:prompt_tokens_per_second         (gauge, over the last 30 s of scrapes)
    inferflux:generation_tokens_per_second     (gauge, same window)
    inferflux:queued_prompt_tokens             (gauge: prompt tokens not yet computed; autoscaling hint)
    inferflux:kv_page_pressure                 (gauge: (pages used + pages the queue needs) / pages)
    inferflux:adapter_requests_total{adapter}  (generation requests per LoRA adapter; "base" for none)
    vllm:lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters}  (gauge; LoRA on only)
    inferflux:policy_decisions_total{decision}
    inferflux:rate_limited_requests_total{dialect}  (429s from tenant limits; no tenant label)
    vllm:spec_decode_num_drafts_total          (speculative verifications: one sequence's proposals in a step)
    vllm:spec_decode_num_draft_tokens_total    (tokens proposed and verified)
    vllm:spec_decode_num_accepted_tokens_total (of those, accepted)
    inferflux:spec_decode_acceptance_rate      (gauge: accepted / proposed, since start)
    inferflux:spec_decode_mean_accepted_length (gauge: tokens emitted per verification, accepted + 1)

The `vllm:` gauges exist because KEDA, llm-d and the Gateway API inference
extension read exactly those names to autoscale and route. Every series carries
`model_name` (vLLM's label name, which those tools filter on) and `backend`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from inferflux.engine.request import EngineStats

# Buckets span both ends of what we serve: a GPU answers a short prompt in
# milliseconds, while a 2-core CPU decodes a 1B model at a few tokens/s and a
# long prompt there takes minutes to prefill. Same spirit as vLLM's ranges,
# coarser in the tail where no SLO lives.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
ITL_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
)  # fmt: skip
E2E_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 45.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0,
)  # fmt: skip

_BASE_LABELS = ("model_name", "backend")

RATE_WINDOW_S = 30.0  # tokens/s gauges: the rate over the scrapes of the last this-many seconds

# Engine-side running totals mirrored as counters: EngineStats field -> counter attribute.
_ENGINE_TOTALS = {
    "prompt_tokens": "_prompt_tokens",
    "generation_tokens": "_generation_tokens",
    "num_preemptions": "_preemptions",
    "prefix_queries": "_prefix_queries",
    "prefix_hits": "_prefix_hits",
    "spec_num_drafts": "_spec_drafts",
    "spec_draft_tokens": "_spec_draft_tokens",
    "spec_accepted_tokens": "_spec_accepted_tokens",
}


class ServerMetrics:
    """All server metrics for one model on one backend, in a registry of their own."""

    def __init__(self, model: str, backend: str) -> None:
        self.model = model
        self.backend = backend
        self.registry = CollectorRegistry(auto_describe=True)
        base = {"model_name": model, "backend": backend}
        reg = self.registry

        def counter(name: str, doc: str):
            return Counter(name, doc, _BASE_LABELS, registry=reg).labels(**base)

        def gauge(name: str, doc: str):
            return Gauge(name, doc, _BASE_LABELS, registry=reg).labels(**base)

        def histogram(name: str, doc: str, buckets: Sequence[float]):
            return Histogram(name, doc, _BASE_LABELS, registry=reg, buckets=buckets).labels(**base)

        # Labelled per call; the base labels are bound in observe_* below.
        self._requests = Counter(
            "inferflux:requests",
            "HTTP requests by endpoint (route template, not raw path) and status code.",
            (*_BASE_LABELS, "endpoint", "status"),
            registry=reg,
        )
        self._success = Counter(
            "inferflux:request_success",
            "Finished generation requests by finish reason (stop, length, abort).",
            (*_BASE_LABELS, "finish_reason"),
            registry=reg,
        )

        # Counted by the engine as it computes them, so aborted requests count too (as in vLLM).
        self._prompt_tokens = counter(
            "inferflux:prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)."
        )
        self._generation_tokens = counter("inferflux:generation_tokens", "Tokens generated.")
        self._ttft = histogram(
            "inferflux:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self._itl = histogram(
            "inferflux:inter_token_latency_seconds",
            "Time between consecutive output tokens (one observation per gap).",
            ITL_BUCKETS,
        )
        self._e2e = histogram(
            "inferflux:e2e_request_latency_seconds",
            "Arrival to last token, per finished request.",
            E2E_BUCKETS,
        )

        self._running = gauge("inferflux:num_requests_running", "Requests in the running batch.")
        self._waiting = gauge("inferflux:num_requests_waiting", "Requests queued for admission.")
        self._kv_usage = gauge(
            "inferflux:kv_cache_usage_perc", "Fraction of KV cache pages in use (0..1)."
        )
        self._vllm_running = gauge(
            "vllm:num_requests_running", "Requests in the running batch (vLLM-compatible name)."
        )
        self._vllm_waiting = gauge(
            "vllm:num_requests_waiting", "Requests queued for admission (vLLM-compatible name)."
        )
        self._vllm_kv_usage = gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV cache pages in use, 0..1 (vLLM-compatible name).",
        )

        self._model_loads = counter(
            "inferflux:model_loads", "Models loaded on demand (Ollama-style keep-alive and eviction)."
        )
        self._model_unloads = counter(
            "inferflux:model_unloads", "Models unloaded (keep-alive expired, evicted, deleted or replaced)."
        )
        self._models_loaded = gauge("inferflux:models_loaded", "Models loaded now.")

        self._preemptions = counter(
            "inferflux:num_preemptions", "Requests preempted because KV pages ran out."
        )
        self._prefix_queries = counter(
            "inferflux:prefix_cache_queries", "Full prompt pages looked up in the prefix cache."
        )
        self._prefix_hits = counter(
            "inferflux:prefix_cache_hits", "Full prompt pages found in the prefix cache."
        )

        # Speculative decoding (engine/speculative.py), under vLLM's names.
        self._spec_drafts = counter("vllm:spec_decode_num_drafts",
                                    "Speculative verifications (one sequence's proposals in one step).")
        self._spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Tokens proposed and verified.")
        self._spec_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens",
                                             "Proposed tokens accepted (equal to the token the target sampled).")
        self._spec_acceptance = gauge("inferflux:spec_decode_acceptance_rate",
                                      "Accepted / proposed tokens since the engine started (0 when none).")
        self._spec_mean_length = gauge("inferflux:spec_decode_mean_accepted_length",
                                       "Tokens emitted per verification (accepted proposals + 1) since start.")

        self._backend_info = Gauge(
            "inferflux:backend_info", "What runs the model: device kind, compute dtype, kernels (value 1).",
            (*_BASE_LABELS, "device", "dtype", "kernels"), registry=reg)
        self._dialect_requests = Counter(
            "inferflux:dialect_requests", "HTTP requests by dialect (openai, ollama, lmstudio, anthropic, "
            "responses, ops, admin, ...) and status class (2xx, 4xx, 5xx).",
            (*_BASE_LABELS, "dialect", "status_class"), registry=reg)
        self._prompt_rate = gauge("inferflux:prompt_tokens_per_second",
                                  f"Prompt tokens computed per second over the last {RATE_WINDOW_S:g} s.")
        self._generation_rate = gauge("inferflux:generation_tokens_per_second",
                                      f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.")
        self._queued_prompt_tokens = gauge(
            "inferflux:queued_prompt_tokens",
            "Prompt tokens waiting to be computed (queued requests and prompts in prefill): scale out on it.")
        self._kv_pressure = gauge(
            "inferflux:kv_page_pressure",
            "(KV pages in use + pages the waiting requests need) / pages; above 1 the queue cannot fit.")
        self._adapter_requests = Counter(
            "inferflux:adapter_requests", "Generation requests by LoRA adapter (\"base\": none).",
            (*_BASE_LABELS, "adapter"), registry=reg)
        # vLLM's exact name and labels (comma-separated adapter names; the value is the time of the update). Only
        # the latest label set is kept, so old adapter combinations do not pile up as series.
        self._lora_info = Gauge(
            "vllm:lora_requests_info", "Running stats on LoRA requests (vLLM-compatible name and labels).",
            ("max_lora", "running_lora_adapters", "waiting_lora_adapters"), registry=reg)
        self._policy_decisions = Counter(
            "inferflux:policy_decisions", "Policy decisions on requests (allow, deny:<rule>, ...).",
            (*_BASE_LABELS, "decision"), registry=reg)
        self._rate_limited = Counter(
            "inferflux:rate_limited_requests", "Requests refused with 429 by a tenant limit, by dialect.",
            (*_BASE_LABELS, "dialect"), registry=reg)
        # (monotonic time, cumulative prompt tokens, cumulative generated tokens) at each engine update.
        self._rate_samples: deque[tuple[float, float, float]] = deque()
        self._cumulative = [0.0, 0.0]

        # Last engine totals seen, so counters advance by deltas. Guarded by a lock
        # because the engine thread and a scrape-time refresh may both call update_engine.
        self._lock = threading.Lock()
        self._last_totals: dict[str, int] = {field: 0 for field in _ENGINE_TOTALS}

    # --- per request -------------------------------------------------------------

    def observe_request(self, endpoint: str, status: int) -> None:
        """Count one HTTP response. Pass the route template so label cardinality stays bounded."""
        self._requests.labels(self.model, self.backend, endpoint, str(status)).inc()

    def observe_finished(
        self,
        ttft_s: float | None,
        itl_s: Sequence[float],
        e2e_s: float,
        finish_reason: str,
    ) -> None:
        """Record one finished generation.

        `ttft_s` is None when the request ended before its first token (aborted,
        or rejected by the engine): observing a made-up value would skew the
        TTFT distribution. Token counts come from the engine (`update_engine`).
        """
        self._success.labels(self.model, self.backend, finish_reason).inc()
        if ttft_s is not None:
            self._ttft.observe(ttft_s)
        for gap in itl_s:
            self._itl.observe(gap)
        self._e2e.observe(e2e_s)

    def observe_dialect(self, dialect: str, status: int, rate_limited: bool = False) -> None:
        """Count one response by dialect (its blueprint) and status class; a tenant limit's 429 counts apart too."""
        self._dialect_requests.labels(self.model, self.backend, dialect or "none", f"{status // 100}xx").inc()
        if rate_limited:
            self._rate_limited.labels(self.model, self.backend, dialect or "none").inc()

    def observe_adapter(self, adapter: str | None) -> None:
        self._adapter_requests.labels(self.model, self.backend, adapter or "base").inc()

    def set_lora_info(self, running: Sequence[str], waiting: Sequence[str], max_lora: int) -> None:
        """`vllm:lora_requests_info`: the adapters of running and waiting requests, as one labelled series."""
        self._lora_info.clear()
        self._lora_info.labels(str(max_lora), ",".join(running), ",".join(waiting)).set_to_current_time()

    def observe_policy(self, decision: str) -> None:
        self._policy_decisions.labels(self.model, self.backend, decision).inc()

    def set_backend_info(self, device: str, dtype: str, kernels: str) -> None:
        """Say what runs the model (replacing what a previous model said)."""
        self._backend_info.clear()
        self._backend_info.labels(self.model, self.backend, device, dtype, kernels).set(1)

    # --- models ------------------------------------------------------------------

    def model_loaded(self) -> None:
        self._model_loads.inc()

    def model_unloaded(self) -> None:
        self._model_unloads.inc()

    def set_models_loaded(self, count: int) -> None:
        self._models_loaded.set(count)

    # --- engine state ------------------------------------------------------------

    def update_engine(self, stats: EngineStats) -> None:
        """Mirror an engine snapshot: gauges take the values, totals advance counters by the delta.

        The engine keeps running totals, and a model reload builds a new engine whose
        totals restart at 0. A Prometheus counter must never go down (rate() would
        read a drop as a reset and a huge spike), so a total lower than the last one
        seen is taken as a restart: the counter advances by the new total itself.
        """
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._kv_usage.set(stats.kv_cache_usage)
        self._vllm_running.set(stats.num_running)
        self._vllm_waiting.set(stats.num_waiting)
        self._vllm_kv_usage.set(stats.kv_cache_usage)
        self._queued_prompt_tokens.set(stats.queued_prompt_tokens)
        self._kv_pressure.set(stats.kv_page_pressure)
        drafted, accepted, drafts = stats.spec_draft_tokens, stats.spec_accepted_tokens, stats.spec_num_drafts
        self._spec_acceptance.set(accepted / drafted if drafted else 0.0)
        self._spec_mean_length.set(1 + accepted / drafts if drafts else 0.0)
        with self._lock:
            for field, attr in _ENGINE_TOTALS.items():
                value = int(getattr(stats, field))
                last = self._last_totals[field]
                delta = value - last if value >= last else value
                if delta > 0:
                    getattr(self, attr).inc(delta)
                    if field in ("prompt_tokens", "generation_tokens"):
                        self._cumulative[field == "generation_tokens"] += delta
                self._last_totals[field] = value
            self._update_rates(time.monotonic())

    def _update_rates(self, now: float) -> None:
        """Tokens/s over the window: (newest - oldest sample) / time between them (under the lock)."""
        samples = self._rate_samples
        samples.append((now, self._cumulative[0], self._cumulative[1]))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        first, last = samples[0], samples[-1]
        span = last[0] - first[0]
        self._prompt_rate.set((last[1] - first[1]) / span if span > 0 else 0.0)
        self._generation_rate.set((last[2] - first[2]) / span if span > 0 else 0.0)

    def engine_replaced(self) -> None:
        """Forget the old engine's totals; call when a reload swaps in a new engine.

        update_engine detects a restart only when the new total is lower than the
        old one; a new engine that overtook the old count before its first update
        would otherwise be under-counted by the old engine's total.
        """
        with self._lock:
            self._last_totals = {field: 0 for field in _ENGINE_TOTALS}

    # --- exposition --------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
