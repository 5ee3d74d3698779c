"""The Quart application factory: one blueprint per dialect, one error mapper, CORS, limits, access.

Access (`server/access/`): with `security.auth: required` every request's key and the route's
scope are checked before the route runs; the 401/403 goes through the same error mapper, so each
dialect answers in its own shape.

Errors: every exception a route raises goes through `errors.to_api_error` here (domain error ->
status, once); the dialect that serves the route picks only the body's shape (its package's
`ERROR_SHAPE`: OpenAI's error object, Ollama's `{"error": ...}`). Requests that match no route get
OpenAI's shape.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from quart import Quart, Response, request, websocket
from werkzeug.exceptions import HTTPException

from inferflux.server import anthropic, lmstudio, lmstudio_sdk, ollama, openai, ops, record, rerank
from inferflux.server import responses as openai_responses
from inferflux.server.access import admin as access_admin
from inferflux.server.access import audit_log, auth
from inferflux.server.errors import APIError, ErrorShape, to_api_error
from inferflux.server.lmstudio import v1 as lmstudio_v1
from inferflux.server.state import ServerState

# Blueprint name -> the body shape of its errors (its dialect's).
ERROR_SHAPES: dict[str, ErrorShape] = {
    openai.bp.name: openai.ERROR_SHAPE, lmstudio.bp.name: lmstudio.ERROR_SHAPE, ops.bp.name: ops.ERROR_SHAPE,
    ops.admin_bp.name: ops.ERROR_SHAPE, ollama.bp.name: ollama.ERROR_SHAPE,
    access_admin.bp.name: access_admin.ERROR_SHAPE, openai_responses.bp.name: openai_responses.ERROR_SHAPE,
    anthropic.bp.name: anthropic.ERROR_SHAPE, rerank.bp.name: rerank.ERROR_SHAPE,
    lmstudio_v1.bp.name: lmstudio_v1.ERROR_SHAPE, lmstudio_sdk.bp.name: lmstudio_sdk.ERROR_SHAPE,
}
# Every blueprint: the dialects and operations, then /admin/* (with auth required, or server.admin_enabled).
SERVED = (openai.bp, lmstudio.bp, ops.bp, ollama.bp, openai_responses.bp, anthropic.bp, rerank.bp, lmstudio_v1.bp,
          lmstudio_sdk.bp)
ADMIN = (ops.admin_bp, access_admin.bp)

log = logging.getLogger(__name__)


def create_app(state: ServerState) -> Quart:
    """Build the app around a loaded model (`ServerState`); the caller owns the engine's lifetime."""
    app = Quart("inferflux")
    app.extensions["inferflux"] = state
    app.config["MAX_CONTENT_LENGTH"] = state.config.server.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    auth_required = state.config.security.auth == "required"
    for bp in SERVED + (ADMIN if auth_required or state.config.server.admin_enabled else ()):
        app.register_blueprint(bp)

    @app.before_request
    async def limits_and_preflight() -> Any:
        endpoint = request.url_rule.endpoint if request.url_rule is not None else ""
        record.begin(app, request.method, endpoint, request.path, request.headers.get("x-request-id"))
        origin = request.headers.get("Origin")
        if origin and not _origin_allowed(origin, _allowed_origins(state)):
            # A web page from another site must not drive a local model server (Ollama's rule).
            raise APIError(403, f"origin {origin} is not allowed (server.cors_origins)", code="origin_not_allowed")
        length = request.content_length
        if length is not None and length > state.config.server.max_body_bytes:
            raise APIError(413, f"the request body is {length} bytes; the limit is "
                           f"{state.config.server.max_body_bytes}", code="body_too_large")
        if request.method == "OPTIONS":
            return Response("", status=204)
        return None

    # Traces, request metrics, /debug and the /admin page; before auth, so a refused request joins its trace.
    from inferflux.server import observe

    observe.install(app, state)
    if auth_required:  # after the checks above: a preflight is answered without a key
        auth.install(app, state.config.security.public_metrics)
    # One hash-chained line per finished request (audit.enabled), written off the event loop.
    audit_log.install(app, state.config)
    # Tenant limits: reconcile each admitted request when it ends; x-ratelimit-* on limited answers.
    from inferflux.server.access import limits_http

    limits_http.install(app)
    # The policy documents in memory, loaded at start and kept current by a watcher thread (pub/sub, poll).
    from inferflux.server.policy import watch as policy_watch

    policy_watch.install(app)

    @app.after_request
    async def cors_and_count(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and _origin_allowed(origin, _allowed_origins(state)):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = (
                request.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
        if request.method != "OPTIONS":
            # The route template, not the raw path, so label values stay bounded.
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            state.metrics.observe_request(endpoint, response.status_code)
        finished = record.current()
        if finished is not None:
            response.headers["x-request-id"] = finished.request_id
            finished.status = response.status_code
            finished.release()  # a streamed body still holds it; the last release finishes it
        return response

    @app.before_websocket
    async def begin_websocket() -> None:
        endpoint = websocket.url_rule.endpoint if websocket.url_rule is not None else ""
        record.begin(app, "WEBSOCKET", endpoint, websocket.path, websocket.headers.get("x-request-id"))

    @app.after_websocket
    async def end_websocket(response: Any) -> Any:
        finished = record.current()
        if finished is not None:
            finished.status = response.status_code if response is not None else 101
            finished.release()
        return response

    @app.errorhandler(Exception)
    async def any_error(exc: Exception) -> Any:
        error = to_api_error(exc)
        if isinstance(exc, HTTPException):
            code = exc.code or 500
            message = {413: f"the request body is larger than {state.config.server.max_body_bytes} bytes",
                       404: f"no route for {request.method} {request.path}",
                       405: f"{request.method} is not allowed on {request.path}"}.get(code)
            if message is not None:
                error = APIError(code, message, type="invalid_request_error")
        if error is None:
            log.exception("unhandled error on %s %s", request.method, request.path)
            error = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        failed = record.current()
        if failed is not None:
            failed.error = error.code or error.type
        shape = ERROR_SHAPES.get(request.blueprint or _blueprint_of_path(app, exc) or "", APIError.body)
        headers = {"WWW-Authenticate": 'Bearer realm="inferflux"'} if error.status == 401 else {}
        headers.update(getattr(exc, "rate_headers", {}))  # a 429's Retry-After and x-ratelimit-*
        return shape(error), error.status, headers

    return app


def _allowed_origins(state: ServerState) -> str:
    extra = os.environ.get("OLLAMA_ORIGINS", "")
    return f"{state.config.server.cors_origins},{extra}" if extra else state.config.server.cors_origins


def _origin_allowed(origin: str, allowed: str) -> bool:
    """Allowed origins are listed without ports: "http://localhost" admits any port on localhost."""
    entries = [a.strip() for a in allowed.split(",") if a.strip()]
    if "*" in entries:
        return True
    bare = origin.rsplit(":", 1)[0] if origin.count(":") > 1 else origin
    return origin in entries or bare in entries


def _blueprint_of_path(app: Quart, exc: Exception) -> str | None:
    """For a 405 (the path exists, the method does not): the blueprint that serves the path, asked of the router."""
    methods = getattr(exc, "valid_methods", None)
    if not methods:
        return None
    try:
        rule, _ = app.url_map.bind("").match(request.path, method=sorted(methods)[0], return_rule=True)
    except HTTPException:
        return None
    return rule.endpoint.rsplit(".", 1)[0] if "." in rule.endpoint else None
