"""LM Studio's model list: `/api/v0/models` and `/api/v0/models/{id}` (loaded and stored models)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from inferflux.formats.describe import describe_model
from inferflux.server.errors import model_not_found
from inferflux.server.handle import ModelHandle
from inferflux.server.http import server_state
from inferflux.server.lmstudio import bp
from inferflux.server.model_pool import Listed, tagged
from inferflux.store import ModelStore


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


@bp.get("/api/v0/models")
async def list_models() -> Any:
    return {"object": "list", "data": await _entries()}


@bp.get("/api/v0/models/<path:model_id>")
async def get_model(model_id: str) -> Any:
    for entry in await _entries():
        if model_id == entry["id"] or tagged(model_id) == tagged(entry["id"]):
            return entry
    raise model_not_found(model_id)
