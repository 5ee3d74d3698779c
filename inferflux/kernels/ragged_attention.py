"""Pallas (Triton) paged attention for ragged GPU steps: prefill chunks and decode tokens together.

The decode kernel (`paged_attention.paged_attention_decode_pallas`) takes one query token per
slot. A step with prompt chunks used to fall back to the reference on GPU, whose per-block page
gathers made a 2,048-token prefill take ~1 s on an H200 (docs/runtime.md). This kernel covers any
ragged step, so no GPU step goes through the reference.

Layout (the runner's, `engine/model_runner.py` `_pack`): a slot's tokens are contiguous in the
step, slots in order, consecutive positions within a slot, padding (position -1) at the end.

Work split: each slot's tokens are cut into query blocks of `block_q` rows; the grid is
(query block, query head). The number of blocks is dynamic, so the grid has the static upper bound
`cdiv(T, block_q) + S` (every slot adds at most one partial block) and the spare programs find
zero rows and return at once. `_schedule` computes, in plain `jax.numpy` inside the same jit, each
block's slot, first token and row count. A program loads its rows' queries, walks its slot's
pages `pages_per_block` at a time up to the block's last position (causal: a chunk's later tokens
see its earlier ones through the cache, which `write_kv` filled first), with an online softmax in
float32, and stores only its own rows (masked stores: programs share the output array).

Why Triton (`jax.experimental.pallas.triton`) rather than Mosaic GPU: the JAX this project pins
(0.10.x) lowers Triton-style Pallas kernels for every NVIDIA GPU from Ampere on, and the same
kernel runs in Pallas' interpreter on CPU (the tests) and cross-lowers for CUDA on a CPU host;
Mosaic GPU targets Hopper/Blackwell only and has no interpreter path. When the Triton lowering is
removed (deprecated in JAX 0.11) the kernel body ports over with the same schedule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NULL_PAGE = 0
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

__all__ = ["paged_attention_ragged_pallas", "ragged_supported", "schedule"]


def ragged_supported(head_dim: int, page_size: int) -> bool:
    """Triton needs power-of-two tensor sizes and `tl.dot` dims >= 16 (pages are grouped to >= 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and page_size > 0 and page_size & (page_size - 1) == 0


def default_block_q(num_tokens: int) -> int:
    """Query rows per program: 64 for prefill-sized steps, 16 (tl.dot's minimum) for small ones."""
    return 64 if num_tokens >= 256 else 16


def schedule(token_seq: jax.Array, token_pos: jax.Array, num_seqs: int, block_q: int) -> tuple[jax.Array, ...]:
    """Per query block: (slot, first token index, row count, first position); spare blocks have 0 rows.

    Relies on the runner's layout: slot i's tokens are contiguous and come before slot i+1's.
    """
    num_tokens = token_seq.shape[0]
    valid = token_pos >= 0
    seq = jnp.where(valid, token_seq, num_seqs)  # padding counts for a dropped extra slot
    counts = jnp.zeros(num_seqs + 1, jnp.int32).at[seq].add(1)[:num_seqs]
    starts = jnp.cumsum(counts) - counts
    first_pos = jnp.full(num_seqs + 1, jnp.iinfo(jnp.int32).max, jnp.int32).at[seq].min(token_pos)[:num_seqs]
    blocks = (counts + block_q - 1) // block_q
    ends = jnp.cumsum(blocks)  # block b belongs to the first slot whose end exceeds b
    num_blocks = pl.cdiv(num_tokens, block_q) + num_seqs
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    slot = jnp.minimum(jnp.searchsorted(ends, b, side="right").astype(jnp.int32), num_seqs - 1)
    local = b - (ends[slot] - blocks[slot])
    rows = jnp.where(b < ends[-1], jnp.clip(counts[slot] - local * block_q, 0, block_q), 0)
    tok0 = jnp.where(rows > 0, starts[slot] + local * block_q, 0)
    pos0 = jnp.where(rows > 0, first_pos[slot] + local * block_q, 0)
    return slot, tok0.astype(jnp.int32), rows.astype(jnp.int32), pos0.astype(jnp.int32)


def _kernel(slot_ref, tok0_ref, rows_ref, pos0_ref,  # [G] int32 each, whole
            tables_ref,  # [S, P_pad] int32, whole
            q_ref,  # [T_pad, head_dim]: this query head's column of q
            k_ref, v_ref,  # [num_pages, page_size, head_dim]: this head's kv head
            o_ref,  # [T_pad, head_dim]
            *, scale: float, block_q: int, pages_per_block: int, sliding_window: int | None) -> None:
    g = pl.program_id(0)
    rows = rows_ref[g]

    @pl.when(rows > 0)
    def _() -> None:
        slot, tok0, pos0 = slot_ref[g], tok0_ref[g], pos0_ref[g]
        head_dim = q_ref.shape[-1]
        page_size = k_ref.shape[1]
        block_len = pages_per_block * page_size
        num_blocks = tables_ref.shape[1] // pages_per_block
        row_ok = jnp.arange(block_q, dtype=jnp.int32) < rows
        q = plgpu.load(q_ref.at[pl.ds(tok0, block_q), :], mask=row_ok[:, None], other=0.0)
        q_pos = pos0 + jnp.arange(block_q, dtype=jnp.int32)  # [block_q]
        last = pos0 + rows - 1
        hi = jnp.minimum((last + block_len) // block_len, num_blocks)
        lo = 0 if sliding_window is None else jnp.minimum(jnp.maximum(pos0 - sliding_window + 1, 0) // block_len, hi)
        precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

        def body(b, carry):
            out, row_max, row_sum = carry
            pages = tables_ref[slot, pl.ds(b * pages_per_block, pages_per_block)]
            k = k_ref[pages].reshape(block_len, head_dim)
            v = v_ref[pages].reshape(block_len, head_dim)
            k_pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)
            page_ok = jnp.broadcast_to(pages[:, None] != NULL_PAGE, (pages_per_block, page_size)).reshape(block_len)
            valid = (k_pos[None, :] <= q_pos[:, None]) & page_ok[None, :] & row_ok[:, None]
            if sliding_window is not None:
                valid &= k_pos[None, :] > q_pos[:, None] - sliding_window
            logits = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [block_q, block_len] f32
            logits = jnp.where(valid, logits, _MASK_VALUE)
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
            correction = jnp.exp(row_max - new_max)
            probs = jnp.where(valid, jnp.exp(logits - new_max[:, None]), 0.0)
            # Zero every value no row of the block may see (0 * a stale NaN would still be NaN).
            seen = page_ok & (k_pos <= last)
            if sliding_window is not None:
                seen &= k_pos > pos0 - sliding_window
            v = jnp.where(seen[:, None], v, jnp.zeros_like(v))
            out = correction[:, None] * out + plgpu.dot(probs.astype(v.dtype), v, precision=precision)
            row_sum = correction * row_sum + jnp.sum(probs, axis=1)
            return out, new_max, row_sum

        init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), _MASK_VALUE, jnp.float32),
                jnp.zeros((block_q,), jnp.float32))
        out, _, row_sum = lax.fori_loop(lo, hi, body, init)
        out = out / jnp.where(row_sum == 0, 1.0, row_sum)[:, None]
        plgpu.store(o_ref.at[pl.ds(tok0, block_q), :], out.astype(o_ref.dtype), mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "block_q", "pages_per_block", "num_warps",
                                              "num_stages", "interpret"))
