"""OpenTelemetry traces against a real server: an OTLP receiver on loopback decodes what it exports.

The receiver is a tiny HTTP server (and, for `telemetry.protocol: grpc`, a gRPC server) in the test
that decodes `ExportTraceServiceRequest` with opentelemetry-proto, so what is checked is what a
collector would get: the span's trace id and parent from the `traceparent` the `openai` client sent,
its GenAI name and attributes, the token counts the response reported, the phase children, and no
prompt text (telemetry.capture_content is off); on a second server with auth, a tenant's key and a LoRA
adapter, the tenant and adapter attributes and, with capture_content on, the prompt and reply.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from quart import Quart

from inferflux.config import TelemetryConfig
from inferflux.server import tracing
from tests.fixtures.server import Server, free_port

PROMPT = "tell me a secret about the lighthouse keeper"


class Spans:
    """Spans received (decoded), with the resource attributes of each, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[dict[str, Any], Any]] = []
        self.raw: list[bytes] = []

    def add(self, body: bytes) -> None:
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.raw.append(body)
            for resource_spans in message.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.items.extend((resource, span) for span in scope.spans)

    def wait(self, predicate, timeout: float = 30.0) -> list[tuple[dict[str, Any], Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [item for item in self.items if predicate(item[1])]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no matching span in {len(self.items)} received")


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def attrs(span: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, Spans]]:
    spans = Spans()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            assert self.path == "/v1/traces", self.path
            spans.add(body)
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", spans
    httpd.shutdown()


def _server(tiny_model, extra: list[str]) -> Server:
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export within 0.1 s instead of 5 s
    try:
        return Server(tiny_model("llama"), "tiny", extra=extra)
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]


