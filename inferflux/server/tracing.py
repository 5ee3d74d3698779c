"""OpenTelemetry traces: one span per GenAI request, exported over OTLP (docs/observability.md).

Off unless `telemetry.otlp_endpoint` is set; then, and only then, the SDK is imported and a
`TracerProvider` with a batch exporter is built, so a server without tracing pays nothing but one
dictionary lookup per request.

The span is made when the request *finishes* (a `record` finish hook: after the response and any
streamed generation have ended), with explicit start and end times: the request's arrival and
now. Everything a span carries is known only then (token counts, finish reasons, the engine's
queueing/prefill/first-token clock), and nothing inside the server needs the span while the
request runs. The caller's W3C `traceparent`/`tracestate` are read when the request arrives (before
auth, so a refused request still joins the caller's trace) and make the span's parent.

Naming follows the GenAI semantic conventions: `{gen_ai.operation.name} {gen_ai.request.model}`,
operation `chat`, `text_completion` or `embeddings`; `gen_ai.request.*`, `gen_ai.usage.*` and
`gen_ai.response.*` attributes; child spans `queue` (arrival to the first scheduled chunk), `prefill`
(to the first token) and `decode`, and a `gen_ai.first_token` event. Prompt and output text go on the
span only with `telemetry.capture_content: true`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from quart import Quart, request

from inferflux.config import TelemetryConfig
from inferflux.server import record as records

log = logging.getLogger(__name__)

# Endpoint function name (the part after "blueprint.") -> gen_ai.operation.name.
OPERATIONS: dict[str, str] = {
    "chat_completions": "chat", "chat_websocket": "chat", "api_chat": "chat", "create_response": "chat",
    "create_message": "chat", "completions": "text_completion", "api_generate": "text_completion",
    "embeddings": "embeddings", "api_embed": "embeddings", "api_embeddings": "embeddings",
}
_PARENT = "otel_parent"  # record.extras key: the caller's traceparent/tracestate


def operation(route: str) -> str | None:
    """The GenAI operation a route performs, or None for routes that are not GenAI calls (no span)."""
    return OPERATIONS.get(route.rsplit(".", 1)[-1]) if route else None


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces URL: `<endpoint>/v1/traces`, unless the endpoint already names it."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Tracing:
    """The SDK objects of one app: provider, exporter, tracer, propagator (built only when tracing is on)."""

    def __init__(self, config: TelemetryConfig) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from inferflux import __version__

        self.capture_content = config.capture_content
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sampling_ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
        self.tracer = self.provider.get_tracer("inferflux.server", __version__)
        self.propagator = TraceContextTextMapPropagator()

    def begin(self, rec: records.RequestRecord, headers: Any) -> None:
        """Keep the caller's trace context (W3C headers) on the record, for the span made at the finish."""
        carrier = {name: headers.get(name) for name in ("traceparent", "tracestate") if headers.get(name)}
        if carrier:
            rec.extras[_PARENT] = carrier

    def finish(self, rec: records.RequestRecord) -> None:
        """Make and end the request's span (a finish hook), with its children and attributes."""
        op = operation(rec.route)
        if op is None:
            return
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        parent = self.propagator.extract(rec.extras.get(_PARENT, {}))
        gen = rec.extras.get("generation")
        requested = (getattr(gen.spec, "model", None) if gen is not None else None) or rec.model
        name = f"{op} {requested}" if requested else op
        end = time.time_ns()
        attributes = _attributes(op, rec, gen, requested)
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
                                      start_time=int(rec.started * 1e9))
        if rec.status >= 500 or (rec.status >= 400 and rec.error):
            span.set_status(Status(StatusCode.ERROR, rec.error or str(rec.status)))
        if gen is not None and gen.finished:
            _phases(self.tracer, trace.set_span_in_context(span), span, gen, end)
        if self.capture_content and gen is not None:
            _content(span, gen)
        span.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is queued and stop (the server is stopping)."""
        self.provider.shutdown()


def install(app: Quart, config: TelemetryConfig) -> Tracing | None:
    """Trace the app's GenAI requests when `telemetry.otlp_endpoint` is set; otherwise do nothing at all.

    Call it before auth is installed: its `before_request` must read the caller's trace context even for a
    request that auth then refuses.
    """
    if not config.otlp_endpoint:
        return None
    tracing = Tracing(config)

    @app.before_request
    async def trace_context() -> None:
        rec = records.current()
        if rec is not None:
            tracing.begin(rec, request.headers)

    @app.after_serving
    async def flush_spans() -> None:
        tracing.shutdown()

    records.add_finish_hook(app, tracing.finish)
    log.info("tracing to %s (%s), sampling %.2f", config.otlp_endpoint, config.protocol, config.sampling_ratio)
    return tracing


def _exporter(config: TelemetryConfig) -> Any:
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        endpoint = config.otlp_endpoint
        return GrpcExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=traces_url(config.otlp_endpoint))


def _attributes(op: str, rec: records.RequestRecord, gen: Any, requested: str | None) -> dict[str, Any]:
    """The span's attributes (GenAI conventions, then InferFlux's own under `inferflux.*`); None values dropped."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": op, "gen_ai.provider.name": "inferflux", "gen_ai.request.model": requested,
        "gen_ai.response.model": rec.model, "gen_ai.usage.input_tokens": rec.prompt_tokens,
        "http.request.method": rec.method, "url.path": rec.path, "http.response.status_code": rec.status,
        "inferflux.request_id": rec.request_id, "inferflux.route": rec.route, "inferflux.tenant": rec.tenant,
        "inferflux.adapter": rec.adapter, "inferflux.policy": rec.policy, "error.type": rec.error,
    }
    if op != "embeddings":
        attrs["gen_ai.usage.output_tokens"] = rec.completion_tokens
    if gen is not None:
        params, limits = gen.spec.params, gen.spec.limits
        finished = sorted(gen.finished, key=lambda done: done.choice)
        attrs.update({
            "gen_ai.request.max_tokens": limits.max_tokens, "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p, "gen_ai.request.seed": params.seed,
            "gen_ai.request.choice.count": params.n if params.n != 1 else None,
            "gen_ai.response.id": gen.response_id or rec.request_id,
            "gen_ai.response.finish_reasons": [done.reason for done in finished],
        })
        if finished and finished[0].cached_tokens:
            attrs["gen_ai.usage.cache_read.input_tokens"] = finished[0].cached_tokens
        ttft = finished[0].timings.ttft if finished else None
        if ttft is not None:
            attrs["inferflux.time_to_first_token_s"] = round(ttft, 6)
    return {k: v for k, v in attrs.items() if v is not None}


