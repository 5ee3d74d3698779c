"""LM Studio's REST API (`/api/v0/*`): the OpenAI handlers plus its `stats`, `model_info` and `runtime` fields.

LM Studio's OpenAI-compatible endpoints are our `/v1/*` as they are (its extras `top_k`, `repeat_penalty`,
`max_tokens: -1` and `ttl` are accepted there). Its own SDKs speak a proprietary WebSocket protocol, which
is out of scope.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, g

from inferflux import __version__
from inferflux.engine import device
from inferflux.server import embeddings_api, openai_api
from inferflux.server.errors import model_not_found
from inferflux.server.openai_api import server_state
from inferflux.server.state import ModelHandle

bp = Blueprint("lmstudio", __name__)

RUNTIME = {"name": "inferflux-jax", "version": __version__, "supported_formats": ["gguf", "safetensors"]}


def model_entry(handle: ModelHandle, name: str) -> dict[str, Any]:
    if handle.model is not None:
        config, meta = handle.model.config, handle.model.metadata
        arch, kind, fmt = config.architecture, "llm", handle.model.format
        quant = _quantization(meta) if fmt == "gguf" else "none"
    else:
        arch, kind, fmt, quant = "bert", "embeddings", handle.embedder.model.format, "none"
    return {"id": name, "object": "model", "type": kind, "publisher": "local", "arch": arch,
            "compatibility_type": fmt, "quantization": quant, "state": "loaded",
            "max_context_length": handle.max_model_len}


def _quantization(meta: dict[str, Any]) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(meta.get("general.file_type")).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return "unknown"


def model_info(handle: ModelHandle) -> dict[str, Any]:
    entry = model_entry(handle, handle.name)
    return {"arch": entry["arch"], "quant": entry["quantization"], "format": entry["compatibility_type"],
            "context_length": entry["max_context_length"]}


@bp.get("/api/v0/models")
async def list_models() -> Any:
    handle = server_state().handle
    return {"object": "list", "data": [model_entry(handle, name) for name in handle.names()]}


@bp.get("/api/v0/models/<path:model_id>")
async def get_model(model_id: str) -> Any:
    handle = server_state().handle
    if model_id not in handle.names():
        raise model_not_found(model_id)
    return model_entry(handle, model_id)


async def _with_stats(result: Any) -> Any:
    """Add LM Studio's fields to a non-streamed OpenAI response (streams pass through unchanged)."""
    if isinstance(result, dict):
        handle = server_state().handle
        result["stats"] = g.inferflux_tracker.stats()
        result["model_info"] = model_info(handle)
        result["runtime"] = {**RUNTIME, "backend": device.backend()}
    return result


@bp.post("/api/v0/chat/completions")
async def chat_completions() -> Any:
    return await _with_stats(await openai_api.chat_completions())


@bp.post("/api/v0/completions")
async def completions() -> Any:
    return await _with_stats(await openai_api.completions())


@bp.post("/api/v0/embeddings")
async def embeddings() -> Any:
    result = await embeddings_api.embeddings()
    result["model_info"] = model_info(server_state().handle)
    result["runtime"] = {**RUNTIME, "backend": device.backend()}
    return result
