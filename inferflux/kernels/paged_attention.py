"""Attention over the paged KV cache, for ragged steps.

A ragged step holds T query tokens (a static, bucketed size): prefill chunks
of some sequences and single decode tokens of others, plus padding. Each
token carries its sequence slot (`token_seq`) and absolute position
(`token_pos`, -1 for padding). Per layer the cache is two arrays K and V
shaped `[num_kv_heads, num_pages, page_size, head_dim]`; slot s reads its
positions through `block_tables[s]` (position p lives at page
`block_tables[s, p // page_size]`, offset `p % page_size`).

Page 0 is the null page: padding tokens write there and it is never read as
context. Any position whose block-table entry is 0 is masked, so an empty
slot (all-zero row) or a padding token attends to nothing and returns zeros,
and garbage (even NaN) in page 0 cannot reach a real row.

The pieces:
- `write_kv`: scatter the step's K/V into their pages (in place when donated).
- `paged_attention_reference`: plain `jax.numpy`, any step shape. It is the
  CPU path where the kernel library is not built, the GPU path for steps with prefill, and the oracle
  the kernels are tested against. It loops over blocks of page columns with
  an online softmax, so memory is bounded by T x (a few pages), never by
  T x context.
- `paged_attention_decode_pallas`: a Pallas (Triton) GPU kernel for
  decode-only steps (one query token per slot).
- `ragged_attention.paged_attention_ragged_pallas`: a Pallas (Triton) GPU
  kernel for every other step (prefill chunks and decode tokens together).
- `kernels/cpu/attention.paged_attention_cpu`: a C++ XLA FFI handler for any
  ragged step on CPU (float32), reading the pages in place.
- `paged_attention` picks between them (`_select_impl`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "paged_attention",
    "paged_attention_decode_pallas",
    "paged_attention_reference",
    "pallas_decode_supported",
    "write_kv",
]

NULL_PAGE = 0
# INFERFLUX_ATTENTION=pallas-interpret: on a host without a GPU, run the GPU kernels through Pallas'
# interpreter (slow; for tests: the model's fidelity tests with the kernels in the step).
ATTENTION_ENV = "INFERFLUX_ATTENTION"

# The reference processes query-token x key-position pairs in blocks of at
# most this many (times heads x head_dim). A 512-token prefill chunk with
# 16-token pages gets one page per iteration; a 64-sequence decode step gets 8.
_REF_MAX_PAIRS_PER_BLOCK = 8192

# Finite "minus infinity": keeps exp(m_old - m_new) well defined when a whole
# block (or row) is masked, where -inf - -inf would give NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- write


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's keys and values into their cache slots.

    Args:
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]`.
      k, v: `[T, num_kv_heads, head_dim]`, the step's new keys/values.
      slot_mapping: `[T]` int32, `page_id * page_size + offset`; padding tokens
        point into page 0 (several may share a slot: which one wins does not
        matter, page 0 is never read).

    Returns the updated `(k_pages, v_pages)`. The pages are viewed as
    `[heads, num_pages * page_size, head_dim]` (a free reshape) and updated with
    one `.at[].set` each, so when the caller's jit donates the pages XLA
    updates them in place instead of copying the cache every step.
    """
    kvh, num_pages, page_size, head_dim = k_pages.shape

    def scatter(pages: jax.Array, new: jax.Array) -> jax.Array:
        flat = pages.reshape(kvh, num_pages * page_size, head_dim)
        new = jnp.swapaxes(new, 0, 1).astype(pages.dtype)  # [kvh, T, head_dim]
        flat = flat.at[:, slot_mapping].set(new)  # out-of-range slots are dropped
        return flat.reshape(pages.shape)

    return scatter(k_pages, k), scatter(v_pages, v)


# --------------------------------------------------------------------------- reference


