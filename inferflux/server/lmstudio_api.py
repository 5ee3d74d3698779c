"""LM Studio's REST API (`/api/v0/*`): the OpenAI handlers plus its `stats`, `model_info` and `runtime` fields.

LM Studio's OpenAI-compatible endpoints are our `/v1/*` as they are (its extras `top_k`, `repeat_penalty`,
`max_tokens: -1` and `ttl`, the idle seconds before the model unloads, are accepted there). Stored models
are listed with `state: "not-loaded"` until a request loads them. Its own SDKs speak a proprietary
WebSocket protocol, which is out of scope.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from quart import Blueprint, g

from inferflux import __version__
from inferflux.engine import device
from inferflux.formats.describe import describe_model
from inferflux.server import embeddings_api, openai_api
from inferflux.server.errors import model_not_found
from inferflux.server.model_pool import Listed, tagged
from inferflux.server.openai_api import server_state
from inferflux.server.state import ModelHandle
from inferflux.store import ModelStore

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


def stored_entry(row: Listed, context: int | None) -> dict[str, Any]:
    """A stored model that is not loaded: what its manifest and file headers say."""
    entry = row.stored
    arch = entry.architecture or "unknown"
    limit = server_state().config.runtime.max_model_len
    return {"id": row.name, "object": "model", "type": "embeddings" if arch.lower().startswith("bert") else "llm",
            "publisher": "local", "arch": arch, "compatibility_type": entry.format,
            "quantization": entry.quantization or "none", "state": "not-loaded",
            "max_context_length": min(context, limit) if context and limit else context}


@functools.lru_cache(maxsize=256)
def _context_length(store: ModelStore, name: str, digest: str) -> int | None:
    """The context length in a stored model's headers (cached per content digest)."""
    try:
        return describe_model(store.path(name)).get("context_length")
    except Exception:  # noqa: BLE001 - e.g. an encoder describe_model does not cover
        return None


async def _entries() -> list[dict[str, Any]]:
    pool = server_state().pool
    rows = await asyncio.to_thread(pool.names)
    loaded = {h.name: h for h in pool.loaded()}
    default = pool.default_handle()
    out = []
    for row in rows:
        handle = default if row.default else loaded.get(row.name)
        if handle is not None:
            out.append(model_entry(handle, row.name))
        elif row.stored is not None:
            context = await asyncio.to_thread(_context_length, pool.store, row.name, row.stored.digest)
            out.append(stored_entry(row, context))
        else:  # the default model while it is not loaded (keep_alive 0, or evicted)
            out.append({"id": row.name, "object": "model", "type": "llm", "publisher": "local",
                        "state": "not-loaded"})
    return out


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
    return {"object": "list", "data": await _entries()}


@bp.get("/api/v0/models/<path:model_id>")
async def get_model(model_id: str) -> Any:
    for entry in await _entries():
        if model_id == entry["id"] or tagged(model_id) == tagged(entry["id"]):
            return entry
    raise model_not_found(model_id)


async def _with_stats(result: Any) -> Any:
    """Add LM Studio's fields to a non-streamed OpenAI response (streams pass through unchanged)."""
    if isinstance(result, dict):
        result["stats"] = g.inferflux_tracker.stats()
        result["model_info"] = model_info(g.inferflux_handle)
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
    result["model_info"] = model_info(g.inferflux_handle)
    result["runtime"] = {**RUNTIME, "backend": device.backend()}
    return result
