"""Per-backend choices, in one table: compute dtype and whether quantized weights stay packed.

On XLA:CPU a float32 GEMV streams at memory speed while bf16 and int8 dots
ran 20-50x slower (measured, see ARCHITECTURE.md), so CPU computes in float32
with quantized weights dequantized at load. GPUs compute in bfloat16 and keep
quantized weights packed on device, dequantized inside the step.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BackendDefaults:
    dtype: jnp.dtype
    keep_quantized_packed: bool


BACKEND_DEFAULTS: dict[str, BackendDefaults] = {
    "cpu": BackendDefaults(jnp.dtype(jnp.float32), keep_quantized_packed=False),
    "gpu": BackendDefaults(jnp.dtype(jnp.bfloat16), keep_quantized_packed=True),  # CUDA and ROCm
    "metal": BackendDefaults(jnp.dtype(jnp.float32), keep_quantized_packed=False),
    "tpu": BackendDefaults(jnp.dtype(jnp.bfloat16), keep_quantized_packed=True),
}


def backend() -> str:
    return jax.default_backend()


def backend_defaults(name: str | None = None) -> BackendDefaults:
    return BACKEND_DEFAULTS.get(name or backend(), BACKEND_DEFAULTS["cpu"])


def compute_dtype(requested: str = "auto", name: str | None = None) -> jnp.dtype:
    """The activation dtype: the backend's default unless the config names one."""
    if requested == "auto":
        return backend_defaults(name).dtype
    if requested not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"runtime.dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
    return jnp.dtype(requested)


def free_memory_bytes() -> int:
    """Free memory of the default device (host RAM on CPU)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
