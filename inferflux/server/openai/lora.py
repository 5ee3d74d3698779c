"""LoRA adapters over HTTP, as vLLM serves them: `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`.

Adapters load into the default model's engine (engine/lora.py), on its engine thread between two steps, so
no step sees a half-written slot; nothing recompiles. A loaded adapter is then a model name of its own:
`/v1/models` lists it with `parent` set to the base, `"model": "<adapter>"` selects it at scale 1, and the
extension `"lora": [{"name": "a1", "scale": 1.0}, {"name": "a2", "scale": 0.5}]` stacks several (on any
request to the base or to an adapter). Unloading lets the requests that use it finish first. `lora_path` is a
PEFT folder or GGUF LoRA file on the server, or a stored adapter's name (server/adapter_load.py: signatures,
decryption).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Response

from inferflux.server.adapter_load import load_adapter
from inferflux.server.adapters import adapter_names
from inferflux.server.errors import bad_request, not_found
from inferflux.server.http import read_body, server_state
from inferflux.server.openai import bp
from inferflux.server.openapi import documented


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)  # a PEFT folder, a GGUF LoRA file, or a stored adapter's name


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)


def adapter_cards(parent: str, created: int) -> list[dict[str, Any]]:
    """`/v1/models` entries of the default model's adapters."""
    handle = server_state().pool.default_handle()
    return [{"id": name, "object": "model", "created": created, "owned_by": "inferflux", "root": name,
             "parent": parent} for name in adapter_names(handle)]


@bp.post("/v1/load_lora_adapter")
@documented(LoadLoraRequest, "Load a LoRA adapter (a PEFT folder or GGUF LoRA file on the server) into the default "
            "model (vLLM)", content="text/plain")
async def load_lora_adapter() -> Any:
    req = await read_body(LoadLoraRequest, model_keys=())
    state = server_state()
    if req.lora_name in {row.name for row in state.pool.names()}:
        raise bad_request(f"`{req.lora_name}` is already a model name", param="lora_name")
    handle = await state.acquire(None)
    try:
        await load_adapter(handle, req.lora_name, req.lora_path, state.config)
    finally:
        handle.release()
    return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.", content_type="text/plain")


@bp.post("/v1/unload_lora_adapter")
@documented(UnloadLoraRequest, "Unload a LoRA adapter; requests using it finish first (vLLM)", content="text/plain")
async def unload_lora_adapter() -> Any:
    req = await read_body(UnloadLoraRequest, model_keys=())
    handle = await server_state().acquire(None)
    try:
        if req.lora_name not in adapter_names(handle):
            raise not_found(f"no LoRA adapter named `{req.lora_name}` is loaded", param="lora_name")
        assert handle.engine is not None  # adapter_names is empty without one
        await handle.engine.inspect(lambda core: core.loras.unload(req.lora_name))
    finally:
        handle.release()
    return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.", content_type="text/plain")
