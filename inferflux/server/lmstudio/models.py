"""LM Studio's model list: `/api/v0/models` and `/api/v0/models/{id}` (loaded and stored models)."""

from __future__ import annotations

import asyncio
from typing import Any

from inferflux.formats.describe import ModelFacts
from inferflux.server.errors import model_not_found
from inferflux.server.handle import ModelHandle
from inferflux.server.http import server_state
from inferflux.server.lmstudio import bp
from inferflux.server.model_pool import Listed, tagged


def _entry(name: str, facts: ModelFacts | None, state: str, context: int | None) -> dict[str, Any]:
    """One row of LM Studio's list, from a model's facts (read from a manifest or a loaded handle, no file)."""
    row: dict[str, Any] = {"id": name, "object": "model", "type": "llm", "publisher": "local", "state": state}
    if facts is not None:
        row.update({"type": "llm" if facts.generative else "embeddings", "arch": facts.architecture,
                    "compatibility_type": facts.format, "quantization": facts.quantization})
    return {**row, "max_context_length": context}


def model_entry(handle: ModelHandle, name: str) -> dict[str, Any]:
    """A loaded model: its facts, and the context window it was loaded with."""
    return _entry(name, handle.facts, "loaded", handle.max_model_len)


def stored_entry(row: Listed) -> dict[str, Any]:
    """A stored model that is not loaded: what its manifest says (the context capped as a load would cap it)."""
    facts = row.stored.facts if row.stored is not None else None
    context = facts.context_length if facts is not None else None
    limit = server_state().config.runtime.max_model_len
    entry = _entry(row.name, facts, "not-loaded", min(context, limit) if context and limit else context)
    if facts is None and row.stored is not None:  # headers unreadable at pull: the manifest's own fields
        entry.update({"arch": row.stored.architecture or "unknown", "compatibility_type": row.stored.format,
                      "quantization": row.stored.quantization or "none"})
    return entry


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
            out.append(stored_entry(row))
        else:  # the default model while it is not loaded (keep_alive 0, or evicted)
            out.append({"id": row.name, "object": "model", "type": "llm", "publisher": "local",
                        "state": "not-loaded"})
    return out


@bp.get("/api/v0/models")
async def list_models() -> Any:
    return {"object": "list", "data": await _entries()}


@bp.get("/api/v0/models/<path:model_id>")
async def get_model(model_id: str) -> Any:
    for entry in await _entries():
        if model_id == entry["id"] or tagged(model_id) == tagged(entry["id"]):
            return entry
    raise model_not_found(model_id)
