"""`/v1/responses` routes: create (JSON or the typed SSE stream), retrieve, delete, input items, token counts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from quart import Quart, Response, current_app, g, request

from inferflux.server.errors import APIError, bad_request, to_api_error
from inferflux.server.generation import Generation, Prompt, encode
from inferflux.server.http import read_body, server_state
from inferflux.server.openapi import documented
from inferflux.server.responses import bp
from inferflux.server.responses.bodies import InputTokensRequest, ResponsesRequest, _Input
from inferflux.server.responses.encode import new_response_id, response_events
from inferflux.server.responses.store import ResponseStore, StoredResponse, parse_retention

_EXTENSION = "inferflux.responses"


def response_store(app: Quart | None = None) -> ResponseStore:
    """The app's response store (`$INFERFLUX_HOME/state.db`, table `responses`), opened on first use."""
    app = app or current_app
    store = app.extensions.get(_EXTENSION)
    if store is None:
        store = app.extensions[_EXTENSION] = ResponseStore.at_home(app.extensions["inferflux"].config.home_path)
    return store


def tenant() -> str:
    """Whose responses these are: the API key's tenant, or "" with security.auth off (one local user)."""
    return getattr(g.get("principal"), "tenant", None) or ""


def prior_items(req: _Input) -> list[dict[str, Any]]:
    """The items of the `previous_response_id` chain, oldest first: each turn's input, then its output."""
    if not req.previous_response_id:
        return []
    items: list[dict[str, Any]] = []
    for stored in response_store().chain(tenant(), req.previous_response_id):
        items += stored.input_items + stored.response.get("output", [])
    return items


@bp.post("/v1/responses")
@documented(ResponsesRequest, "Create a response (OpenAI Responses)", streams=True)
async def create_response() -> Any:
    req = await read_body(ResponsesRequest)
    spec = req.spec(prior_items(req))
    gen = await Generation.start(spec)
    response_id, items = new_response_id(), req.items()
    store, owner = response_store(), tenant()
    retention = parse_retention(server_state().config.server.responses_retention)

    def on_done(response: dict[str, Any]) -> None:
        if req.store:
            store.save(owner, response, items, retention)

    events = response_events(req, gen, response_id, on_done)
    if req.stream:
        return _sse(events)
    last: dict[str, Any] = {}
    try:
        async for event in events:
            last = event
    finally:
        gen.close()
    return last["response"]


@bp.get("/v1/responses/<response_id>")
@documented(summary="A stored response (OpenAI Responses)")
async def get_response(response_id: str) -> Any:
    if request.args.get("stream") in ("true", "1"):
        raise bad_request("replaying a stored response as a stream is not supported", param="stream")
    return _stored(response_id).response


@bp.delete("/v1/responses/<response_id>")
@documented(summary="Delete a stored response (OpenAI Responses)")
async def delete_response(response_id: str) -> Any:
    response_store().delete(tenant(), response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@bp.get("/v1/responses/<response_id>/input_items")
@documented(summary="The input items of a stored response (OpenAI Responses)")
async def list_input_items(response_id: str) -> Any:
    items = list(_stored(response_id).input_items)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be `asc` or `desc`", param="order")
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        raise bad_request("limit must be an integer from 1 to 100", param="limit") from None
    if not 1 <= limit <= 100:
        raise bad_request("limit must be an integer from 1 to 100", param="limit")
    if order == "desc":
        items.reverse()
    for key, skip_through in (("after", True), ("before", False)):
        cursor = request.args.get(key)
        if cursor:
            ids = [item["id"] for item in items]
            if cursor not in ids:
                raise bad_request(f"no input item {cursor!r} in this response", param=key)
            at = ids.index(cursor)
            items = items[at + 1:] if skip_through else items[:at]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


@bp.post("/v1/responses/input_tokens")
@documented(InputTokensRequest, "Count the tokens of a Responses input")
async def count_input_tokens() -> Any:
    req = await read_body(InputTokensRequest)
    prompt = Prompt(messages=req.messages(prior_items(req)), tools=req.template_tools(),
                    template_kwargs=req.template_kwargs())
    handle = await server_state().acquire(req.model or None)
    try:
        ids = encode(prompt, handle)
    finally:
        handle.release()
    return {"object": "response.input_tokens", "input_tokens": len(ids)}


def _stored(response_id: str) -> StoredResponse:
    return response_store().get(tenant(), response_id)


def _sse(events: AsyncIterator[dict[str, Any]]) -> Response:
    """Typed SSE (`event: <type>` + `data:`), as OpenAI streams Responses; an error mid-stream is an `error`
    event (with OpenAI's error object under `error`, which the `openai` client raises)."""
    async def body() -> AsyncIterator[str]:
        seq = 0
        try:
            async for obj in events:
                seq = obj["sequence_number"] + 1
                yield f"event: {obj['type']}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream
            error = to_api_error(exc)
            if error is None:
                raise
            yield f"event: error\ndata: {json.dumps(_error_event(error, seq), ensure_ascii=False)}\n\n"

    response = Response(body(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None
    return response


def _error_event(error: APIError, seq: int) -> dict[str, Any]:
    return {"type": "error", "sequence_number": seq, "code": error.code, "message": error.message,
            "param": error.param, **error.body()}


__all__ = ["response_store", "tenant"]
