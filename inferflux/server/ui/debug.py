"""`/debug`: the KV page map, the running and waiting requests, and the last requests' token traces.

Served only when the app is built with `server.debug_ui: true`, or with `security.auth: required`
(then `/debug/api/*` needs the `admin` scope: the traces hold other tenants' generated tokens). The
page itself is static and public (a browser cannot send a key on navigation); its script calls the
JSON routes with the admin key pasted into it. Every view of the engine is taken on the engine thread
between two steps (`Engine.inspect`), so it is one consistent moment and costs the step loop nothing
while nobody looks.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from inferflux.server.errors import APIError
from inferflux.server.http import server_state
from inferflux.server.openapi import documented
from inferflux.server.ui import traces
from inferflux.server.ui.inspect import kv_view
from inferflux.server.ui.pages import page

bp = Blueprint("debug", __name__)


def _engines() -> list[Any]:
    """Loaded generative models (handles with an engine), most recently used first."""
    return [h for h in server_state().pool.loaded() if getattr(h, "engine", None) is not None]


@bp.get("/debug")
@documented(summary="The debug page (HTML): KV page map, queues, token traces", content="text/html")
async def debug_page() -> Response:
    return page("debug.html")


@bp.get("/debug/api/kv")
@documented(summary="Each loaded model's KV pages (free, used, prefix, cached) and the sequences holding them")
async def kv() -> dict[str, Any]:
    models = []
    for handle in _engines():
        view = await handle.engine.inspect(kv_view)
        labels = _labels(handle)
        for seq in view["sequences"]:
            seq.update(labels.get(seq["engine_request_id"], {}))
        models.append({"model": handle.name, **view})
    return {"object": "debug.kv", "models": models}


@bp.get("/debug/api/requests")
@documented(summary="Running and waiting requests with their token counts")
async def requests() -> dict[str, Any]:
    running: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    for handle in _engines():
        view = await handle.engine.inspect(kv_view)
        labels = _labels(handle)
        for seq in view["sequences"]:
            item = {"model": handle.name, **{k: v for k, v in seq.items() if k != "pages"},
                    "pages": len(seq["pages"]), **labels.get(seq["engine_request_id"], {})}
            (running if seq["state"] == "running" else waiting).append(item)
    return {"object": "debug.requests", "running": running, "waiting": waiting}


@bp.get("/debug/api/traces")
@documented(summary="The last requests whose tokens were traced, newest first")
async def list_traces() -> dict[str, Any]:
    data = [traces.summary(h, entry) for h in _engines() if h.engine.core.token_trace is not None
            for entry in h.engine.core.token_trace.snapshot()]
    data.sort(key=lambda item: -item["started"])
    return {"object": "list", "data": data}


@bp.get("/debug/api/traces/<trace_id>")
@documented(summary="One request's token trace: token, text, logprob, top alternatives, time since the previous")
async def get_trace(trace_id: str) -> dict[str, Any]:
    """`trace_id`: the engine request id, or the HTTP request's `x-request-id` (its first traced prompt)."""
    for handle in _engines():
        trace = handle.engine.core.token_trace
        for entry in trace.snapshot() if trace is not None else ():
            if trace_id in (entry["engine_request_id"], entry["labels"].get("request_id")):
                return traces.render(handle, entry)
    raise APIError(404, f"no traced request {trace_id!r} (the last {traces.MAX_REQUESTS} per model are kept)",
                   type="invalid_request_error", code="not_found")


def _labels(handle: Any) -> dict[str, dict[str, Any]]:
    """engine request id -> the server's labels (HTTP request id, tenant), from the token trace if any."""
    trace = handle.engine.core.token_trace
    if trace is None:
        return {}
    return {entry["engine_request_id"]: {k: entry["labels"].get(k) for k in ("request_id", "tenant")}
            for entry in trace.snapshot()}
