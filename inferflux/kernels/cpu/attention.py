"""Paged attention on CPU as a C++ FFI handler (`inferflux_paged_attention_v1`), for ragged steps.

`paged_attention_reference` (kernels/paged_attention.py) gathers every visible page into a fresh array on
each loop iteration; inside a whole decode step that gather (and XLA's handling of it) cost far more than
the arithmetic. This handler reads K/V pages in place through the block table, with the reference's exact
semantics (causal within a chunk, padding rows at position -1 return zeros, the null page and out-of-range
page ids masked, sliding window, GQA), an online softmax in float32, positions in the vector lanes
(AVX-512 path; AVX2 and scalar paths for other CPUs) and long contexts split into fixed 256-position
segments spread over XLA's intra-op pool. `paged_attention._select_impl` picks it on the CPU backend when
the library is loaded (docs/runtime.md, "CPU kernels").
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from inferflux.kernels import cpu

__all__ = ["ATTENTION_TARGET", "paged_attention_cpu", "supported"]

ATTENTION_TARGET = "inferflux_paged_attention_v1"
# `INFERFLUX_CPU_ATTENTION=off` keeps the jax.numpy reference for attention while the matmul kernels stay on
# (read when a step is traced): for before/after comparisons in one process (benchmarks/bench_cpu_step.py).
ATTENTION_SWITCH = "INFERFLUX_CPU_ATTENTION"


def supported(dtype: jnp.dtype | None = None) -> bool:
    """Whether the handler can run here for activations/caches of `dtype` (float32 only; default: yes if loaded)."""
    if os.environ.get(ATTENTION_SWITCH, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    return cpu.available() and (dtype is None or jnp.dtype(dtype) == jnp.float32)


def paged_attention_cpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    token_seq: jax.Array,
    token_pos: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    isa: cpu.Isa = cpu.Isa.AUTO,
) -> jax.Array:
    """`paged_attention_reference`'s arguments and result, computed by the FFI handler (float32).

    `isa` forces an instruction-set path (tests compare every path against the reference); a path this
    CPU lacks is an error at run time.
    """
    cpu.register(ATTENTION_TARGET)
    if k_pages.shape != v_pages.shape or k_pages.ndim != 4 or q.ndim != 3:
        raise ValueError(f"want q [T, H, D] and K/V pages [KVH, NP, PS, D], got {q.shape}, {k_pages.shape}, "
                         f"{v_pages.shape}")
    if q.shape[1] % k_pages.shape[0]:
        raise ValueError(f"num_heads={q.shape[1]} is not a multiple of num_kv_heads={k_pages.shape[0]}")
    f32 = jnp.float32
    out = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, f32))(
        q.astype(f32), k_pages.astype(f32), v_pages.astype(f32), block_tables.astype(jnp.int32),
        token_seq.astype(jnp.int32), token_pos.astype(jnp.int32),
        scale=np.float32(scale), sliding_window=np.int64(sliding_window or 0), isa=np.int64(int(isa)))
    return out.astype(q.dtype)
