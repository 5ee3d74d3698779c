"""`POST /v1/chat/completions` (SSE or JSON) and its WebSocket form."""

from __future__ import annotations

import json
from typing import Any

from quart import websocket

from inferflux.server.errors import to_api_error
from inferflux.server.generation import Generation
from inferflux.server.http import parse_json, read_body, server_state, validate
from inferflux.server.openai import bp
from inferflux.server.openai_compat.bodies import ChatCompletionRequest
from inferflux.server.openai_compat.chat import chat_chunks, chat_response
from inferflux.server.openapi import documented


@bp.post("/v1/chat/completions")
@documented(ChatCompletionRequest, "Chat completion (OpenAI)", streams=True)
async def chat_completions() -> Any:
    return await chat_response(await read_body(ChatCompletionRequest))


@bp.websocket("/v1/chat/completions/ws")
async def chat_websocket() -> None:
    """One JSON chat request in; its chunk objects out; then `{"object": "done"}` and close."""
    try:
        req = validate(ChatCompletionRequest, parse_json(await websocket.receive()))
        await server_state().pool.target(req.model)
        gen = await Generation.start(req.spec())
    except Exception as exc:  # noqa: BLE001 - answered on the socket
        error = to_api_error(exc)
        if error is None:
            raise
        await websocket.send(json.dumps(error.body()))
        await websocket.close(1008)
        return
    try:
        async for obj in chat_chunks(req, gen, req.include_usage):
            await websocket.send(json.dumps(obj, ensure_ascii=False))
        await websocket.send(json.dumps({"object": "done"}))
    except Exception as exc:  # noqa: BLE001 - answered on the socket
        error = to_api_error(exc)
        if error is None:
            raise
        await websocket.send(json.dumps(error.body()))
    finally:
        gen.close()
    await websocket.close(1000)
