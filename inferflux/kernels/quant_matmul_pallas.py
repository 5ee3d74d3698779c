"""A fused dequantizing matmul in Pallas (Triton) for packed GGUF weights on GPU: `x @ dequant(W).T`.

Before this, a `QTensor` weight on GPU went through `formats.quants.dequantize` inside the step, and
XLA materialized a bfloat16 copy of the whole matrix before the dot: Q4_K decode read ~4x the bytes
it stores and ran slower than plain bf16 (docs/runtime.md has the H200 figures). Here each program
reads its weight tile as stored (quant bytes, f16-widened scales, int8 sub-block scales), unpacks it
in registers to the compute dtype, and feeds `tl.dot` with f32 accumulation: the weights are read
once and never written back.

Grid: (row blocks of x, column blocks of W). A program loops over K in tiles of whole (super-)blocks
and accumulates `[block_m, block_n]` in float32. Unpacking uses only broadcasts, shifts and reshapes
that keep GGUF's value order (no gathers), which is what Triton's lowering takes:

- Q8_0 (32 values, int8 q): `d * q`.
- Q4_0 (32 values, 16 bytes): byte j holds values j (low nibble) and j + 16 (high): the bytes
  broadcast over the nibble axis give `[.., 2, 16]` in value order; `d * (q - 8)`.
- Q4_K (256 values: 4 groups of 32 bytes, each the low nibbles of 32 values then the high ones;
  8 sub-blocks of 32 with 6-bit scale and min): `[.., 4, 2, 32]` in value order, sub-block
  `2 * group + nibble`; `d * sc * q - dmin * m`.
- Q6_K (256 values: 128 bytes of low 4 bits in 2 halves of 64, 64 bytes of high 2 bits in 2 halves
  of 32, 16 sub-blocks of 16 with int8 scales): value `128 h + 32 (2 a + b) + j` is nibble `a` of
  `ql[64 h + 32 b + j]` with bits `2 (2 a + b)` of `qh[32 h + j]`: `[.., 2, 2, 2, 32]` is value
  order; `d * sc * (q - 32)`.

Tested in Pallas' interpreter against `gguf.quants.dequantize(W) @ x` and cross-lowered for CUDA
(tests/test_quant_matmul_pallas.py); `kernels/quant_matmul.linear` selects it on GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from gguf import GGMLQuantizationType as T
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from inferflux.formats.quants import QTensor

FUSED_TYPES = (T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K)
_FIELDS = {T.Q8_0: ("qs", "d"), T.Q4_0: ("qs", "d"), T.Q4_K: ("qs", "d", "dmin", "scales", "mins"),
           T.Q6_K: ("qs", "qh", "d", "scales")}

__all__ = ["FUSED_TYPES", "fused_supported", "qmatmul_pallas"]


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def fused_supported(w: QTensor) -> bool:
    """Types with a fused kernel, on 2-D weights whose rows split into >= 16-row tiles."""
    return w.qtype in FUSED_TYPES and len(w.shape) == 2 and _pow2_divisor(w.shape[0], 64) >= 16


def _tile_values(qtype: T, f: dict[str, jax.Array], dtype: jnp.dtype) -> jax.Array:
    """One weight tile's values `[block_n, blocks * block_size]` in GGUF's order, in `dtype`."""
    qs = f["qs"]
    bn, nb = qs.shape[0], qs.shape[1]
    d = f["d"].astype(jnp.float32)[:, :, None]
    if qtype == T.Q8_0:
        q = qs.astype(jnp.int32)
        q = jnp.where(q >= 128, q - 256, q).astype(jnp.float32)  # the bytes are int8
        return (d * q).astype(dtype).reshape(bn, nb * 32)
    if qtype == T.Q4_0:
        nib = lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1), 2) * 4
        q = ((qs.astype(jnp.int32)[:, :, None, :] >> nib) & 15) - 8  # [bn, nb, 2, 16]
        return (d[:, :, :, None] * q.astype(jnp.float32)).astype(dtype).reshape(bn, nb * 32)
    if qtype == T.Q4_K:
        nib = lax.broadcasted_iota(jnp.int32, (1, 1, 1, 2, 1), 3) * 4
        q = (qs.astype(jnp.int32).reshape(bn, nb, 4, 1, 32) >> nib) & 15  # [bn, nb, 4, 2, 32]
        sc = f["scales"].astype(jnp.float32).reshape(bn, nb, 4, 2, 1)
        mn = f["mins"].astype(jnp.float32).reshape(bn, nb, 4, 2, 1)
        dmin = f["dmin"].astype(jnp.float32)[:, :, None, None, None]
        w = (d[:, :, :, None, None] * sc) * q.astype(jnp.float32) - dmin * mn
        return w.astype(dtype).reshape(bn, nb * 256)
    if qtype == T.Q6_K:
        a = lax.broadcasted_iota(jnp.int32, (1, 1, 1, 2, 1, 1), 3)
        b = lax.broadcasted_iota(jnp.int32, (1, 1, 1, 1, 2, 1), 4)
        ql = f["qs"].astype(jnp.int32).reshape(bn, nb, 2, 1, 2, 32)
        qh = f["qh"].astype(jnp.int32).reshape(bn, nb, 2, 1, 1, 32)
        q = ((ql >> (4 * a)) & 15) | (((qh >> (2 * (2 * a + b))) & 3) << 4)  # [bn, nb, 2, 2, 2, 32]
        q = q.reshape(bn, nb, 2, 2, 2, 2, 16) - 32  # sub-blocks of 16
        sc = f["scales"].astype(jnp.float32).reshape(bn, nb, 2, 2, 2, 2, 1)
        w = (d.reshape(bn, nb, 1, 1, 1, 1, 1) * sc) * q.astype(jnp.float32)
        return w.astype(dtype).reshape(bn, nb * 256)
    raise AssertionError(qtype)


def _kernel(x_ref, *refs, qtype: T, names: tuple[str, ...], blocks_per_tile: int, block_size: int) -> None:
    """One (row block, column block): loop over K tiles, unpack, dot, accumulate in f32."""
    *w_refs, o_ref = refs
    num_tiles = w_refs[0].shape[1] // blocks_per_tile
    tile_k = blocks_per_tile * block_size
    dtype = x_ref.dtype
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def body(t, acc):
        fields = {name: ref[:, pl.ds(t * blocks_per_tile, blocks_per_tile)] for name, ref in zip(names, w_refs)}
        w = _tile_values(qtype, fields, dtype)  # [block_n, tile_k]
        x = x_ref[:, pl.ds(t * tile_k, tile_k)]
        return acc + plgpu.dot(x, w, trans_b=True, precision=precision)

    acc = lax.fori_loop(0, num_tiles, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "num_warps", "num_stages", "interpret"))
def qmatmul_pallas(x: jax.Array, w: QTensor, *, block_m: int | None = None, block_n: int | None = None,
                   num_warps: int = 4, num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """`x @ dequantize(w).T` in float32, `x` `[..., K]` (bf16 or f32), `w` a 2-D QTensor `[N, K]`.

    Rows of x are padded to the row block (16 for decode-sized batches, 64 above); the weight is read
    once per row block. The caller casts the float32 result.
    """
    if not fused_supported(w):
        raise ValueError(f"no fused Pallas matmul for {w.qtype.name} {w.shape}")
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    block_m = block_m or (16 if m <= 16 else 64)
    block_n = block_n or _pow2_divisor(n, 64)
    block_size = 32 if w.qtype in (T.Q8_0, T.Q4_0) else 256
    num_blocks = k // block_size
    blocks_per_tile = _pow2_divisor(num_blocks, max(1, 256 // block_size) * 2)
    m_pad = pl.cdiv(m, block_m) * block_m
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
    names = _FIELDS[w.qtype]
    arrays = [getattr(w, name) for name in names]
    specs = [pl.BlockSpec((block_n, *a.shape[1:]), lambda i, j, nd=a.ndim: (j,) + (0,) * (nd - 1)) for a in arrays]
    kernel = functools.partial(_kernel, qtype=w.qtype, names=names, blocks_per_tile=blocks_per_tile,
                               block_size=block_size)
    out = pl.pallas_call(
        kernel,
        grid=(m_pad // block_m, n // block_n),
        in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), *specs],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"inferflux_qmatmul_{w.qtype.name.lower()}",
    )(x2, *arrays)
    return out[:m].reshape(*lead, n)
