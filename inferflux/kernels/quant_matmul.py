"""The one place where activations meet weight matrices.

Every projection in every model calls `linear`, so the weight representation
is decided here and nowhere else: a dense array (float32 on CPU, where
quantized files are dequantized at load) or a packed `QTensor` (GPU, where
quantized weights stay packed on device). A fused dequantizing Pallas kernel
for the GPU, or a CPU kernel that reads GGUF blocks directly, slots in here
without touching the models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from inferflux.formats.quants import QTensor, dequantize

Weight = jax.Array | QTensor


def linear(
    x: jax.Array, weight: Weight, bias: jax.Array | None = None, out_dtype: jnp.dtype | None = None
) -> jax.Array:
    """`x @ weight.T (+ bias)` for weights stored `[out_features, in_features]`.

    Accumulates in float32; the result is `out_dtype` (default: x's dtype).
    """
    if isinstance(weight, QTensor):
        # Dequantize inside the compiled step: weights stay packed in device memory.
        weight = dequantize(weight, x.dtype)
    y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=jnp.float32)
    y = y.astype(out_dtype or x.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def embed(table: Weight, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows `ids` of an embedding table (dense or packed)."""
    if isinstance(table, QTensor):
        return dequantize(table.gather_rows(ids), dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)