def _ref_pages_per_block(num_tokens: int, page_size: int, pages_per_seq: int) -> int:
    """Largest power-of-two page count whose (tokens x positions) block fits the budget."""
    fit = max(1, _REF_MAX_PAIRS_PER_BLOCK // max(1, num_tokens * page_size))
    ppb = 1 << (fit.bit_length() - 1)
    return max(1, min(ppb, pl.next_power_of_2(pages_per_seq)))


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    token_seq: jax.Array,
    token_pos: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    pages_per_block: int | None = None,
) -> jax.Array:
    """Causal attention of a ragged step's tokens over the paged cache.

    Args:
      q: `[T, num_heads, head_dim]`.
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]`, already
        holding this step's K/V (call `write_kv` first: that is how tokens of
        a prefill chunk see each other).
      block_tables: `[S, P]` int32 page ids per sequence slot, 0 = unused.
      token_seq: `[T]` int32, each token's slot in `[0, S)`.
      token_pos: `[T]` int32, each token's absolute position; -1 for padding.
      scale: logit scale (usually `head_dim ** -0.5`).
      sliding_window: if set to w, a token at position t sees only positions
        `t - w < p <= t` (Mistral / Hugging Face convention).
      pages_per_block: page columns per loop iteration (default: as many as
        keep a block within `_REF_MAX_PAIRS_PER_BLOCK` token-position pairs).

    Returns `[T, num_heads, head_dim]` in q's dtype; rows that see nothing
    (padding) are exactly zero.

    Memory: the loop walks the block-table columns `pages_per_block` at a
    time; each iteration gathers `[kv_heads, T, pages_per_block * page_size,
    head_dim]` and folds it into running (max, sum, output) accumulators in
    float32 (flash-attention's online softmax). The loop's bounds are the
    columns that any token can see (up to the largest position, from the
    smallest window start), so short contexts in a large bucket cost little.
    """
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    num_tokens, num_heads, head_dim = q.shape
    kvh, _, page_size, _ = k_pages.shape
    _, pages_per_seq = block_tables.shape
    if num_heads % kvh:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kvh}")
    group = num_heads // kvh
    ppb = pages_per_block or _ref_pages_per_block(num_tokens, page_size, pages_per_seq)
    num_blocks = pl.cdiv(pages_per_seq, ppb)
    block_len = ppb * page_size

    # Per-token block-table rows, padded with the null page to whole blocks: [T, blocks*ppb].
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, num_blocks * ppb - pages_per_seq)))
    token_tables = jnp.take(tables, token_seq, axis=0, mode="clip")
    token_pos = token_pos.astype(jnp.int32)

    qf = q.astype(jnp.float32).reshape(num_tokens, kvh, group, head_dim) * scale

    def body(b: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        out, row_max, row_sum = carry
        pages = lax.dynamic_slice_in_dim(token_tables, b * ppb, ppb, axis=1)  # [T, ppb]
        k = k_pages[:, pages].reshape(kvh, num_tokens, block_len, head_dim)
        v = v_pages[:, pages].reshape(kvh, num_tokens, block_len, head_dim)
        pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)  # [n]
        valid = (pos[None, :] <= token_pos[:, None]) & (jnp.repeat(pages, page_size, axis=1) != NULL_PAGE)
        if sliding_window is not None:
            valid &= pos[None, :] > token_pos[:, None] - sliding_window
        valid4 = valid[:, None, None, :]  # [T, 1, 1, n]

        logits = jnp.einsum("tkgd,ktnd->tkgn", qf, k.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        logits = jnp.where(valid4, logits, _MASK_VALUE)
        new_max = jnp.maximum(row_max, logits.max(axis=-1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.where(valid4, jnp.exp(logits - new_max[..., None]), 0.0)
        # Zero masked values too: 0 * NaN from a stale or null slot would still be NaN.
        v = jnp.where(valid[None, :, :, None], v.astype(jnp.float32), 0.0)
        out = correction[..., None] * out + jnp.einsum(
            "tkgn,ktnd->tkgd", probs, v, precision=lax.Precision.HIGHEST
        )
        row_sum = correction * row_sum + probs.sum(axis=-1)
        return out, new_max, row_sum

    # Only the block columns that some token can see.
    last = jnp.max(token_pos)
    hi = jnp.clip((last + block_len) // block_len, 0, num_blocks)
    if sliding_window is None:
        lo = jnp.int32(0)
    else:
        first = jnp.min(jnp.where(token_pos >= 0, token_pos - sliding_window + 1, jnp.iinfo(jnp.int32).max))
        lo = jnp.minimum(jnp.maximum(first, 0) // block_len, hi)

    init = (
        jnp.zeros((num_tokens, kvh, group, head_dim), jnp.float32),
        jnp.full((num_tokens, kvh, group), _MASK_VALUE, jnp.float32),
        jnp.zeros((num_tokens, kvh, group), jnp.float32),
    )
    out, _, row_sum = lax.fori_loop(lo, hi, body, init)
    # Rows that saw nothing have out == 0 and row_sum == 0: divide by 1 to keep them zero.
    # (A NaN that reached a real row stays visible rather than being zeroed.)
    out = out / jnp.where(row_sum == 0, 1.0, row_sum)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


# --------------------------------------------------------------------------- Pallas decode


def pallas_decode_supported(head_dim: int, page_size: int) -> bool:
    """Whether the Triton decode kernel can take these shapes.

    Triton tensors must have power-of-two sizes and `tl.dot` needs every
    dimension >= 16; query heads are padded to 16 and pages are grouped to at
    least 16 positions inside the kernel, so only head_dim and page_size matter.
    """
    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return pow2(head_dim) and head_dim >= 16 and pow2(page_size)


def _decode_kernel(
    lens_ref,  # [S] int32, whole array
    tables_ref,  # [P_pad] int32, this slot's row
    q_ref,  # [block_h, head_dim], this (slot, kv head)'s query heads, padded
    k_ref,  # [num_pages, page_size, head_dim], this kv head's pages
    v_ref,  # [num_pages, page_size, head_dim]
    o_ref,  # [block_h, head_dim]
    *,
    scale: float,
    pages_per_block: int,
    sliding_window: int | None,
):
    """One (sequence, kv head): loop over its pages with an online softmax.

    All query heads of the KV group are processed together, so each K/V page
    is read from memory once per group rather than once per query head.
    """
    block_h, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_len = pages_per_block * page_size
    num_blocks = tables_ref.shape[0] // pages_per_block

    ctx = lens_ref[pl.program_id(0)]
    hi = jnp.minimum(pl.cdiv(ctx, block_len), num_blocks)
    lo: Any = 0 if sliding_window is None else jnp.minimum(jnp.maximum(ctx - sliding_window, 0) // block_len, hi)
    q = q_ref[...]
    # float32 caches get true float32 products: Triton (and XLA:GPU in interpret mode) would otherwise use
    # TF32, ~1e-3 off. bfloat16 inputs are exact in any mode, so they keep the default.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(b, carry):
        out, row_max, row_sum = carry
        pages = tables_ref[pl.ds(b * pages_per_block, pages_per_block)]  # [ppb]
        k = k_ref[pages].reshape(block_len, head_dim)
        v = v_ref[pages].reshape(block_len, head_dim)
        pos = b * block_len + jnp.arange(block_len, dtype=jnp.int32)
        page_ok = jnp.broadcast_to(pages[:, None] != NULL_PAGE, (pages_per_block, page_size)).reshape(block_len)
        valid = (pos < ctx) & page_ok
        if sliding_window is not None:
            valid &= pos >= ctx - sliding_window
        logits = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [block_h, block_len] f32
        logits = jnp.where(valid[None, :], logits, _MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.where(valid[None, :], jnp.exp(logits - new_max[:, None]), 0.0)
        v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
        out = correction[:, None] * out + plgpu.dot(probs.astype(v.dtype), v, precision=precision)
        row_sum = correction * row_sum + jnp.sum(probs, axis=1)
        return out, new_max, row_sum

    init = (
        jnp.zeros((block_h, head_dim), jnp.float32),
        jnp.full((block_h,), _MASK_VALUE, jnp.float32),
        jnp.zeros((block_h,), jnp.float32),
    )
    out, _, row_sum = lax.fori_loop(lo, hi, body, init)
    # Empty rows (nothing visible) have out == 0 and row_sum == 0 and stay zero.
    out = out / jnp.where(row_sum == 0, 1.0, row_sum)[:, None]
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "pages_per_block", "num_warps", "num_stages", "interpret"),
)
def paged_attention_decode_pallas(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention (one query token per sequence slot) as a Pallas GPU kernel.

    Args:
      q: `[S, num_heads, head_dim]`, slot s's query token.
      k_pages, v_pages: `[num_kv_heads, num_pages, page_size, head_dim]`.
      block_tables: `[S, P]` int32 page ids (0 = unused / null page).
      context_lens: `[S]` int32, tokens slot s attends to (its position + 1;
        0 for an empty slot, whose output is zeros).
      scale: logit scale.
      sliding_window: as in `paged_attention_reference` (sees the last w tokens).
      pages_per_block: pages per inner iteration (default: 128 positions, at
        least 16 so `tl.dot` has a legal shape).
      num_warps, num_stages: Triton launch parameters.
      interpret: run the kernel through Pallas' interpreter (CPU tests).

    Grid: (slot, kv head). Each program loads its group's query heads (padded
    to 16 rows for `tl.dot`), walks the slot's pages `pages_per_block` at a
    time up to `context_len`, and keeps an online softmax in float32. There is
    no split over the sequence axis (flash-decoding), so a step with very few
    sequences and very long contexts under-fills the GPU.
    """
    num_seqs, num_heads, head_dim = q.shape
    kvh, num_pages, page_size, _ = k_pages.shape
    _, pages_per_seq = block_tables.shape
    if num_heads % kvh:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kvh}")
    group = num_heads // kvh
    block_h = max(16, pl.next_power_of_2(group))
    if pages_per_block is None:
        # ~128 positions per iteration, not far beyond the table, at least 16 (tl.dot's minimum).
        pages_per_block = max(min(128 // page_size, pl.next_power_of_2(pages_per_seq)), pl.cdiv(16, page_size))
    padded_pages = pl.cdiv(pages_per_seq, pages_per_block) * pages_per_block

    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, padded_pages - pages_per_seq)))
    q4 = q.reshape(num_seqs, kvh, group, head_dim)
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, block_h - group), (0, 0)))

    kernel = functools.partial(
        _decode_kernel, scale=scale, pages_per_block=pages_per_block, sliding_window=sliding_window
    )
    out = pl.pallas_call(
        kernel,
        grid=(num_seqs, kvh),
        in_specs=[
            pl.BlockSpec((num_seqs,), lambda s, h: (0,)),  # context_lens, whole
            pl.BlockSpec((None, padded_pages), lambda s, h: (s, 0)),  # block table row
            pl.BlockSpec((None, None, block_h, head_dim), lambda s, h: (s, h, 0, 0)),  # q
            pl.BlockSpec((None, num_pages, page_size, head_dim), lambda s, h: (h, 0, 0, 0)),  # k
            pl.BlockSpec((None, num_pages, page_size, head_dim), lambda s, h: (h, 0, 0, 0)),  # v
        ],
        out_specs=pl.BlockSpec((None, None, block_h, head_dim), lambda s, h: (s, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="inferflux_paged_decode",
    )(context_lens.astype(jnp.int32), tables, q4, k_pages, v_pages)
    return out[:, :, :group].reshape(num_seqs, num_heads, head_dim)


# --------------------------------------------------------------------------- dispatch


def _select_impl(*, decode_only: bool, head_dim: int, page_size: int, backend: str | None = None,
                 dtype: jnp.dtype | None = None) -> str:
    """The one place that chooses the attention implementation: "pallas_decode", "pallas_ragged", "cpu" or
    "reference".

    On GPU, decode-only steps take the decode kernel and every other step the ragged kernel
    (kernels/ragged_attention.py), so prefill never goes through the reference there.

    "cpu" is the C++ FFI handler (kernels/cpu/attention.py), for every float32 step on the CPU backend when
    the kernel library is loaded (not switched off with INFERFLUX_CPU_KERNELS=off).
    """
    backend = backend or jax.default_backend()
    if os.environ.get(ATTENTION_ENV) == "pallas-interpret":
        backend = "gpu"  # the GPU kernels' choice, run by Pallas' interpreter (`paged_attention` passes interpret)
    if decode_only and backend == "gpu" and pallas_decode_supported(head_dim, page_size):
        return "pallas_decode"
    if backend == "gpu" and not decode_only:
        from inferflux.kernels.ragged_attention import ragged_supported

        if ragged_supported(head_dim, page_size):
            return "pallas_ragged"
    if backend == "cpu":
        from inferflux.kernels.cpu import attention as cpu_attention

        if cpu_attention.supported(dtype):
            return "cpu"
    return "reference"


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    token_seq: jax.Array,
    token_pos: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    decode_only: bool = False,
) -> jax.Array:
    """Attention for one ragged step: arguments as in `paged_attention_reference`.

    `decode_only` is a static promise from the caller that every token is a
    single decode token and token t belongs to slot t (T == S, `token_seq`
    is ignored); on GPU such steps run the Pallas decode kernel and every
    other step the Pallas ragged kernel (power-of-two head_dim >= 16 and
    page size). On CPU every float32 step runs the C++ FFI handler when the
    kernel library is loaded. Everything else runs the reference.
    """
    # The CPU kernel takes float32 only: a step whose query or cache is anything else keeps the reference
    # (converting a bfloat16 cache to float32 every layer would copy it).
    kinds = [jnp.dtype(a.dtype) for a in (q, k_pages, v_pages)]
    impl = _select_impl(decode_only=decode_only, head_dim=q.shape[-1], page_size=k_pages.shape[2],
                        dtype=next((d for d in kinds if d != jnp.float32), kinds[0]))
    interpret = jax.default_backend() != "gpu"  # only INFERFLUX_ATTENTION=pallas-interpret gets here off a GPU
    if impl == "cpu":
        from inferflux.kernels.cpu.attention import paged_attention_cpu

        return paged_attention_cpu(q, k_pages, v_pages, block_tables, token_seq, token_pos, scale=scale,
                                   sliding_window=sliding_window)
    if impl == "pallas_decode":
        if q.shape[0] != block_tables.shape[0]:
            raise ValueError(f"decode_only needs T == S, got T={q.shape[0]}, S={block_tables.shape[0]}")
        context_lens = jnp.maximum(token_pos.astype(jnp.int32) + 1, 0)
        return paged_attention_decode_pallas(
            q, k_pages, v_pages, block_tables, context_lens, scale=scale, sliding_window=sliding_window,
            interpret=interpret,
        )
    if impl == "pallas_ragged":
        from inferflux.kernels.ragged_attention import paged_attention_ragged_pallas

        return paged_attention_ragged_pallas(q, k_pages, v_pages, block_tables, token_seq, token_pos, scale=scale,
                                             sliding_window=sliding_window, interpret=interpret)
    return paged_attention_reference(
        q, k_pages, v_pages, block_tables, token_seq, token_pos, scale=scale, sliding_window=sliding_window
    )
