"""The model endpoints both model namespaces (`/llm`, `/embedding`) share: get-or-load, list, info, tokens.

An instance's identifier and instance reference are the model's served name (the first instance of a
model in LM Studio is named by its key), so a handle the SDK gets back names the model in every later
call. Loading goes through the model pool like every dialect's; a load's `loadConfigStack` is accepted
and the instance runs with the server's runtime settings.
"""

from __future__ import annotations

import asyncio
from typing import Any

from inferflux.server.errors import bad_request, model_not_found
from inferflux.server.handle import ModelHandle
from inferflux.server.http import server_state
from inferflux.server.lmstudio_sdk.framing import Channel, ChannelHandler, Rpc
from inferflux.server.model_pool import tagged

Json = dict[str, Any]


def _object(value: Any, what: str) -> Json:
    if not isinstance(value, dict):
        raise bad_request(f"`{what}` must be an object")
    return value


def specified_model(spec: Any) -> str | None:
    """The model a `modelSpecifier` names (`query` by identifier or path, or an `instanceReference`); None: any."""
    if spec is None:
        return None
    spec = _object(spec, "modelSpecifier")
    if spec.get("type") == "instanceReference":
        ref = spec.get("instanceReference")
        if not isinstance(ref, str) or not ref:
            raise bad_request("`modelSpecifier.instanceReference` must be a model's instance reference")
        return ref
    query = _object(spec.get("query", {}), "modelSpecifier.query")
    name = query.get("identifier") or query.get("path")
    if name is not None and not isinstance(name, str):
        raise bad_request("`modelSpecifier.query.identifier` must be a string")
    return name or None


def _size(handle: ModelHandle) -> int:
    path = handle.path
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


async def instance_info(handle: ModelHandle, domain: str) -> Json:
    """LM Studio's `LlmInstanceInfo` / `EmbeddingModelInstanceInfo` of a loaded model."""
    facts = handle.facts
    info: Json = {
        "type": domain, "modelKey": handle.name, "identifier": handle.name, "instanceReference": handle.name,
        "format": "gguf" if facts is not None and facts.format == "gguf" else "safetensors",
        "displayName": handle.name, "path": str(handle.path), "sizeBytes": await asyncio.to_thread(_size, handle),
        "maxContextLength": facts.context_length if facts is not None else handle.max_model_len,
        "contextLength": handle.max_model_len,
        "paramsString": facts.parameter_size if facts is not None else None,
        "architecture": facts.architecture if facts is not None else None,
    }
    if domain == "llm":
        info["vision"] = False
        info["trainedForToolUse"] = facts is not None and "tools" in facts.capabilities
    return info


def load_config(handle: ModelHandle, domain: str) -> Json:
    """The instance's load settings as LM Studio's KV config (what `get_load_config()` reads)."""
    return {"fields": [{"key": f"{domain}.load.contextLength", "value": handle.max_model_len}]}


async def held(name: str | None, keep_alive: float | None = None) -> ModelHandle:
    """The model acquired from the pool (loaded if need be); the caller releases it."""
    return await server_state().acquire(name, keep_alive)


def _relevant(handle: ModelHandle, domain: str) -> bool:
    # Every model here embeds (LLMs through the engine's embedding mode); only LLMs generate.
    return handle.generative or domain == "embedding"


def model_endpoints(domain: str) -> tuple[dict[str, Rpc], dict[str, ChannelHandler]]:
    """The rpc and channel handlers of a model namespace (`llm` or `embedding`)."""

    async def get_or_load(channel: Channel, param: Any) -> None:
        param = _object(param, "creationParameter")
        name = param.get("identifier")
        if not isinstance(name, str) or not name:
            raise bad_request("`identifier` must name a model")
        pool = server_state().pool
        already = pool.loaded_handle(await pool.target(name)) is not None
        ttl_ms = param.get("loadTtlMs")
        # LM Studio applies the TTL to the instance this call loads, not to one that is already loaded.
        keep_alive = ttl_ms / 1000 if isinstance(ttl_ms, int | float) and ttl_ms > 0 and not already else None
        if not already:
            await channel.send({"type": "startLoading"})
        handle = await held(name, keep_alive)
        try:
            info = await instance_info(handle, domain)
        finally:
            handle.release()
        await channel.send({"type": "alreadyLoaded" if already else "success", "info": info})

    async def list_loaded(_: Any) -> list[Json]:
        return [await instance_info(h, domain) for h in server_state().pool.loaded() if _relevant(h, domain)]

    async def get_model_info(param: Any) -> Json:
        handle = await held(specified_model(_object(param or {}, "parameter").get("specifier")))
        try:
            return await instance_info(handle, domain)
        finally:
            handle.release()

    async def get_load_config(param: Any) -> Json:
        handle = await held(specified_model(_object(param or {}, "parameter").get("specifier")))
        try:
            return load_config(handle, domain)
        finally:
            handle.release()

    async def tokenize(param: Any) -> Json:
        param = _object(param, "parameter")
        text = param.get("inputString")
        if not isinstance(text, str):
            raise bad_request("`inputString` must be a string")
        handle = await held(specified_model(param.get("specifier")))
        try:
            return {"tokens": handle.tokenizer.encode(text, add_special_tokens=False)}
        finally:
            handle.release()

    async def count_tokens(param: Any) -> Json:
        return {"tokenCount": len((await tokenize(param))["tokens"])}

    async def unload_model(param: Any) -> None:
        name = _object(param, "parameter").get("identifier")
        pool = server_state().pool
        for handle in pool.loaded():
            if isinstance(name, str) and (name in handle.names() or tagged(name) in map(tagged, handle.names())):
                pool.unload(handle)
                return
        raise model_not_found(str(name))

    rpcs: dict[str, Rpc] = {"listLoaded": list_loaded, "getModelInfo": get_model_info,
                            "getLoadConfig": get_load_config, "tokenize": tokenize, "countTokens": count_tokens,
                            "unloadModel": unload_model}
    return rpcs, {"getOrLoad": get_or_load}

