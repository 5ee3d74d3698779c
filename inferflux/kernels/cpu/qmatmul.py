"""Quantized matmul on raw GGUF blocks (`inferflux_qmatmul_v2`), and the weight type it reads.

`GGUFBlocks` is a matrix exactly as the GGUF file stores it: `uint8[rows, row_bytes]` of GGML blocks, with
the type and logical shape as static pytree data, so it passes through `jax.jit` and `nnx` state like any
array. `qmatmul(x, w)` computes `x @ dequantize(w).T` in the C++ kernel: x is quantized per block to int8
inside the kernel (as ggml does), the weight blocks are never expanded in memory. Its results are bitwise
independent of the batch size, of a row's position in the batch and of the thread count
(docs/runtime.md, "CPU kernels"; tests/test_cpu_kernels.py has the bit-exact numpy reference).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from inferflux.formats import quants
from inferflux.kernels import cpu

_T = gguf.GGMLQuantizationType
QMATMUL_TARGET = "inferflux_qmatmul_v2"

#: GGML types with an integer kernel (every type common Q4_K_M/Q5_K_M/Q6_K/Q8_0/Q4_0 files use).
KERNEL_TYPES: frozenset[gguf.GGMLQuantizationType] = frozenset(
    {_T.Q4_0, _T.Q8_0, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.IQ4_XS})


@partial(jax.tree_util.register_dataclass, data_fields=["raw"], meta_fields=["qtype", "shape", "mode"])
@dataclasses.dataclass(frozen=True)
class GGUFBlocks:
    """A GGUF-quantized matrix `[rows, cols]` kept as the file's bytes, `raw` uint8 `[rows, row_bytes]`.

    `mode` says how `linear` multiplies it: "int8" (the kernel: activations quantized per block, integer
    dots) or "exact" (the blocks dequantized to float32 inside the step, f32 products: slower, for checks).
    """

    raw: jax.Array
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, int]
    mode: str = "int8"

    def rows(self, ids: jax.Array) -> GGUFBlocks:
        """Rows `ids` (traced indices are fine); blocks run along a row, so this is exact."""
        return dataclasses.replace(self, raw=jnp.take(self.raw, ids, axis=0), shape=(int(ids.shape[0]),
                                                                                      self.shape[1]))


def supports(qtype: gguf.GGMLQuantizationType, cols: int) -> bool:
    """Whether the kernel handles a `[rows, cols]` matrix of this type."""
    return qtype in KERNEL_TYPES and cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def qmatmul(x: jax.Array, w: GGUFBlocks, isa: cpu.Isa = cpu.Isa.AUTO, rows: jax.Array | int | None = None
            ) -> jax.Array:
    """`x[..., K] @ W[N, K].T` in float32 via the FFI kernel; x is cast to float32 first.

    `rows`: only the first `rows` rows of x (flattened to 2-D) are computed, the others come back as zeros;
    default all, or inside `real_rows` the count it gives for x's row count.
    """
    return qmatmul_many(x, (w,), isa, rows)[0]


def qmatmul_many(x: jax.Array, ws: Sequence[GGUFBlocks], isa: cpu.Isa = cpu.Isa.AUTO,
                 rows: jax.Array | int | None = None) -> list[jax.Array]:
    """`qmatmul(x, w)` for each of `ws` in one kernel call: x is quantized once, and the weights' rows are
    shared out over the threads together (a 1.1B model's q|k|v 1.10-1.20x, gate|up 1.03-1.17x at 1-64
    rows, benchmarks/RESULTS.md), with no copy of the weights (they stay the file's pages)."""
    cpu.register(QMATMUL_TARGET)
    lead, k = x.shape[:-1], x.shape[-1]
    for w in ws:
        if k != w.shape[1]:
            raise ValueError(f"qmatmul: x has {k} features, the weight {w.shape[1]}")
    x2 = x.reshape(-1, k).astype(jnp.float32)
    if rows is None:
        padded = _REAL_ROWS.get()
        rows = padded[1] if padded is not None and padded[0] == x2.shape[0] else x2.shape[0]
    outs = jax.ffi.ffi_call(QMATMUL_TARGET, [jax.ShapeDtypeStruct((x2.shape[0], w.shape[0]), jnp.float32)
                                             for w in ws])(
        x2, jnp.asarray(rows, jnp.int32), *(w.raw for w in ws),
        qtypes=np.array([int(w.qtype) for w in ws], np.int64), isa=np.int64(int(isa)))
    return [out.reshape(*lead, w.shape[0]) for out, w in zip(outs, ws)]


# (row count of a step's token rows, traced count of the real ones) while a step is traced; see `real_rows`.
_REAL_ROWS: contextvars.ContextVar[tuple[int, jax.Array] | None] = contextvars.ContextVar("real_rows", default=None)


@contextlib.contextmanager
def real_rows(positions: jax.Array) -> Iterator[None]:
    """While tracing a step of these token `positions` (real tokens first, then padding at position -1 up to
    the bucket): every kernel matmul of that many rows computes only the real ones (zeros after).

    Why: a program is compiled per token bucket (powers of two), so a 5-token step runs in the 8-row program,
    and the kernel's time grows with rows (Q4_K 1.1B shape: M=5 ~0.46 ms, M=8 ~0.56 ms per matrix,
    benchmarks/RESULTS.md). The count is a traced value: one program serves every count in its bucket. A
    matmul of other rows of the same size is safe too: the sampled rows (the head's input) are a prefix no
    longer than the real tokens. Padding rows come out zero and stay finite through the layers.
    """
    token = _REAL_ROWS.set((positions.shape[0], jnp.sum(positions >= 0, dtype=jnp.int32)))
    try:
        yield
    finally:
        _REAL_ROWS.reset(token)


def dequantize_blocks(w: GGUFBlocks) -> jax.Array:
    """float32 values of `w` (jittable), bit-identical to `gguf.quants.dequantize` (formats/quants.py)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[w.qtype]
    rows, cols = w.shape
    blocks = w.raw.reshape(rows, cols // block_size, type_size)
    return quants._dequantize_blocks(w.qtype, blocks, (rows, cols))  # the jitted family decoders