def _phases(tracer: Any, context: Any, span: Any, gen: Any, end_ns: int) -> None:
    """Child spans for the first choice's queueing, prefill and decode, and its first-token event."""
    timings = min(gen.finished, key=lambda done: done.choice).timings
    offset = end_ns - time.monotonic_ns()  # monotonic seconds -> wall-clock nanoseconds

    def wall(mono: float) -> int:
        return int(mono * 1e9) + offset

    marks = [("queue", timings.arrival, timings.scheduled),
             ("prefill", timings.scheduled or timings.arrival, timings.first_token),
             ("decode", timings.first_token, timings.last_token)]
    for name, start, stop in marks:
        if start is not None and stop is not None and stop >= start:
            tracer.start_span(name, context=context, start_time=wall(start)).end(end_time=wall(stop))
    if timings.first_token is not None:
        span.add_event("gen_ai.first_token", timestamp=wall(timings.first_token))


def _content(span: Any, gen: Any) -> None:
    """gen_ai.input.messages / gen_ai.output.messages (telemetry.capture_content only), in the GenAI
    conventions' message shape (`{role, parts: [{type, content}]}`, outputs with `finish_reason`), so a
    backend that renders GenAI spans shows them as a conversation whatever dialect the request came in."""
    messages: list[dict[str, Any]] = []
    for prompt in gen.spec.prompts:
        if prompt.messages is not None:
            messages.extend(_message(m) for m in prompt.messages)
        elif prompt.text is not None:
            messages.append({"role": "user", "parts": [{"type": "text", "content": prompt.text}]})
    span.set_attribute("gen_ai.input.messages", json.dumps(messages, default=str))
    tokenizer = getattr(getattr(gen.handle, "model", None), "tokenizer", None)
    if tokenizer is not None:
        outputs = [{"role": "assistant", "parts": [{"type": "text", "content": tokenizer.decode(
                        done.output_ids, skip_special_tokens=True)}], "finish_reason": done.reason}
                   for done in sorted(gen.finished, key=lambda d: d.choice)]
        span.set_attribute("gen_ai.output.messages", json.dumps(outputs))


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """One chat message (OpenAI's shape, as the dialects normalise them) as a GenAI-conventions message."""
    content = message.get("content")
    parts: list[dict[str, Any]] = []
    if isinstance(content, str):
        parts.append({"type": "text", "content": content})
    elif isinstance(content, list):  # content parts: text kept, others (images, audio) named by type only
        for part in content:
            kind = part.get("type", "text") if isinstance(part, dict) else "text"
            text = part.get("text") if isinstance(part, dict) else str(part)
            parts.append({"type": "text", "content": text} if kind == "text" else {"type": kind})
    if message.get("role") == "tool":
        parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"), "response": content}]
    for call in message.get("tool_calls") or ():
        function = call.get("function", {})
        parts.append({"type": "tool_call", "id": call.get("id"), "name": function.get("name"),
                      "arguments": function.get("arguments")})
    return {"role": message.get("role", "user"), "parts": parts}