@pytest.fixture(scope="module")
def traced(tiny_model, receiver) -> Iterator[tuple[Server, Spans]]:
    url, spans = receiver
    server = _server(tiny_model, [f"telemetry.otlp_endpoint={url}", "telemetry.service_name=ifx-test"])
    yield server, spans
    assert server.stop() == 0, server.output()


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def test_chat_span_joins_the_callers_trace_with_genai_attributes(traced) -> None:
    server, spans = traced
    trace_id, parent_id, header = _traceparent()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0.7, top_p=0.9,
        seed=3, extra_headers={"traceparent": header, "tracestate": "vendor=abc"})
    (resource, span), = spans.wait(lambda s: s.trace_id.hex() == trace_id and s.name.startswith("chat"))
    assert span.name == "chat tiny"
    assert span.parent_span_id.hex() == parent_id
    assert span.trace_state == "vendor=abc"  # the caller's tracestate travels with its trace
    assert span.kind == span.SPAN_KIND_SERVER
    assert resource["service.name"] == "ifx-test"
    a = attrs(span)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "tiny" and a["gen_ai.response.model"] == "tiny"
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.request.seed"] == 3
    assert a["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens > 0
    assert a["gen_ai.response.finish_reasons"] == [reply.choices[0].finish_reason]
    assert a["gen_ai.response.id"] == reply.id
    assert a["http.response.status_code"] == 200
    assert a["inferflux.policy"] == "allow"  # the policy guard's decision (no policy documents: allow)
    assert span.end_time_unix_nano > span.start_time_unix_nano
    # The phases: children of the request's span, inside it, in order; the first token as an event.
    children = {s.name: s for _, s in spans.wait(lambda s: s.parent_span_id == span.span_id and s.name == "decode")
                + spans.wait(lambda s: s.parent_span_id == span.span_id and s.name in ("queue", "prefill"))}
    children.update({s.name: s for _, s in spans.items if s.parent_span_id == span.span_id})
    assert set(children) == {"queue", "prefill", "decode"}
    assert span.start_time_unix_nano <= children["queue"].start_time_unix_nano
    assert children["queue"].end_time_unix_nano <= children["prefill"].end_time_unix_nano
    assert children["prefill"].end_time_unix_nano <= children["decode"].end_time_unix_nano <= span.end_time_unix_nano
    events = [e.name for e in span.events]
    assert events == ["gen_ai.first_token"]
    # No prompt or output text leaves the server unless telemetry.capture_content is on.
    assert not any(PROMPT.encode() in body for body in spans.raw)
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a


def test_streamed_completion_counts_tokens_and_a_new_trace_starts_without_traceparent(traced) -> None:
    server, spans = traced
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    stream = client.completions.with_raw_response.create(model="tiny", prompt="once upon a time", max_tokens=5,
                                                          stream=True, stream_options={"include_usage": True})
    request_id = stream.headers["x-request-id"]
    usage = [chunk.usage for chunk in stream.parse() if chunk.usage][-1]
    (_, span), = spans.wait(lambda s: attrs(s).get("inferflux.request_id") == request_id)
    a = attrs(span)
    assert span.name == "text_completion tiny" and a["gen_ai.operation.name"] == "text_completion"
    assert span.parent_span_id == b""  # no traceparent: a root span of a new trace
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens == 5
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.response.id"].startswith("cmpl-")


def test_embeddings_and_a_refused_request_get_spans_and_other_routes_none(traced) -> None:
    server, spans = traced
    trace_id, _, header = _traceparent()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="tiny", input=["a b c"], extra_headers={"traceparent": header})
    (_, span), = spans.wait(lambda s: s.trace_id.hex() == trace_id)
    assert span.name == "embeddings tiny"
    assert attrs(span)["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    trace_id, _, header = _traceparent()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], extra_headers={"traceparent": header})
    (_, span), = spans.wait(lambda s: s.trace_id.hex() == trace_id)
    assert span.status.code == span.status.STATUS_CODE_ERROR and attrs(span)["http.response.status_code"] == 400
    trace_id, _, header = _traceparent()
    client.models.list(extra_headers={"traceparent": header})
    time.sleep(0.5)
    assert not [s for _, s in spans.items if s.trace_id.hex() == trace_id]


def test_off_by_default_builds_nothing() -> None:
    """No endpoint: no hook, no provider (the SDK's trace module is not even needed)."""
    app = Quart("t")
    assert tracing.install(app, TelemetryConfig()) is None
    assert app.before_request_funcs == {} and "inferflux.finish_hooks" not in app.extensions


def test_operation_names_and_traces_url() -> None:
    assert tracing.operation("openai.chat_completions") == "chat"
    assert tracing.operation("ollama.api_generate") == "text_completion"
    assert tracing.operation("ollama.api_embed") == "embeddings"
    assert tracing.operation("openai.list_models") is None and tracing.operation("") is None
    assert tracing.traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"


def test_metrics_scrape_has_backend_info_dialects_adapters_and_hints(traced) -> None:
    """The additions of server/metrics.py as a scraper reads them from the live server (after the tests above)."""
    from prometheus_client.parser import text_string_to_metric_families

    server, _ = traced
    body = httpx.get(server.url + "/metrics", timeout=30).text
    samples = [s for fam in text_string_to_metric_families(body) for s in fam.samples]

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    info, = [s for s in samples if s.name == "inferflux:backend_info"]
    assert info.labels["backend"] == "cpu" and info.labels["dtype"] == "float32" and info.value == 1
    assert "attention=" in info.labels["kernels"] and info.labels["device"]
    assert value("inferflux:dialect_requests_total", dialect="openai", status_class="2xx") >= 4
    assert value("inferflux:dialect_requests_total", dialect="openai", status_class="4xx") >= 1
    assert value("inferflux:adapter_requests_total", adapter="base") >= 2  # the chat and the completion above
    assert value("inferflux:policy_decisions_total", decision="allow") >= 2  # every generation's guard decision
    assert value("inferflux:queued_prompt_tokens") == 0  # nothing waits now
    assert 0 <= value("inferflux:kv_page_pressure") < 1
    assert value("vllm:num_requests_waiting") == 0  # the vLLM names stay


def test_debug_pages_are_404_with_debug_ui_false_and_auth_off(traced) -> None:
    """The default (`server.debug_ui: false`, auth off): no /debug page and no data behind it."""
    server, _ = traced
    for path in ("/debug", "/debug/api/kv", "/debug/api/requests", "/debug/api/traces", "/debug/api/traces/x"):
        assert httpx.get(server.url + path, timeout=30).status_code == 404, path


def test_debug_ui_true_serves_the_page_with_auth_off() -> None:
    """`server.debug_ui: true`, auth off: ui.install registers /debug and its data routes (no key needed).

    In-process (the real install on a Quart app) rather than a third server start; the data routes' content
    is checked over HTTP in tests/test_ui_pages.py."""
    from inferflux.config import load_config
    from inferflux.server import ui

    async def get(app: Quart) -> tuple[int, str, str]:
        response = await app.test_client().get("/debug")
        return response.status_code, response.content_type or "", await response.get_data(as_text=True)

    for on in (False, True):
        app = Quart("t")
        ui.install(app, load_config(overrides=[f"server.debug_ui={str(on).lower()}"]))
        status, kind, body = asyncio.run(get(app))
        assert status == (200 if on else 404)
        if on:
            assert kind.startswith("text/html") and "KV cache pages" in body
        rules = {rule.rule for rule in app.url_map.iter_rules()}
        assert ({"/debug/api/kv", "/debug/api/traces"} <= rules) is on


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, spans: Spans) -> None:
        self.spans = spans

    def Export(self, request, context):  # noqa: N802 - the service's method name
        self.spans.add(request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def keyed(tiny_model, tmp_path_factory) -> Iterator[tuple[Server, Spans, str, str, str]]:
    """OTLP over gRPC, auth required, a tenant's key, one LoRA adapter loaded, telemetry.capture_content on."""
    import grpc

    from inferflux.server.access.keys import KeyStore
    from tests.fixtures.server import private_home
    from tests.test_lora import make_adapter

    spans = Spans()
    port = free_port()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(GrpcReceiver(spans), grpc_server)
    grpc_server.add_insecure_port(f"127.0.0.1:{port}")
    grpc_server.start()
    base = tiny_model("llama")
    adapter = make_adapter(base, tmp_path_factory.mktemp("trace-lora") / "a1", 4, 8, ["q_proj", "v_proj"], False, 1)
    home = private_home()
    store = KeyStore.at_home(home)
    store.create_tenant("ops")
    store.create_tenant("acme")
    admin_key, _ = store.create_key("ops", "admin,models:write")
    tenant_key, _ = store.create_key("acme", "inference")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        server = Server(base, "tiny", home=home, extra=[
            f"telemetry.otlp_endpoint=http://127.0.0.1:{port}", "telemetry.protocol=grpc",
            "telemetry.capture_content=true", "security.auth=required", "runtime.max_loras=1",
            "runtime.max_lora_rank=4"])
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    try:
        loaded = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(adapter)},
                            headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
        assert loaded.status_code == 200, loaded.text
        yield server, spans, tenant_key, admin_key, "a1"
    finally:
        status = server.stop()
        store.close()
        grpc_server.stop(0)
    assert status == 0, server.output()


