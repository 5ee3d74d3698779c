"""`POST /v1/messages` (SSE or JSON) and `POST /v1/messages/count_tokens`."""

from __future__ import annotations

from typing import Any

from inferflux.server.anthropic import bp
from inferflux.server.anthropic.bodies import CountTokensRequest, MessagesRequest
from inferflux.server.anthropic.encode import fold_message, message_events, sse_response
from inferflux.server.errors import bad_request
from inferflux.server.generation import Generation, encode
from inferflux.server.http import read_body, server_state
from inferflux.server.openapi import documented


@bp.post("/v1/messages")
@documented(MessagesRequest, "Create a message (Anthropic Messages)", streams=True)
async def create_message() -> Any:
    req = await read_body(MessagesRequest)
    gen = await Generation.start(req.spec())
    events = message_events(gen, list(req.stop_sequences or []))
    if req.stream:
        return sse_response(events)
    return await fold_message(events)


@bp.post("/v1/messages/count_tokens")
@documented(CountTokensRequest, "Count a message's input tokens (Anthropic Messages)")
async def count_tokens() -> Any:
    """The prompt's tokens as `/v1/messages` would render them (same template, tools and thinking switch)."""
    req = await read_body(CountTokensRequest)
    prompt = req.prompt()
    handle = await server_state().acquire(req.model)
    try:
        if not handle.generative:
            raise bad_request(f"the model `{handle.name}` is an embedding model; it has no chat template",
                              param="model")
        return {"input_tokens": len(encode(prompt, handle))}
    finally:
        handle.release()
