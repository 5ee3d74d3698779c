"""Observability wiring of one app: traces, the request-level metrics, and the local pages.

One call from the app factory (`install`), placed before auth so that tracing reads the caller's
trace context even on a request auth refuses. Per finished request (a `record` finish hook): the
dialect/status-class counter, tenant-limit 429s, adapter usage and policy decisions. Each scrape of
`/metrics` refreshes `inferflux:backend_info` from the model being served.
"""

from __future__ import annotations

from typing import Any

from quart import Quart, request

from inferflux.server import record as records
from inferflux.server import tracing, ui
from inferflux.server.state import ServerState

GENERATING = ("chat", "text_completion")


def install(app: Quart, state: ServerState) -> None:
    tracing.install(app, state.config.telemetry)
    ui.install(app, state.config)
    metrics = state.metrics

    def count(rec: records.RequestRecord) -> None:
        dialect = rec.route.split(".", 1)[0] if "." in rec.route else ""
        metrics.observe_dialect(dialect, rec.status, rec.status == 429 and rec.error == "rate_limit_exceeded")
        if rec.model and tracing.operation(rec.route) in GENERATING and rec.status < 400:
            metrics.observe_adapter(rec.adapter)
        if rec.policy:
            metrics.observe_policy(rec.policy.split(" ", 1)[0])  # the decision; its details (opa=<id>) are per request

    records.add_finish_hook(app, count)

    @app.before_request
    async def backend_info() -> None:
        if request.url_rule is not None and request.url_rule.endpoint == "ops.metrics":
            loaded = state.pool.loaded()  # the served model, or else the most recently used one
            info = describe_backend(state.pool.default_handle() or (loaded[0] if loaded else None))
            if info is not None:
                metrics.set_backend_info(**info)


def describe_backend(handle: Any) -> dict[str, str] | None:
    """device kind, compute dtype and kernels (attention implementations, weight layout) of a loaded model."""
    engine = getattr(handle, "engine", None)
    if engine is None:
        return None
    import jax

    from inferflux.kernels.paged_attention import _select_impl

    runner = engine.core.runner
    head_dim, page_size = runner.config.head_dim, runner.page_size
    attention = sorted({_select_impl(decode_only=d, head_dim=head_dim, page_size=page_size, dtype=runner.dtype)
                        for d in (True, False)})
    return {"device": jax.devices()[0].device_kind, "dtype": str(runner.dtype),
            "kernels": f"attention={'+'.join(attention)},weights={runner.weight_layout}"}
