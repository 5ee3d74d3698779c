"""`inferctl status`: a running server's health, readiness, models, load and throughput at a glance.

The same numbers `/metrics` exports, read and summed for a human (or, with `--json`, one object for
scripts), so a quick look needs no Grafana. Nothing here imports JAX.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from inferctl.chat_backends import _STATUS_TIMEOUT, _one_line, _unreachable, api_headers, base_url
from inferflux.errors import InferFluxError


def _scrape(client: httpx.Client, url: str) -> dict[str, float] | None:
    """/metrics as {sample name: value summed over labels}; None if the server has no metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = client.get(url + "/metrics")
    if resp.status_code != 200:
        return None
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    except ValueError as exc:
        raise InferFluxError(f"{url}/metrics is not Prometheus text: {_one_line(exc)}") from None
    return values


def collect_status(url: str, window: float = 1.0) -> dict[str, Any]:
    """Everything `status` shows, as a dict (the `--json` object).

    Counters only say "so far", so the generation rate is measured: `/metrics` is scraped twice,
    `window` seconds apart, and tokens/s is the `inferflux:generation_tokens_total` delta over
    that time: an instantaneous rate, not a one-minute average (which would need a Prometheus
    server). `window <= 0` scrapes once and reports no rate. Prefix-cache hit rate is cumulative
    since the server started: full prompt pages found in the cache / pages looked up.
    """
    url = base_url(url)
    try:
        with httpx.Client(timeout=_STATUS_TIMEOUT, headers=api_headers()) as client:
            health = client.get(url + "/healthz")
            ready = client.get(url + "/readyz")
            models_resp = client.get(url + "/v1/models")
            first, t0 = _scrape(client, url), time.monotonic()
            second, elapsed = None, 0.0
            if first is not None and window > 0:
                time.sleep(window)
                second = _scrape(client, url)
                elapsed = time.monotonic() - t0
    except httpx.HTTPError as exc:
        raise _unreachable(url, exc) from None

    def status_word(resp: httpx.Response, good: str) -> str:
        try:
            word = str(resp.json().get("status", ""))
        except (ValueError, AttributeError):
            word = ""
        if resp.status_code == 200:
            return word or good
        return word or f"HTTP {resp.status_code}"

    models: list[dict[str, Any]] = []
    if models_resp.status_code == 200:
        try:
            models = [{"id": m["id"], "max_model_len": m.get("max_model_len")} for m in models_resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            models = []
    metrics = second if second is not None else first
    result: dict[str, Any] = {
        "url": url,
        "health": status_word(health, "ok"),
        "healthy": health.status_code == 200,
        "readiness": status_word(ready, "ready"),
        "ready": ready.status_code == 200,
        "models": models,
        "requests_running": None, "requests_waiting": None, "kv_cache_usage_perc": None,
        "prompt_tokens_total": None, "generation_tokens_total": None,
        "generation_tokens_per_s": None, "window_s": None,
        "prefix_cache_hit_rate": None, "prefix_cache_hits_total": None, "prefix_cache_queries_total": None,
        "preemptions_total": None,
        "spec_draft_tokens_total": None, "spec_accepted_tokens_total": None, "spec_acceptance_rate": None,
        "spec_mean_accepted_length": None,
    }
    if metrics is None:
        return result

    def get(name: str) -> float | None:
        return metrics.get(name)

    def as_int(value: float | None) -> int | None:
        return None if value is None else int(value)

    kv = get("inferflux:kv_cache_usage_perc")
    hits, queries = get("inferflux:prefix_cache_hits_total"), get("inferflux:prefix_cache_queries_total")
    result.update(
        requests_running=as_int(get("inferflux:num_requests_running")),
        requests_waiting=as_int(get("inferflux:num_requests_waiting")),
        kv_cache_usage_perc=None if kv is None else round(kv * 100, 2),
        prompt_tokens_total=as_int(get("inferflux:prompt_tokens_total")),
        generation_tokens_total=as_int(get("inferflux:generation_tokens_total")),
        prefix_cache_hits_total=as_int(hits), prefix_cache_queries_total=as_int(queries),
        prefix_cache_hit_rate=round(hits / queries, 4) if hits is not None and queries else None,
        preemptions_total=as_int(get("inferflux:num_preemptions_total")),
        spec_draft_tokens_total=as_int(get("vllm:spec_decode_num_draft_tokens_total")),
        spec_accepted_tokens_total=as_int(get("vllm:spec_decode_num_accepted_tokens_total")),
    )
    # From the counters (summed over models), not the per-model gauges, which do not add up.
    drafted = get("vllm:spec_decode_num_draft_tokens_total")
    accepted = get("vllm:spec_decode_num_accepted_tokens_total")
    drafts = get("vllm:spec_decode_num_drafts_total")
    if drafted and accepted is not None and drafts:
        result.update(spec_acceptance_rate=round(accepted / drafted, 4),
                      spec_mean_accepted_length=round(1 + accepted / drafts, 3))
    before = first.get("inferflux:generation_tokens_total") if first else None
    after = second.get("inferflux:generation_tokens_total") if second else None
    if before is not None and after is not None and elapsed > 0:
        result["generation_tokens_per_s"] = round(max(0.0, after - before) / elapsed, 2)
        result["window_s"] = round(elapsed, 3)
    return result


def status(url: str, as_json: bool = False, window: float = 1.0) -> None:
    """Print a server's health, readiness, models, load, KV-cache use and throughput.

    A quick look without Grafana: the same numbers `/metrics` exports, read and summed for a human
    (or, with `as_json`, one JSON object for scripts). See `collect_status` for how tokens/s is
    measured over `window` seconds.
    """
    info = collect_status(url, float(window))
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
        return

    def num(value: float | None, fmt: str = ",") -> str:
        return "n/a" if value is None else format(value, fmt)

    models = ", ".join(f"{m['id']} (context {m['max_model_len']})" if m.get("max_model_len") else str(m["id"])
                       for m in info["models"]) or "none"
    rate = info["generation_tokens_per_s"]
    generated = num(info["generation_tokens_total"])
    if rate is not None:
        generated += f" total, {rate:,.1f} tokens/s over the last {info['window_s']:.1f} s"
    hit_rate = info["prefix_cache_hit_rate"]
    prefix = "n/a" if hit_rate is None else (
        f"{hit_rate * 100:.1f}% hit rate ({info['prefix_cache_hits_total']:,} of "
        f"{info['prefix_cache_queries_total']:,} prompt-page lookups)")
    kv = info["kv_cache_usage_perc"]
    rows = [
        ("server", info["url"]),
        ("health", info["health"]),
        ("readiness", info["readiness"]),
        ("models", models),
        ("requests", f"{num(info['requests_running'])} running, {num(info['requests_waiting'])} waiting"),
        ("KV cache", "n/a" if kv is None else f"{kv:.1f}% used"),
        ("generated tokens", generated),
        ("prefix cache", prefix),
        ("preemptions", num(info["preemptions_total"])),
        ("speculative", _speculative_row(info)),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _speculative_row(info: dict) -> str:
    """Proposed tokens accepted, and tokens per verification step; "off" when nothing was proposed."""
    drafted, accepted = info.get("spec_draft_tokens_total"), info.get("spec_accepted_tokens_total")
    if not drafted:
        return "n/a" if drafted is None else "nothing proposed"
    return (f"{accepted:,} of {drafted:,} proposed tokens accepted ({(accepted or 0) / drafted * 100:.1f}%), "
            f"{info.get('spec_mean_accepted_length') or 0:.2f} tokens per verification")
