"""Host weights -> the backend's device representation (dense arrays, GGUF blocks or QTensors).

Kept apart from the runner (engine/model_runner.py), which calls it once at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from inferflux.engine import device
from inferflux.formats.quants import QUANTIZED_TYPES, QTensor, dequantize_raw
from inferflux.formats.weights import QuantizedWeight, Weight
from inferflux.kernels.cpu import qmatmul


def prepare_weights(weights: Mapping[str, Weight], dtype: jnp.dtype, layout: str = device.DENSE,
                    exact: bool = False) -> dict[str, Any]:
    """Host weights -> the backend's representation (`layout`, from `device.weight_layout`).

    Quantized matrices become `QTensor`s (GPU), `GGUFBlocks` (CPU kernels; `exact`: dequantized inside the
    step instead) or dense arrays in `dtype`. A type the CPU kernels lack falls back to dense, per tensor.
    GGUF blocks are not copied where XLA:CPU can alias them (see `_blocks_array`): a quantized file takes
    about its own size in memory, in the page cache it is mapped from.
    """
    out: dict[str, Any] = {}
    for name, weight in weights.items():
        if isinstance(weight, QuantizedWeight):
            if layout == device.QTENSOR:
                out[name] = QTensor.from_raw(weight.raw, weight.qtype, weight.shape, name=name)
                continue
            if layout == device.GGUF_BLOCKS and len(weight.shape) == 2 and (
                    qmatmul.supports(weight.qtype, weight.shape[1]) or exact and weight.qtype in QUANTIZED_TYPES):
                raw = np.ascontiguousarray(weight.raw).view(np.uint8).reshape(weight.shape[0], -1)
                out[name] = qmatmul.GGUFBlocks(_blocks_array(raw), weight.qtype, (weight.shape[0], weight.shape[1]),
                                               mode="exact" if exact else "int8")
                continue
            out[name] = dequantize_raw(weight.raw, weight.qtype, weight.shape, name=name).astype(dtype)
        else:
            out[name] = jnp.asarray(np.asarray(weight, np.float32) if weight.dtype != np.float32 else weight,
                                    dtype=dtype)
    return out


def _blocks_array(raw: np.ndarray) -> jax.Array:
    """GGUF blocks as a CPU jax array that shares the memory-mapped file's pages when it can.

    `jax.device_put` of a host array whose start is 64-byte aligned aliases it on XLA:CPU instead of copying
    it (the array keeps the mapping alive); GGUF aligns tensor data to 32 bytes, and files whose data section
    starts on 64 (ours, most others) have every tensor aligned. `jnp.asarray` would copy, and the copy plus
    the mapped file pages a load touches made resident memory twice the file. Unaligned tensors are copied.
    """
    if raw.ctypes.data % 64 == 0:
        return jax.device_put(raw)
    return jnp.asarray(raw)