def paged_attention_ragged_pallas(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, token_seq: jax.Array,
    token_pos: jax.Array, *, scale: float, sliding_window: int | None = None, block_q: int | None = None,
    pages_per_block: int | None = None, num_warps: int = 4, num_stages: int = 2, interpret: bool = False,
) -> jax.Array:
    """Causal attention of a ragged step over the paged cache; arguments as `paged_attention_reference`.

    `block_q` query rows per program (default `default_block_q(T)`); `pages_per_block` pages per inner
    iteration (default ~64 positions, at least 16). `interpret=True` runs Pallas' interpreter (CPU).
    Padding rows come back as zeros.
    """
    num_tokens, num_heads, head_dim = q.shape
    kvh, num_pages, page_size, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    if num_heads % kvh:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kvh}")
    group = num_heads // kvh
    block_q = block_q or default_block_q(num_tokens)
    if pages_per_block is None:
        pages_per_block = max(min(64 // page_size, pl.next_power_of_2(pages_per_seq)), pl.cdiv(16, page_size))
    padded_pages = pl.cdiv(pages_per_seq, pages_per_block) * pages_per_block
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, padded_pages - pages_per_seq)))
    token_pos = token_pos.astype(jnp.int32)
    slot, tok0, rows, pos0 = schedule(token_seq.astype(jnp.int32), token_pos, num_seqs, block_q)
    padded_tokens = pl.next_power_of_2(num_tokens + block_q)  # a block's rows never run off the end
    qp = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))

    kernel = functools.partial(_kernel, scale=scale, block_q=block_q, pages_per_block=pages_per_block,
                               sliding_window=sliding_window)
    whole = pl.BlockSpec(slot.shape, lambda g, h: (0,))
    out = pl.pallas_call(
        kernel,
        grid=(slot.shape[0], num_heads),
        in_specs=[
            whole, whole, whole, whole,
            pl.BlockSpec((num_seqs, padded_pages), lambda g, h: (0, 0)),
            pl.BlockSpec((padded_tokens, None, head_dim), lambda g, h: (0, h, 0)),
            pl.BlockSpec((None, num_pages, page_size, head_dim), lambda g, h: (h // group, 0, 0, 0)),
            pl.BlockSpec((None, num_pages, page_size, head_dim), lambda g, h: (h // group, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((padded_tokens, None, head_dim), lambda g, h: (0, h, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="inferflux_paged_ragged",
    )(slot, tok0, rows, pos0, tables, qp, k_pages, v_pages)
    out = out[:num_tokens]
    # Rows no program wrote (padding) hold whatever the buffer held: make them the reference's zeros.
    return jnp.where((token_pos >= 0)[:, None, None], out, jnp.zeros_like(out))
