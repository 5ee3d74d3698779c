"""Which LoRA adapters a request names: `model: "<adapter>"` and the `lora` extension (server/openai/lora.py).

Apart from the routes so the generation layer and the request bodies can use it without importing them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from inferflux.engine.sampling_params import SamplingParams
from inferflux.server import record

if TYPE_CHECKING:
    from inferflux.server.handle import ModelHandle
    from inferflux.server.model_pool import ModelPool


class LoraRef(BaseModel):
    """One adapter of a request's `lora` list."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    scale: float = Field(1.0, allow_inf_nan=False)


def adapter_names(handle: ModelHandle | None) -> list[str]:
    """The adapters loaded into `handle`'s engine (none for an embedding model)."""
    # An embedding model has no engine; engines of other kinds (and test doubles) may have no adapter slots.
    loras = getattr(getattr(getattr(handle, "engine", None), "core", None), "loras", None)
    return [] if loras is None else list(loras.names())


def is_adapter(pool: ModelPool, name: str) -> bool:
    """Whether `name` is an adapter of the default model (so requests naming it go to the default)."""
    return name in adapter_names(pool.default_handle())


def with_adapters(params: SamplingParams, model: str | None, handle: ModelHandle) -> SamplingParams:
    """`params` with the adapter `model` names (at scale 1) added to its `lora` list; the request's record
    gets the adapter names (`inferflux:adapter_requests_total{adapter}`, "a1+a2" for a stack)."""
    if model is not None and model in adapter_names(handle):
        params = dataclasses.replace(params, lora=[(model, 1.0), *(params.lora or ())])
    rec = record.current()
    if rec is not None and params.lora:
        rec.adapter = "+".join(name for name, _ in params.lora)
    return params
