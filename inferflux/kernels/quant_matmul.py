"""The one place where activations meet weight matrices.

Every projection in every model calls `linear`, so the weight representation
is decided here and nowhere else (engine/device.py picks it per backend):

* a dense array (float32 where quantized files were dequantized at load);
* a packed `QTensor` (GPU: quantized weights stay packed on device; Q8_0, Q4_0,
  Q4_K and Q6_K are multiplied by the fused Pallas kernel
  `kernels/quant_matmul_pallas.py`, which reads them as stored; other types
  are dequantized inside the step);
* `GGUFBlocks` (CPU): the file's raw GGUF blocks, multiplied by the C++ FFI
  kernel `kernels/cpu/qmatmul.py` (activations quantized to int8 per block,
  integer dots), or in "exact" mode dequantized to float32 inside the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from inferflux.formats.quants import QTensor, dequantize
from inferflux.kernels.cpu.qmatmul import GGUFBlocks, dequantize_blocks, qmatmul, qmatmul_many
from inferflux.kernels.quant_matmul_pallas import fused_supported, qmatmul_pallas

Weight = jax.Array | QTensor | GGUFBlocks


def linear(
    x: jax.Array, weight: Weight, bias: jax.Array | None = None, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """`x @ weight.T (+ bias)` for weights stored `[out_features, in_features]`.

    Accumulates in float32; the result is `out_dtype` (default: x's dtype).
    """
    if isinstance(weight, GGUFBlocks) and weight.mode != "exact":
        y = qmatmul(x, weight)
    elif isinstance(weight, QTensor) and jax.default_backend() == "gpu" and fused_supported(weight):
        y = qmatmul_pallas(x, weight)
    else:
        if isinstance(weight, QTensor):
            # Dequantize inside the compiled step: weights stay packed in device memory.
            weight = dequantize(weight, x.dtype)
        elif isinstance(weight, GGUFBlocks):
            weight = dequantize_blocks(weight)
        y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=jnp.float32)
    return _finish(y, bias, out_dtype or x.dtype)


def linear_many(x: jax.Array, weights: Sequence[Weight], biases: Sequence[jax.Array | None] | None = None,
                out_dtype: jnp.dtype | None = None) -> list[jax.Array]:
    """`linear(x, w, b)` for each weight of one input (q|k|v, gate|up).

    When every weight is CPU kernel blocks this is one kernel call: x is quantized once and the weights' rows
    are shared out over the threads together, the weights staying where they are (`qmatmul_many`). Otherwise
    one `linear` each.
    """
    biases = list(biases) if biases is not None else [None] * len(weights)
    if len(weights) > 1 and all(isinstance(w, GGUFBlocks) and w.mode != "exact" for w in weights):
        ys = qmatmul_many(x, [w for w in weights if isinstance(w, GGUFBlocks)])
        return [_finish(y, b, out_dtype or x.dtype) for y, b in zip(ys, biases)]
    return [linear(x, w, b, out_dtype) for w, b in zip(weights, biases)]


def _finish(y: jax.Array, bias: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
    y = y.astype(dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def embed(table: Weight, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows `ids` of an embedding table (dense or packed); packed rows are dequantized exactly."""
    if isinstance(table, QTensor):
        return dequantize(table.gather_rows(ids), dtype)
    if isinstance(table, GGUFBlocks):
        return dequantize_blocks(table.rows(ids)).astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)