def test_grpc_protocol_exports_the_same_span(keyed) -> None:
    server, spans, tenant_key, _, _ = keyed
    trace_id, parent_id, header = _traceparent()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=tenant_key, max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, extra_headers={"traceparent": header})
    (resource, span), = spans.wait(lambda s: s.trace_id.hex() == trace_id and s.name.startswith("chat"))
    assert span.parent_span_id.hex() == parent_id and resource["service.name"] == "inferflux"
    assert attrs(span)["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens


def test_tenant_adapter_and_captured_content_are_on_the_span(keyed) -> None:
    """A tenant's keyed request on an adapter: `inferflux.tenant`/`inferflux.adapter`, never the key; with
    capture_content the prompt and the reply in the GenAI conventions' message shape."""
    server, spans, tenant_key, admin_key, adapter = keyed
    trace_id, _, header = _traceparent()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=tenant_key, max_retries=0)
    reply = client.chat.completions.create(
        model=adapter, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}],
        max_tokens=5, temperature=0, extra_headers={"traceparent": header})
    (_, span), = spans.wait(lambda s: s.trace_id.hex() == trace_id and s.name.startswith("chat"))
    a = attrs(span)
    assert a["inferflux.tenant"] == "acme" and a["inferflux.adapter"] == adapter
    assert a["gen_ai.request.model"] == adapter
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]
    assert json.loads(a["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": reply.choices[0].message.content}],
         "finish_reason": reply.choices[0].finish_reason}]
    body = b"".join(spans.raw)
    assert tenant_key.encode() not in body and admin_key.encode() not in body  # keys never leave in a span
    # A completion's prompt text is a user message too; the base model's span names no adapter.
    trace_id, _, header = _traceparent()
    done = client.completions.create(model="tiny", prompt="once upon a time", max_tokens=3, temperature=0,
                                     extra_headers={"traceparent": header})
    (_, span), = spans.wait(lambda s: s.trace_id.hex() == trace_id and s.name == "text_completion tiny")
    a = attrs(span)
    assert "inferflux.adapter" not in a and a["inferflux.tenant"] == "acme"
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "once upon a time"}]}]
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"][0]["content"] == done.choices[0].text
