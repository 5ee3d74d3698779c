"""`GET /api/v1/models`, `POST /api/v1/models/load`, `POST /api/v1/models/unload`: the model pool in LM Studio's words.

Every model the server answers for is listed (the served model's names, then the stored models), with
`loaded_instances` for the loaded ones; an instance id is the model's served name, as LM Studio's first
instance of a model is its key. Read from facts (manifests and handles), never from a model file.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from inferflux.formats.describe import ModelFacts
from inferflux.server.errors import model_not_found
from inferflux.server.handle import ModelHandle
from inferflux.server.http import read_body, server_state
from inferflux.server.lmstudio.v1 import bp
from inferflux.server.model_pool import Listed, tagged
from inferflux.server.openapi import documented


class LoadConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    context_length: int | None = None
    eval_batch_size: int | None = None
    flash_attention: bool | None = None
    num_experts: int | None = None
    offload_kv_cache_to_gpu: bool | None = None


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    config: LoadConfig | None = None
    echo_load_config: bool = False


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instance_id: str


def bits_per_weight(quantization: str | None) -> float | None:
    """'Q4_K_M' -> 4, 'F16' / 'BF16' -> 16, 'F32' -> 32; None for unquantized safetensors ('none')."""
    found = re.search(r"(\d+)", quantization or "")
    return float(found.group(1)) if found and quantization != "none" else None


def instance_config(handle: ModelHandle) -> dict[str, Any]:
    config: dict[str, Any] = {"context_length": handle.max_model_len}
    if handle.generative:
        config["eval_batch_size"] = server_state().config.runtime.max_num_batched_tokens
    return config


def entry(name: str, facts: ModelFacts | None, handle: ModelHandle | None, size: int | None) -> dict[str, Any]:
    """One model of LM Studio's v1 list."""
    generative = facts is None or facts.generative
    quant = facts.quantization if facts is not None else None
    row: dict[str, Any] = {
        "type": "llm" if generative else "embedding", "publisher": "local", "key": name, "display_name": name,
        "quantization": {"name": None if quant in (None, "none") else quant, "bits_per_weight": bits_per_weight(quant)},
        "size_bytes": size or 0, "params_string": facts.parameter_size if facts is not None else None,
        "loaded_instances": [] if handle is None else [{"id": name, "config": instance_config(handle)}],
        "max_context_length": facts.context_length if facts is not None else None,
        "format": "gguf" if facts is not None and facts.format == "gguf" else None,
    }
    if generative:
        row["architecture"] = facts.architecture if facts is not None else None
        row["capabilities"] = {"vision": False,
                               "trained_for_tool_use": facts is not None and "tools" in facts.capabilities}
        row["description"] = None
    return row


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


async def _entries() -> list[dict[str, Any]]:
    pool = server_state().pool
    rows: list[Listed] = await asyncio.to_thread(pool.names)
    loaded = {n: h for h in pool.loaded() for n in h.names()}
    default = pool.default_handle()
    out = []
    for row in rows:
        handle = default if row.default else loaded.get(row.name)
        facts = row.stored.facts if row.stored is not None else None
        if facts is None and handle is not None:
            facts = handle.facts
        size = row.stored.size if row.stored is not None else None
        if size is None and handle is not None:
            size = await asyncio.to_thread(_size, handle.path)
        out.append(entry(row.name, facts, handle, size))
    return out


@bp.get("/api/v1/models")
@documented(None, "List models (LM Studio REST v1)")
async def list_models() -> Any:
    return {"models": await _entries()}


@bp.post("/api/v1/models/load")
@documented(LoadRequest, "Load a model (LM Studio REST v1)")
async def load_model() -> Any:
    body = await read_body(LoadRequest)
    started = time.monotonic()
    handle = await server_state().acquire(body.model, math.inf)  # loaded by hand: stays until unloaded
    try:
        config = instance_config(handle)
    finally:
        handle.release()
    return {"type": "llm" if handle.generative else "embedding", "instance_id": handle.name,
            "model_instance_id": handle.name, "status": "loaded", "config": config,
            "load_time_seconds": round(time.monotonic() - started, 3)}


@bp.post("/api/v1/models/unload")
@documented(UnloadRequest, "Unload a model instance (LM Studio REST v1)")
async def unload_model() -> Any:
    body = await read_body(UnloadRequest, model_keys=())
    pool = server_state().pool
    for handle in pool.loaded():
        if body.instance_id in handle.names() or tagged(body.instance_id) in {tagged(n) for n in handle.names()}:
            pool.unload(handle)
            return {"instance_id": body.instance_id}
    raise model_not_found(body.instance_id)
