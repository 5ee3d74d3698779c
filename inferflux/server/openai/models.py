"""Models and tokenizer routes: `/v1/models`, vLLM's `/tokenize`, `/detokenize`, `/tokenizer_info`, `/version`."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict
from quart import request

from inferflux import __version__
from inferflux.server.errors import bad_request, model_not_found
from inferflux.server.generation import Prompt, encode
from inferflux.server.http import read_body, server_state
from inferflux.server.model_pool import Listed, tagged
from inferflux.server.openai import bp
from inferflux.server.openai.lora import adapter_cards
from inferflux.server.openai_compat.bodies import ChatMessage
from inferflux.server.openapi import documented


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def model_card(row: Listed) -> dict[str, Any]:
    """One `/v1/models` entry: the default model's names, then the stored models (`name:tag`)."""
    state = server_state()
    pool = state.pool
    handle = pool.default_handle() if row.default else None
    created = handle.created if handle is not None else (
        int(row.stored.modified.timestamp()) if row.stored is not None else int(state.started))
    card = {"id": row.name, "object": "model", "created": created, "owned_by": "inferflux",
            "root": str(pool.default.path) if row.default else row.name, "parent": None}
    if handle is not None:
        card["max_model_len"] = handle.max_model_len
    return card


def find_model(model_id: str) -> Listed:
    """The listed model called `model_id` (`name` also matches `name:latest`), or a 404."""
    for row in server_state().pool.names():
        if model_id == row.name or tagged(model_id) == tagged(row.name):
            return row
    raise model_not_found(model_id)


@bp.get("/v1/models")
async def list_models() -> Any:
    rows = await asyncio.to_thread(server_state().pool.names)
    cards = [model_card(row) for row in rows]
    default = next((card for card, row in zip(cards, rows) if row.default), None)
    if default is not None:  # the default model's LoRA adapters, `parent` naming it (server/openai/lora.py)
        cards += adapter_cards(default["id"], default["created"])
    return {"object": "list", "data": cards}


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Any:
    rows = await asyncio.to_thread(server_state().pool.names)
    default = next((model_card(row) for row in rows if row.default), None)
    adapter = next((card for card in adapter_cards(default["id"], default["created"]) if card["id"] == model_id),
                   None) if default is not None else None
    return adapter or model_card(await asyncio.to_thread(find_model, model_id))


@bp.post("/tokenize")
@documented(TokenizeRequest, "Token ids of a prompt or a conversation (vLLM)")
async def tokenize() -> Any:
    req = await read_body(TokenizeRequest)
    if not req.messages and req.prompt is None:  # an empty list is no conversation either
        raise bad_request("give `prompt` or a non-empty `messages`", param="prompt")
    handle = await server_state().acquire(req.model)
    try:
        if req.messages:
            if not handle.generative:
                raise bad_request(f"the model `{handle.name}` is an embedding model; it has no chat template",
                                  param="messages")
            ids = encode(Prompt(messages=[m.for_template() for m in req.messages],
                                add_generation_prompt=req.add_generation_prompt), handle)
        else:
            ids = handle.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": handle.max_model_len}
    finally:
        handle.release()


@bp.post("/detokenize")
@documented(DetokenizeRequest, "Text of token ids (vLLM)")
async def detokenize() -> Any:
    req = await read_body(DetokenizeRequest)
    handle = await server_state().acquire(req.model)
    try:
        vocab = handle.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise bad_request(f"token ids must be in 0..{vocab - 1}", param="tokens")
        return {"prompt": handle.tokenizer.decode(req.tokens)}
    finally:
        handle.release()


@bp.get("/tokenizer_info")
async def tokenizer_info() -> Any:
    """vLLM's tokenizer facts, which lm-evaluation-harness reads to tokenize through the server (`/tokenize`)."""
    handle = await server_state().acquire(request.args.get("model"))
    try:
        tokenizer = handle.tokenizer

        def text(token_id: int | None) -> str | None:
            return None if token_id is None else tokenizer.id_to_token(token_id)

        template = handle.model.chat_template if handle.generative and handle.model is not None else None
        return {"tokenizer_class": "InferFluxTokenizer", "model_max_length": handle.max_model_len,
                "vocab_size": tokenizer.vocab_size, "bos_token": text(tokenizer.bos_id),
                "eos_token": text(tokenizer.eos_id), "pad_token": None, "add_bos_token": tokenizer.add_bos,
                "chat_template": None if template is None or template.is_fallback else template.source}
    finally:
        handle.release()


@bp.get("/version")
async def version() -> Any:
    return {"version": __version__}
