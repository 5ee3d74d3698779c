"""The Quart application factory: one blueprint per API surface, shared error handling, CORS, limits."""

from __future__ import annotations

import logging
import os
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from inferflux.server import embeddings_api, lmstudio_api, ollama_api, openai_api, ops_api
from inferflux.server.errors import APIError, error_body
from inferflux.server.state import ServerState

log = logging.getLogger(__name__)


def create_app(state: ServerState) -> Quart:
    """Build the app around a loaded model (`ServerState`); the caller owns the engine's lifetime."""
    app = Quart("inferflux")
    app.extensions["inferflux"] = state
    app.config["MAX_CONTENT_LENGTH"] = state.config.server.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(embeddings_api.bp)
    app.register_blueprint(lmstudio_api.bp)
    app.register_blueprint(ops_api.bp)
    if state.config.server.admin_enabled:
        app.register_blueprint(ops_api.admin_bp)
    app.register_blueprint(ollama_api.bp)

    @app.before_request
    async def limits_and_preflight() -> Any:
        origin = request.headers.get("Origin")
        if origin and not _origin_allowed(origin, _allowed_origins(state)):
            # A web page from another site must not drive a local model server (Ollama's rule).
            return _error(f"origin {origin} is not allowed (server.cors_origins)", code="origin_not_allowed"), 403
        length = request.content_length
        if length is not None and length > state.config.server.max_body_bytes:
            return _error(f"the request body is {length} bytes; the limit is "
                          f"{state.config.server.max_body_bytes}", code="body_too_large"), 413
        if request.method == "OPTIONS":
            return Response("", status=204)
        return None

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
        return response

    @app.errorhandler(APIError)
    async def api_error(exc: APIError) -> Any:
        return exc.body(), exc.status

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        code = exc.code or 500
        message = {413: f"the request body is larger than {state.config.server.max_body_bytes} bytes",
                   404: f"no route for {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}"}.get(code, exc.description or str(exc))
        kind = "invalid_request_error" if code < 500 else "server_error"
        return _error(message, kind), code

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(f"internal error: {type(exc).__name__}", "server_error"), 500

    return app


def _error(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """Ollama's `{"error": "..."}` on its routes (`/api/*` but LM Studio's `/api/v0/*`), else OpenAI's object."""
    if request.path.startswith("/api/") and not request.path.startswith("/api/v0/"):
        return {"error": message}
    return error_body(message, kind, code=code)


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
