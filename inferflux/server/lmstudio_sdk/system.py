"""The `/system` namespace's `listDownloadedModels` (the SDK's `list_downloaded_models()`, `llm.list_downloaded()`).

"Downloaded" is every model this server answers for: the served model's names, then the stored models,
read from facts (manifests and handles), never from a model file.
"""

from __future__ import annotations

import asyncio
from typing import Any

from inferflux.formats.describe import ModelFacts
from inferflux.server.http import server_state
from inferflux.server.lmstudio_sdk.framing import ChannelHandler, Rpc
from inferflux.server.model_pool import Listed


def downloaded(name: str, facts: ModelFacts | None, path: str, size: int) -> dict[str, Any]:
    """LM Studio's `LlmInfo` / `EmbeddingModelInfo` of one model."""
    generative = facts is None or facts.generative
    info: dict[str, Any] = {
        "type": "llm" if generative else "embedding", "modelKey": name, "displayName": name, "path": path,
        "format": "gguf" if facts is not None and facts.format == "gguf" else "safetensors", "sizeBytes": size,
        "maxContextLength": facts.context_length if facts is not None else 0,
        "paramsString": facts.parameter_size if facts is not None else None,
        "architecture": facts.architecture if facts is not None else None,
    }
    if generative:
        info["vision"] = False
        info["trainedForToolUse"] = facts is not None and "tools" in facts.capabilities
    return info


async def list_downloaded(_: Any) -> list[dict[str, Any]]:
    pool = server_state().pool
    rows: list[Listed] = await asyncio.to_thread(pool.names)
    default = pool.default_handle()
    out = []
    for row in rows:
        facts = row.stored.facts if row.stored is not None else None
        if facts is None and row.default and default is not None:
            facts = default.facts
        path = str(default.path) if row.default and default is not None else row.name
        out.append(downloaded(row.name, facts, path, row.stored.size if row.stored is not None else 0))
    return out


def system_endpoints() -> tuple[dict[str, Rpc], dict[str, ChannelHandler]]:
    return {"listDownloadedModels": list_downloaded}, {}
