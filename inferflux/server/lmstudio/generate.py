"""`/api/v0/chat/completions`, `/api/v0/completions`, `/api/v0/embeddings`: OpenAI's format plus LM Studio's fields."""

from __future__ import annotations

from typing import Any

from inferflux import __version__
from inferflux.engine import device
from inferflux.server.generation import Finished, Generation
from inferflux.server.handle import ModelHandle
from inferflux.server.http import read_body
from inferflux.server.lmstudio import bp
from inferflux.server.lmstudio.models import model_entry
from inferflux.server.openai_compat.bodies import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from inferflux.server.openai_compat.chat import chat_response
from inferflux.server.openai_compat.completions import completion_response
from inferflux.server.openai_compat.embeddings import embedding_response
from inferflux.server.openapi import documented

RUNTIME = {"name": "inferflux-jax", "version": __version__, "supported_formats": ["gguf", "safetensors"]}


def stats(done: Finished | None) -> dict[str, Any]:
    """LM Studio's `stats` of the first choice: speed, time to first token, generation time, stop reason."""
    last = None if done is None else done.timings.last_token
    if done is None or last is None:
        return {"tokens_per_second": 0.0, "time_to_first_token": None, "generation_time": 0.0,
                "stop_reason": "userStopped"}
    t = done.timings
    generation = last - t.arrival
    if done.reason == "length":
        reason = "maxPredictedTokensReached"
    elif done.reason == "content_filter":  # the policy stopped the output (server/policy/)
        reason = "userStopped"
    elif isinstance(done.stop_reason, str):
        reason = "stopStringFound"
    else:
        reason = "eosFound"
    return {"tokens_per_second": done.completion_tokens / generation if generation > 0 else 0.0,
            "time_to_first_token": (t.first_token or last) - t.arrival, "generation_time": generation,
            "stop_reason": reason}


def model_info(handle: ModelHandle) -> dict[str, Any]:
    entry = model_entry(handle, handle.name)
    return {"arch": entry["arch"], "quant": entry["quantization"], "format": entry["compatibility_type"],
            "context_length": entry["max_context_length"]}


def extras(gen: Generation) -> dict[str, Any]:
    """The fields LM Studio adds to a non-streamed response (streams are OpenAI's as they are)."""
    first = min(gen.finished, key=lambda f: f.choice, default=None)
    return {"stats": stats(first), "model_info": model_info(gen.handle),
            "runtime": {**RUNTIME, "backend": device.backend()}}


@bp.post("/api/v0/chat/completions")
@documented(ChatCompletionRequest, "Chat completion with LM Studio's stats", streams=True)
async def chat_completions() -> Any:
    return await chat_response(await read_body(ChatCompletionRequest), extras)


@bp.post("/api/v0/completions")
@documented(CompletionRequest, "Text completion with LM Studio's stats", streams=True)
async def completions() -> Any:
    return await completion_response(await read_body(CompletionRequest), extras)


@bp.post("/api/v0/embeddings")
@documented(EmbeddingRequest, "Embeddings with LM Studio's model_info")
async def embeddings() -> Any:
    body, result = await embedding_response(await read_body(EmbeddingRequest))
    return {**body, "model_info": model_info(result.handle), "runtime": {**RUNTIME, "backend": device.backend()}}
