"""ServerMetrics: exact exposed names, exact counter moves, histogram sums, monotonic engine totals.

Everything is read back through the Prometheus text parser, because the names
and values a scraper (Prometheus, KEDA, llm-d) sees are the interface, not the
Python objects behind them.
"""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferflux.engine.request import EngineStats
from inferflux.server.metrics import ServerMetrics

MODEL = "tiny-llama"
BACKEND = "cpu"

COUNTERS = [
    "inferflux:requests_total",
    "inferflux:prompt_tokens_total",
    "inferflux:generation_tokens_total",
    "inferflux:request_success_total",
    "inferflux:num_preemptions_total",
    "inferflux:prefix_cache_queries_total",
    "inferflux:prefix_cache_hits_total",
]
HISTOGRAMS = [
    "inferflux:time_to_first_token_seconds",
    "inferflux:inter_token_latency_seconds",
    "inferflux:e2e_request_latency_seconds",
]
GAUGES = [
    "inferflux:num_requests_running",
    "inferflux:num_requests_waiting",
    "inferflux:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
]


def _samples(m: ServerMetrics) -> list:
    body, _ = m.render()
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def _types(m: ServerMetrics) -> dict[str, str]:
    """Sample name -> family type, so a gauge exposed under a counter's name is caught."""
    body, _ = m.render()
    return {s.name: fam.type for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def _value(m: ServerMetrics, name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels` (0.0 if absent, as Prometheus reads it)."""
    hits = [s for s in _samples(m) if s.name == name and labels.items() <= s.labels.items()]
    assert len(hits) <= 1, f"ambiguous: {hits}"
    return hits[0].value if hits else 0.0


def _populated() -> ServerMetrics:
    m = ServerMetrics(MODEL, BACKEND)
    m.observe_request("/v1/chat/completions", 200)
    m.observe_finished(0.05, [0.01, 0.02], 0.1, "stop")
    m.observe_finished(None, [], 0.5, "abort")
    m.update_engine(
        EngineStats(
            num_running=2,
            num_waiting=1,
            kv_pages_used=3,
            kv_pages_total=12,
            prefix_queries=40,
            prefix_hits=16,
            num_preemptions=1,
        )
    )
    return m


def test_exact_names_and_types_are_exposed() -> None:
    """Dashboards and K8s schedulers match names literally: one renamed or retyped series breaks them."""
    types = _types(_populated())
    for name in COUNTERS:
        assert types.get(name) == "counter", name
    for name in GAUGES:
        assert types.get(name) == "gauge", name
    for name in HISTOGRAMS:
        for suffix in ("_bucket", "_count", "_sum"):
            assert types.get(name + suffix) == "histogram", name + suffix
    # prometheus_client adds _total itself: no doubled suffix may leak out.
    assert not [n for n in types if n.endswith("_total_total")]


def test_every_sample_has_model_and_backend_labels() -> None:
    """vLLM-compatible tooling filters on model_name; backend separates mixed fleets."""
    samples = _samples(_populated())
    assert samples
    for s in samples:
        assert s.labels.get("model_name") == MODEL, s
        assert s.labels.get("backend") == BACKEND, s


def test_request_counter_moves_by_exactly_the_calls() -> None:
    m = ServerMetrics(MODEL, BACKEND)
    m.observe_request("/v1/chat/completions", 200)
    m.observe_request("/v1/chat/completions", 200)
    m.observe_request("/v1/chat/completions", 429)
    m.observe_request("/api/generate", 200)
    name = "inferflux:requests_total"
    assert _value(m, name, endpoint="/v1/chat/completions", status="200") == 2
    assert _value(m, name, endpoint="/v1/chat/completions", status="429") == 1
    assert _value(m, name, endpoint="/api/generate", status="200") == 1
    assert _value(m, name, endpoint="/api/generate", status="500") == 0


def test_finished_requests_count_finish_reasons_and_engine_counts_tokens() -> None:
    m = ServerMetrics(MODEL, BACKEND)
    m.observe_finished(0.05, [0.01, 0.02], 0.1, "stop")
    m.observe_finished(0.2, [0.03, 0.03, 0.03], 0.4, "length")
    m.observe_finished(None, [], 0.5, "stop")
    m.update_engine(EngineStats(prompt_tokens=22, generation_tokens=7))
    m.update_engine(EngineStats(prompt_tokens=30, generation_tokens=9))
    assert _value(m, "inferflux:prompt_tokens_total") == 30
    assert _value(m, "inferflux:generation_tokens_total") == 9
    assert _value(m, "inferflux:request_success_total", finish_reason="stop") == 2
    assert _value(m, "inferflux:request_success_total", finish_reason="length") == 1
    assert _value(m, "inferflux:request_success_total", finish_reason="abort") == 0


def test_histograms_hold_exactly_the_observations() -> None:
    """TTFT skips requests without a first token; ITL gets one observation per gap."""
    m = ServerMetrics(MODEL, BACKEND)
    m.observe_finished(0.05, [0.01, 0.02], 0.1, "stop")
    m.observe_finished(0.2, [0.03, 0.04, 0.05], 0.4, "length")
    m.observe_finished(None, [], 0.5, "abort")

    ttft = "inferflux:time_to_first_token_seconds"
    assert _value(m, ttft + "_count") == 2
    assert _value(m, ttft + "_sum") == pytest.approx(0.25)
    itl = "inferflux:inter_token_latency_seconds"
    assert _value(m, itl + "_count") == 5
    assert _value(m, itl + "_sum") == pytest.approx(0.15)
    e2e = "inferflux:e2e_request_latency_seconds"
    assert _value(m, e2e + "_count") == 3
    assert _value(m, e2e + "_sum") == pytest.approx(1.0)
    # Buckets are cumulative: 0.05 and 0.2 both fall at or below le=0.25, only 0.05 below le=0.1.
    assert _value(m, ttft + "_bucket", le="0.1") == 1
    assert _value(m, ttft + "_bucket", le="0.25") == 2
    assert _value(m, ttft + "_bucket", le="+Inf") == 2


def test_gauges_reflect_the_last_engine_update_under_both_prefixes() -> None:
    """The vllm: gauges must carry the same values, or autoscaling reads a different queue than we do."""
    m = ServerMetrics(MODEL, BACKEND)
    m.update_engine(EngineStats(num_running=5, num_waiting=9, kv_pages_used=1, kv_pages_total=2))
    m.update_engine(EngineStats(num_running=3, num_waiting=4, kv_pages_used=3, kv_pages_total=12))
    for prefix in ("inferflux:", "vllm:"):
        assert _value(m, prefix + "num_requests_running") == 3
        assert _value(m, prefix + "num_requests_waiting") == 4
        assert _value(m, prefix + "kv_cache_usage_perc") == pytest.approx(0.25)


def test_engine_totals_become_counters_that_follow_the_engine() -> None:
    m = ServerMetrics(MODEL, BACKEND)
    m.update_engine(EngineStats(prefix_queries=40, prefix_hits=16, num_preemptions=1))
    m.update_engine(EngineStats(prefix_queries=100, prefix_hits=50, num_preemptions=3))
    m.update_engine(EngineStats(prefix_queries=100, prefix_hits=50, num_preemptions=3))
    assert _value(m, "inferflux:prefix_cache_queries_total") == 100
    assert _value(m, "inferflux:prefix_cache_hits_total") == 50
    assert _value(m, "inferflux:num_preemptions_total") == 3


def test_counters_never_decrease_when_a_new_engine_restarts_from_zero() -> None:
    """A model reload restarts the engine's totals; the exposed counters keep adding on top."""
    m = ServerMetrics(MODEL, BACKEND)
    m.update_engine(EngineStats(prefix_queries=100, prefix_hits=50, num_preemptions=3))
    m.update_engine(EngineStats(prefix_queries=0, prefix_hits=0, num_preemptions=0))  # new engine
    assert _value(m, "inferflux:prefix_cache_queries_total") == 100
    m.update_engine(EngineStats(prefix_queries=30, prefix_hits=10, num_preemptions=2))
    assert _value(m, "inferflux:prefix_cache_queries_total") == 130
    assert _value(m, "inferflux:prefix_cache_hits_total") == 60
    assert _value(m, "inferflux:num_preemptions_total") == 5
    # Another reload, first seen after it already did work: its whole total counts, then deltas.
    m.update_engine(EngineStats(prefix_queries=20, prefix_hits=4, num_preemptions=1))
    m.update_engine(EngineStats(prefix_queries=25, prefix_hits=5, num_preemptions=1))
    assert _value(m, "inferflux:prefix_cache_queries_total") == 155
    assert _value(m, "inferflux:prefix_cache_hits_total") == 65
    assert _value(m, "inferflux:num_preemptions_total") == 6


def test_engine_replaced_counts_a_new_engine_that_overtook_the_old_totals() -> None:
    """Without the explicit reset, 120 after 100 would read as +20 instead of a fresh 120."""
    m = ServerMetrics(MODEL, BACKEND)
    m.update_engine(EngineStats(prefix_queries=100))
    m.engine_replaced()
    m.update_engine(EngineStats(prefix_queries=120))
    assert _value(m, "inferflux:prefix_cache_queries_total") == 220


def test_two_instances_do_not_share_state_or_the_global_registry() -> None:
    """Several apps in one process (tests, multi-model) must not collide or leak counts."""
    a = ServerMetrics("model-a", "cpu")
    b = ServerMetrics("model-b", "cuda")
    a.observe_request("/v1/completions", 200)
    a.update_engine(EngineStats(num_waiting=7, prefix_queries=10))
    assert _value(a, "inferflux:requests_total", endpoint="/v1/completions", status="200") == 1
    assert _value(b, "inferflux:requests_total", endpoint="/v1/completions", status="200") == 0
    assert _value(b, "vllm:num_requests_waiting") == 0
    assert _value(b, "inferflux:prefix_cache_queries_total") == 0
    assert {s.labels["model_name"] for s in _samples(b)} == {"model-b"}
    assert {s.labels["backend"] for s in _samples(b)} == {"cuda"}
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "inferflux:" not in global_text and "vllm:" not in global_text


def test_render_returns_text_exposition_and_its_content_type() -> None:
    body, content_type = ServerMetrics(MODEL, BACKEND).render()
    assert isinstance(body, bytes)
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    assert content_type.startswith("text/plain")
    assert b"# TYPE vllm:num_requests_waiting gauge" in body


# --- observability additions: backend info, dialects, rates, autoscaling hints, adapters, policies, 429s ---


def test_backend_info_names_what_runs_the_model_and_only_the_latest() -> None:
    m = ServerMetrics(MODEL, BACKEND)
    m.set_backend_info("cpu", "float32", "attention=cpu,weights=dense")
    m.set_backend_info("NVIDIA H100", "bfloat16", "attention=pallas_decode+pallas_ragged,weights=qtensor")
    infos = [s for s in _samples(m) if s.name == "inferflux:backend_info"]
    assert [(s.labels["device"], s.labels["dtype"], s.labels["kernels"], s.value) for s in infos] == [
        ("NVIDIA H100", "bfloat16", "attention=pallas_decode+pallas_ragged,weights=qtensor", 1.0)]
    assert _types(m)["inferflux:backend_info"] == "gauge"


def test_dialect_counter_uses_status_classes_and_429s_count_without_tenants() -> None:
    m = ServerMetrics(MODEL, BACKEND)
    for status in (200, 200, 201, 400, 429, 503):
        m.observe_dialect("openai", status, rate_limited=status == 429)
    m.observe_dialect("ollama", 200)
    m.observe_dialect("ollama", 429, rate_limited=True)
    name = "inferflux:dialect_requests_total"
    assert _value(m, name, dialect="openai", status_class="2xx") == 3
    assert _value(m, name, dialect="openai", status_class="4xx") == 2
    assert _value(m, name, dialect="openai", status_class="5xx") == 1
    assert _value(m, name, dialect="ollama", status_class="4xx") == 1
    assert _value(m, "inferflux:rate_limited_requests_total", dialect="openai") == 1
    assert _value(m, "inferflux:rate_limited_requests_total", dialect="ollama") == 1
    assert not [s for s in _samples(m) if "tenant" in s.labels]


def test_adapter_usage_and_policy_decisions_count_per_label() -> None:
    m = ServerMetrics(MODEL, BACKEND)
    m.observe_adapter(None)
    m.observe_adapter("sql-lora")
    m.observe_adapter("sql-lora")
    m.observe_policy("allow")
    m.observe_policy("deny:pii")
    assert _value(m, "inferflux:adapter_requests_total", adapter="base") == 1
    assert _value(m, "inferflux:adapter_requests_total", adapter="sql-lora") == 2
    assert _value(m, "inferflux:policy_decisions_total", decision="deny:pii") == 1


def test_autoscaling_hint_gauges_follow_the_engine() -> None:
    m = ServerMetrics(MODEL, BACKEND)
    m.update_engine(EngineStats(kv_pages_used=6, kv_pages_total=10, kv_pages_wanted=9, queued_prompt_tokens=700))
    assert _value(m, "inferflux:queued_prompt_tokens") == 700
    assert _value(m, "inferflux:kv_page_pressure") == pytest.approx(1.5)  # the queue does not fit: scale out
    m.update_engine(EngineStats(kv_pages_used=2, kv_pages_total=10))
    assert _value(m, "inferflux:queued_prompt_tokens") == 0
    assert _value(m, "inferflux:kv_page_pressure") == pytest.approx(0.2)


def test_tokens_per_second_gauges_are_the_rate_between_updates(monkeypatch) -> None:
    import inferflux.server.metrics as metrics_module

    clock = iter([100.0, 102.0, 104.0])
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: next(clock))
    m = ServerMetrics(MODEL, BACKEND)
    m.update_engine(EngineStats(prompt_tokens=0, generation_tokens=0))
    assert _value(m, "inferflux:generation_tokens_per_second") == 0
    m.update_engine(EngineStats(prompt_tokens=400, generation_tokens=50))
    assert _value(m, "inferflux:prompt_tokens_per_second") == pytest.approx(200)
    assert _value(m, "inferflux:generation_tokens_per_second") == pytest.approx(25)
    m.update_engine(EngineStats(prompt_tokens=0, generation_tokens=10))  # a new engine: totals restart, rates go on
    assert _value(m, "inferflux:generation_tokens_per_second") == pytest.approx(60 / 4)


def test_scheduler_reports_queued_prompt_tokens_and_pages_the_queue_needs() -> None:
    from inferflux.engine.kv_cache import KVCacheManager, PageAllocator
    from inferflux.engine.sampling_params import SamplingParams
    from inferflux.engine.scheduler import Scheduler
    from inferflux.engine.sequence import Sequence

    kv = KVCacheManager(PageAllocator(num_pages=9, page_size=4))
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=6)
    params = SamplingParams(max_tokens=4)
    first, second = (Sequence(list(range(1, 11)), params, seed=0, max_model_len=64) for _ in range(2))
    scheduler.add(first)
    scheduler.add(second)
    assert scheduler.queued_demand() == (20, 6)  # 10 + 10 prompt tokens; 3 + 3 pages of 4 tokens
    chunks = scheduler.schedule()  # 6 tokens of the first prompt run
    for chunk in chunks:
        chunk.seq.num_computed += len(chunk.tokens)
    assert scheduler.queued_demand() == (14, 3)
    states = kv.allocator.page_states()
    assert states[0] == "null" and states.count("used") == 2 and states.count("free") == 6
    assert [(queue, seq is first) for queue, seq in scheduler.snapshot()] == [("running", True), ("waiting", False)]
