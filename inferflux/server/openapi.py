"""`GET /openapi.json`: an OpenAPI 3.1 document of every route of every dialect, generated, never written.

Each route's request body is the pydantic model its handler validates (attached with `@documented`);
the paths come from the app's own URL map, so a route cannot exist without being listed. Error
responses are described in the shape of the dialect that serves the route (OpenAI's error object,
Ollama's `{"error": "..."}`), which is what a contract fuzzer (schemathesis in the tests) checks
the server against.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from quart import Quart

from inferflux import __version__
from inferflux.server.access.scopes import PUBLIC, required_scope

F = TypeVar("F", bound=Callable[..., Any])

_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_PLAIN_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
# Blueprints whose errors are `{"error": "message"}`; every other route answers with OpenAI's object.
PLAIN_ERROR_BLUEPRINTS = {"ollama"}


def documented(body: type[BaseModel] | None = None, summary: str = "", streams: bool = False,
               ndjson: bool = False, content: str = "application/json") -> Callable[[F], F]:
    """Describe a route for the document: its body model, a summary, whether it may stream (SSE / NDJSON),
    and the content type of its 200 answer."""
    def mark(view: F) -> F:
        view.__openapi__ = {"body": body, "summary": summary, "streams": streams,  # type: ignore[attr-defined]
                            "ndjson": ndjson, "content": content}
        return view

    return mark


def openapi_document(app: Quart) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    # With security.auth required, every route that needs a key says so (and which scope), and 401/403 are
    # in each one's 4XX; the scopes come from the one table in server/access/scopes.py.
    state = app.extensions.get("inferflux")
    secured = state is not None and state.config.security.auth == "required"
    public_metrics = state is not None and state.config.security.public_metrics
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static" or getattr(rule, "websocket", False):
            continue
        view = app.view_functions[rule.endpoint]
        meta = getattr(view, "__openapi__", {})
        blueprint = rule.endpoint.split(".", 1)[0] if "." in rule.endpoint else ""
        path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule)
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"{([A-Za-z_]+)}", path)]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation: dict[str, Any] = {"operationId": f"{method.lower()}_{rule.endpoint.replace('.', '_')}",
                                         "summary": meta.get("summary") or (view.__doc__ or "").split("\n")[0],
                                         "tags": [blueprint or "server"],
                                         "responses": _responses(blueprint, meta)}
            if params:
                operation["parameters"] = params
            if secured and required_scope(rule.endpoint, public_metrics) != PUBLIC:
                operation["security"] = [{"bearer": []}, {"api_key": []}]
                operation["description"] = f"Needs an API key with the `{required_scope(rule.endpoint)}` scope."
            model = meta.get("body")
            if model is not None and method in ("POST", "PUT", "DELETE", "PATCH"):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            paths.setdefault(path, {})[method.lower()] = operation
    components: dict[str, Any] = {"schemas": schemas}
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                         "api_key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
    return {"openapi": "3.1.0",
            "info": {"title": "InferFlux", "version": __version__,
                     "description": "OpenAI-, Ollama- and LM Studio-compatible LLM inference server."},
            "paths": paths, "components": components}


def _responses(blueprint: str, meta: dict[str, Any]) -> dict[str, Any]:
    error = {"description": "error", "content": {"application/json": {
        "schema": _PLAIN_ERROR if blueprint in PLAIN_ERROR_BLUEPRINTS else _OPENAI_ERROR}}}
    ok: dict[str, Any] = {"description": "OK", "content": {meta.get("content", "application/json"): {"schema": {}}}}
    if meta.get("streams"):
        ok["content"]["text/event-stream"] = {"schema": {}}
    if meta.get("ndjson"):
        ok["content"]["application/x-ndjson"] = {"schema": {}}
    return {"200": ok, "4XX": error, "503": error}
