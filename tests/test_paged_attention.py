"""Paged attention: the jax.numpy reference against a dense float64 oracle, the
Pallas decode kernel (interpret mode) against the reference, and write_kv.

Caches are filled through shuffled (non-contiguous) page ids, and every slot
that is not valid context (page 0, unused page tails, unallocated pages) holds
NaN, so reading anything that should be masked shows up as a failure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inferflux.kernels import cpu as cpu_kernels
from inferflux.kernels.paged_attention import (
    _select_impl,
    paged_attention,
    paged_attention_decode_pallas,
    paged_attention_reference,
    write_kv,
)

HEAD_DIM = 16
PAGE_SIZE = 4
SCALE = HEAD_DIM**-0.5


def attention_dense_oracle(q, k_pages, v_pages, block_tables, token_seq, token_pos, *, scale, sliding_window=None):
    """Gather every position of each token's sequence, mask, softmax (float64 numpy).

    A position is visible when it is <= the token's position, inside the
    sliding window, and not mapped to the null page 0. Rows that see nothing
    are zeros.
    """
    q, k_pages, v_pages = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
    block_tables, token_seq, token_pos = (np.asarray(a) for a in (block_tables, token_seq, token_pos))
    num_tokens, num_heads, head_dim = q.shape
    kvh, _, page_size, _ = k_pages.shape
    group = num_heads // kvh
    pages = block_tables[token_seq]  # [T, P]
    context = pages.shape[1] * page_size
    k = k_pages[:, pages].reshape(kvh, num_tokens, context, head_dim)
    v = v_pages[:, pages].reshape(kvh, num_tokens, context, head_dim)
    pos = np.arange(context)
    mask = (pos[None] <= token_pos[:, None]) & (np.repeat(pages, page_size, axis=1) != 0)
    if sliding_window is not None:
        mask &= pos[None] > token_pos[:, None] - sliding_window
    k = np.where(mask[None, :, :, None], k, 0.0)
    v = np.where(mask[None, :, :, None], v, 0.0)
    logits = np.einsum("tkgd,ktnd->tkgn", q.reshape(num_tokens, kvh, group, head_dim) * scale, k)
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    out = np.zeros((num_tokens, kvh, group, head_dim))
    for t in np.flatnonzero(mask.any(axis=1)):
        w = np.exp(logits[t] - logits[t].max(axis=-1, keepdims=True))
        w /= w.sum(axis=-1, keepdims=True)
        out[t] = np.einsum("kgn,knd->kgd", w, v[:, t])
    return out.reshape(num_tokens, num_heads, head_dim)


def make_cache(
    rng, seq_lens, *, kv_heads, num_pages, pages_per_seq, page_size=PAGE_SIZE, head_dim=HEAD_DIM, fill=np.nan
):
    """Pages holding random K/V for `seq_lens[s]` tokens of each slot, allocated in shuffled order."""
    k_pages = np.full((kv_heads, num_pages, page_size, head_dim), fill, np.float32)
    v_pages = np.full_like(k_pages, fill)
    block_tables = np.zeros((len(seq_lens), pages_per_seq), np.int32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    for s, n in enumerate(seq_lens):
        for j in range(-(-n // page_size)):
            block_tables[s, j] = free.pop()
        for p in range(n):
            page, off = block_tables[s, p // page_size], p % page_size
            k_pages[:, page, off] = rng.standard_normal((kv_heads, head_dim))
            v_pages[:, page, off] = rng.standard_normal((kv_heads, head_dim))
    return k_pages, v_pages, block_tables


def ragged_step(rng, *, num_heads, kv_heads):
    """A 16-token step: slot 0 prefills positions 5..12 (5 already cached), slots 1-3
    decode at positions 16 (first slot of a new page), 0 and 15 (a full last page),
    slot 4 is empty; 5 padding tokens (position -1, or pointing at the empty slot).
    Token order is shuffled.
    """
    seq_lens = [13, 17, 1, 16, 0]
    k_pages, v_pages, block_tables = make_cache(rng, seq_lens, kv_heads=kv_heads, num_pages=24, pages_per_seq=5)
    token_seq = [0] * 8 + [1, 2, 3] + [0, 4, 4, 0, 2]
    token_pos = list(range(5, 13)) + [16, 0, 15] + [-1, 3, -1, -1, -1]
    order = rng.permutation(16)
    token_seq = np.asarray(token_seq, np.int32)[order]
    token_pos = np.asarray(token_pos, np.int32)[order]
    q = rng.standard_normal((16, num_heads, HEAD_DIM)).astype(np.float32)
    return q, k_pages, v_pages, block_tables, token_seq, token_pos


@pytest.mark.parametrize(
    "num_heads,kv_heads,window,pages_per_block",
    [(4, 2, None, None), (4, 2, 3, 1), (4, 1, 6, 2), (2, 2, None, 3), (4, 2, 5, 8)],
)
def test_reference_matches_dense_oracle(num_heads, kv_heads, window, pages_per_block):
    rng = np.random.default_rng(0)
    q, k_pages, v_pages, tables, token_seq, token_pos = ragged_step(rng, num_heads=num_heads, kv_heads=kv_heads)
    want = attention_dense_oracle(q, k_pages, v_pages, tables, token_seq, token_pos, scale=SCALE, sliding_window=window)
    fn = jax.jit(
        lambda *a: paged_attention_reference(*a, scale=SCALE, sliding_window=window, pages_per_block=pages_per_block)
    )
    got = np.asarray(fn(q, k_pages, v_pages, tables, token_seq, token_pos))
    assert got.shape == q.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Padding rows (position -1, or the empty slot 4) are exactly zero.
    padding = (token_pos < 0) | (token_seq == 4)
    assert not np.any(got[padding])
    assert np.all(np.abs(got[~padding]).sum(axis=(1, 2)) > 0)


def test_padding_rows_do_not_change_real_rows():
    rng = np.random.default_rng(1)
    q, k_pages, v_pages, tables, token_seq, token_pos = ragged_step(rng, num_heads=4, kv_heads=2)
    real = (token_pos >= 0) & (token_seq != 4)
    attend = jax.jit(lambda *a: paged_attention_reference(*a, scale=SCALE, sliding_window=6, pages_per_block=2))
    alone = np.asarray(attend(q[real], k_pages, v_pages, tables, token_seq[real], token_pos[real]))
    q_noisy = q.copy()
    q_noisy[~real] = 1e20  # enormous padding queries must not overflow into anything
    k_pages[:, 0], v_pages[:, 0] = 3.0, 7.0  # finite junk in the null page: read, it would show
    mixed = np.asarray(attend(q_noisy, k_pages, v_pages, tables, token_seq, token_pos))
    assert np.isfinite(mixed).all()
    np.testing.assert_allclose(mixed[real], alone, rtol=1e-6, atol=1e-6)
    assert not np.any(mixed[~real])


def test_write_kv_then_attend_sees_own_chunk_causally():
    """Step 2 writes a 5-token chunk of A (positions 3..7, across a page boundary) and
    a decode token of B, then attends: each chunk token must see the earlier ones of
    the same step. Padding writes must land in page 0 only."""
    rng = np.random.default_rng(2)
    kv_heads, num_heads, num_pages = 2, 4, 12
    tables = np.array([[7, 2, 0], [5, 9, 0]], np.int32)  # A: 8 tokens, B: 7 tokens
    logical_k = {0: rng.standard_normal((8, kv_heads, HEAD_DIM)), 1: rng.standard_normal((7, kv_heads, HEAD_DIM))}
    logical_v = {0: rng.standard_normal((8, kv_heads, HEAD_DIM)), 1: rng.standard_normal((7, kv_heads, HEAD_DIM))}

    def slot(seq, pos):
        return tables[seq, pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE

    def step(k_pages, v_pages, toks, pad=0):
        """Write (seq, pos) tokens plus `pad` padding tokens into page 0."""
        seqs = np.array([s for s, _ in toks] + [0] * pad, np.int32)
        pos = np.array([p for _, p in toks] + [-1] * pad, np.int32)
        k = np.stack([logical_k[s][p] for s, p in toks] + [rng.standard_normal((kv_heads, HEAD_DIM))] * pad)
        v = np.stack([logical_v[s][p] for s, p in toks] + [rng.standard_normal((kv_heads, HEAD_DIM))] * pad)
        slots = np.array([slot(s, p) for s, p in toks] + [1, 2, 1][:pad], np.int32)
        return write_kv(k_pages, v_pages, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), slots), seqs, pos

    zeros = jnp.zeros((kv_heads, num_pages, PAGE_SIZE, HEAD_DIM), jnp.float32)
    (k1, v1), _, _ = step(zeros, zeros, [(0, p) for p in range(3)] + [(1, p) for p in range(6)])
    (k2, v2), seqs, pos = step(k1, v1, [(0, p) for p in range(3, 8)] + [(1, 6)], pad=3)

    # Pages hold exactly the logical K/V; padding touched page 0 only.
    want_k = np.zeros(zeros.shape)
    for s, n in ((0, 8), (1, 7)):
        for p in range(n):
            want_k[:, tables[s, p // PAGE_SIZE], p % PAGE_SIZE] = logical_k[s][p]
    np.testing.assert_allclose(np.asarray(k2)[:, 1:], want_k[:, 1:].astype(np.float32), rtol=0, atol=0)
    assert np.any(np.asarray(k2)[:, 0]) and np.any(np.asarray(v2)[:, 0])

    q = rng.standard_normal((len(seqs), num_heads, HEAD_DIM)).astype(np.float32)
    got = np.asarray(paged_attention_reference(q, k2, v2, tables, seqs, pos, scale=SCALE))
    want = attention_dense_oracle(q, k2, v2, tables, seqs, pos, scale=SCALE)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Attending to the pages as they were before this step's write would differ:
    stale = attention_dense_oracle(q, k1, v1, tables, seqs, pos, scale=SCALE)
    assert np.abs(stale[:6] - got[:6]).max() > 1e-2


def test_write_kv_jit_with_donated_pages_updates_in_place():
    kv_heads, num_pages = 2, 6
    write = jax.jit(write_kv, donate_argnums=(0, 1))
    k_pages = jnp.zeros((kv_heads, num_pages, PAGE_SIZE, HEAD_DIM), jnp.float32)
    v_pages = jnp.ones_like(k_pages)
    k = jnp.arange(3 * kv_heads * HEAD_DIM, dtype=jnp.float32).reshape(3, kv_heads, HEAD_DIM)
    slots = jnp.array([3 * PAGE_SIZE + 1, 5 * PAGE_SIZE + 3, 0], jnp.int32)
    compiled = write.lower(k_pages, v_pages, k, -k, slots).compile()
    assert "input_output_alias" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < k_pages.nbytes  # no copy of the cache
    new_k, new_v = write(k_pages, v_pages, k, -k, slots)
    assert k_pages.is_deleted() and v_pages.is_deleted()
    new_k, new_v = np.asarray(new_k), np.asarray(new_v)
    np.testing.assert_array_equal(new_k[:, 3, 1], np.asarray(k[0]))
    np.testing.assert_array_equal(new_v[:, 5, 3], -np.asarray(k[1]))
    np.testing.assert_array_equal(new_k[:, 0, 0], np.asarray(k[2]))
    untouched = np.ones(new_k.shape, bool)
    untouched[:, 3, 1] = untouched[:, 5, 3] = untouched[:, 0, 0] = False
    assert not np.any(new_k[untouched]) and np.all(new_v[untouched] == 1)


def test_reference_memory_is_bounded_by_a_block_of_pages():
    """A 512-token chunk against 4096 positions must not materialize a [T, 4096, ...] gather."""
    tokens, kv_heads, pages_per_seq, page_size = 512, 2, 256, 16
    args = (
        jax.ShapeDtypeStruct((tokens, 4, HEAD_DIM), jnp.float32),
        jax.ShapeDtypeStruct((kv_heads, 300, page_size, HEAD_DIM), jnp.float32),
        jax.ShapeDtypeStruct((kv_heads, 300, page_size, HEAD_DIM), jnp.float32),
        jax.ShapeDtypeStruct((4, pages_per_seq), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )

    def temp_bytes(pages_per_block):
        fn = jax.jit(lambda *a: paged_attention_reference(*a, scale=SCALE, pages_per_block=pages_per_block))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    dense_gather = tokens * kv_heads * pages_per_seq * page_size * HEAD_DIM * 4  # 268 MB
    assert temp_bytes(None) < dense_gather // 16
    assert temp_bytes(pages_per_seq) >= dense_gather  # the measure does see a dense gather


def decode_step(rng, *, num_heads, kv_heads, context_lens, pages_per_seq=4, num_pages=20, **shape):
    k_pages, v_pages, tables = make_cache(
        rng, context_lens, kv_heads=kv_heads, num_pages=num_pages, pages_per_seq=pages_per_seq, **shape
    )
    q = rng.standard_normal((len(context_lens), num_heads, k_pages.shape[-1])).astype(np.float32)
    return q, k_pages, v_pages, tables, np.asarray(context_lens, np.int32)


@pytest.mark.parametrize(
    "num_heads,kv_heads,window,pages_per_block,dtype",
    [(8, 2, None, None, np.float32), (4, 1, 5, 1, np.float32), (4, 2, 6, 2, jnp.bfloat16)],
)
def test_pallas_decode_interpret_matches_reference(num_heads, kv_heads, window, pages_per_block, dtype):
    rng = np.random.default_rng(3)
    # Lengths 1, one full page, mid-page, full last page, an empty slot, 7, and a
    # padding slot with a length but an all-null block-table row (must read nothing).
    q, k_pages, v_pages, tables, lens = decode_step(
        rng, num_heads=num_heads, kv_heads=kv_heads, context_lens=[1, PAGE_SIZE, 9, 16, 0, 7, 3]
    )
    tables[6] = 0
    k_pages[:, 0], v_pages[:, 0] = 3.0, 7.0  # finite junk in the null page
    # bfloat16 (the GPU compute dtype): inputs rounded once, shared by kernel and oracles.
    q, k_pages, v_pages = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)) for a in (q, k_pages, v_pages))
    tol = 1e-5 if dtype == np.float32 else 2e-2
    got = np.asarray(
        paged_attention_decode_pallas(
            jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), tables, lens,
            scale=SCALE, sliding_window=window, pages_per_block=pages_per_block, interpret=True,
        ).astype(jnp.float32)
    )
    seqs = np.arange(len(lens), dtype=np.int32)
    ref = np.asarray(paged_attention_reference(q, k_pages, v_pages, tables, seqs, lens - 1, scale=SCALE,
                                               sliding_window=window))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    want = attention_dense_oracle(q, k_pages, v_pages, tables, seqs, lens - 1, scale=SCALE, sliding_window=window)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert not np.any(got[4]) and not np.any(got[6])


@pytest.mark.skipif(jax.default_backend() == "gpu",
                    reason="on a GPU host the kernel is compiled and run for real (test below) instead")
@pytest.mark.parametrize(
    "seqs,heads,kv_heads,head_dim,page_size,pages_per_seq,dtype,window",
    [(8, 32, 4, 64, 16, 64, jnp.bfloat16, None), (3, 12, 2, 128, 8, 5, jnp.bfloat16, 256),
     (2, 4, 4, 16, 4, 2, jnp.float32, None)],
)
def test_pallas_decode_lowers_to_triton(seqs, heads, kv_heads, head_dim, page_size, pages_per_seq, dtype, window):
    """Cross-lower for CUDA on this CPU host: Pallas' Triton lowering runs in Python, so
    unsupported ops or non-power-of-two tensors fail here. (Triton -> PTX and the
    numbers themselves still need a GPU run.)"""
    pages = jax.ShapeDtypeStruct((kv_heads, 40, page_size, head_dim), dtype)
    args = (
        jax.ShapeDtypeStruct((seqs, heads, head_dim), dtype), pages, pages,
        jax.ShapeDtypeStruct((seqs, pages_per_seq), jnp.int32), jax.ShapeDtypeStruct((seqs,), jnp.int32),
    )
    fn = jax.jit(lambda *a: paged_attention_decode_pallas(*a, scale=SCALE, sliding_window=window))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    assert f"grid_x = {seqs} : i32, grid_y = {kv_heads} : i32" in text


def test_dispatch_chooses_pallas_on_gpu():
    assert _select_impl(decode_only=True, head_dim=128, page_size=16, backend="gpu") == "pallas_decode"
    assert _select_impl(decode_only=False, head_dim=128, page_size=16, backend="gpu") == "pallas_ragged"
    on_cpu = "cpu" if cpu_kernels.available() else "reference"  # the C++ FFI handler where it is built
    assert _select_impl(decode_only=True, head_dim=128, page_size=16, backend="cpu") == on_cpu
    assert _select_impl(decode_only=True, head_dim=80, page_size=16, backend="gpu") == "reference"  # not a power of 2
    here = "pallas_decode" if jax.default_backend() == "gpu" else on_cpu
    assert _select_impl(decode_only=True, head_dim=HEAD_DIM, page_size=PAGE_SIZE) == here  # this host

    rng = np.random.default_rng(4)
    q, k_pages, v_pages, tables, lens = decode_step(rng, num_heads=4, kv_heads=2, context_lens=[3, 0, 16])
    seqs = np.arange(3, dtype=np.int32)
    got = paged_attention(q, k_pages, v_pages, tables, seqs, lens - 1, scale=SCALE, decode_only=True)
    want = attention_dense_oracle(q, k_pages, v_pages, tables, seqs, lens - 1, scale=SCALE)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernel; needs a GPU")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_pallas_decode_on_gpu_matches_reference(dtype, tol):
    """Run with JAX_PLATFORMS=cuda on a GPU host: the compiled kernel and the dispatcher."""
    rng = np.random.default_rng(5)
    q, k_pages, v_pages, tables, lens = decode_step(
        rng, num_heads=32, kv_heads=4, context_lens=[1, 16, 17, 0, 250, 256, 3, 100], pages_per_seq=16,
        num_pages=80, page_size=16, head_dim=128,
    )
    k_pages[:, 0], v_pages[:, 0] = 3.0, 7.0
    q, k_pages, v_pages = (jnp.asarray(a, dtype) for a in (q, k_pages, v_pages))
    seqs = jnp.arange(len(lens), dtype=jnp.int32)
    scale = 128**-0.5
    for window in (None, 64):
        want = np.asarray(paged_attention_reference(q, k_pages, v_pages, tables, seqs, lens - 1, scale=scale,
                                                    sliding_window=window).astype(jnp.float32))
        got = paged_attention_decode_pallas(q, k_pages, v_pages, tables, lens, scale=scale, sliding_window=window)
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol)
        via_dispatch = jax.jit(
            lambda *a, w=window: paged_attention(*a, scale=scale, sliding_window=w, decode_only=True)
        )(q, k_pages, v_pages, tables, seqs, lens - 1)
        np.testing.assert_allclose(np.asarray(via_dispatch.astype(jnp.float32)), want, rtol=tol, atol=tol)
