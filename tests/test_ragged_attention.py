"""The Pallas ragged paged-attention kernel (prefill chunks + decode tokens in one step), run in
Pallas' interpreter on CPU against the jax.numpy reference and the float64 dense oracle, and
cross-lowered for CUDA (the GPU run itself is in the GPU recipe: benchmarks/gpu_recipe.sh).

Steps use the runner's layout (engine/model_runner.py `_pack`): each slot's tokens contiguous, slots
in order, padding (position -1) at the end. Caches hold NaN wherever nothing valid was written, so a
kernel that reads a masked position fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inferflux.kernels.paged_attention import _select_impl, paged_attention, paged_attention_reference
from inferflux.kernels.ragged_attention import paged_attention_ragged_pallas, schedule
from tests.test_paged_attention import attention_dense_oracle, make_cache

HEAD_DIM = 16


def runner_step(rng, chunks, *, num_heads, kv_heads, page_size, num_tokens, pages_per_seq, num_pages=64):
    """chunks: per slot (positions already cached, new tokens this step); 0 new tokens = idle slot."""
    seq_lens = [cached + new for cached, new in chunks]
    k_pages, v_pages, tables = make_cache(rng, seq_lens, kv_heads=kv_heads, num_pages=num_pages,
                                          pages_per_seq=pages_per_seq, page_size=page_size)
    token_seq = np.zeros(num_tokens, np.int32)
    token_pos = np.full(num_tokens, -1, np.int32)
    offset = 0
    for s, (cached, new) in enumerate(chunks):
        token_seq[offset:offset + new] = s
        token_pos[offset:offset + new] = np.arange(cached, cached + new)
        offset += new
    assert offset <= num_tokens
    q = rng.standard_normal((num_tokens, num_heads, HEAD_DIM)).astype(np.float32)
    return q, k_pages, v_pages, tables, token_seq, token_pos


STEPS = {
    # a 37-token prompt from scratch, a 20-token continuation chunk, three decode tokens, an idle slot
    "mixed": ([(0, 37), (13, 20), (8, 1), (0, 1), (15, 1), (0, 0)], 64),
    # decode only, including a first token on a fresh page
    "decode": ([(16, 1), (3, 1), (31, 1)], 16),
    # one long chunk that fills the step exactly (no padding)
    "full": ([(5, 48)], 48),
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("num_heads,kv_heads,page_size,window,block_q,dtype", [
    (4, 2, 4, None, 16, np.float32), (4, 1, 8, 7, 16, np.float32), (2, 2, 16, None, 32, np.float32),
    (8, 2, 4, 12, None, jnp.bfloat16),
])
def test_ragged_kernel_interpret_matches_reference(step, num_heads, kv_heads, page_size, window, block_q, dtype):
    chunks, num_tokens = STEPS[step]
    rng = np.random.default_rng(7)
    q, k_pages, v_pages, tables, token_seq, token_pos = runner_step(
        rng, chunks, num_heads=num_heads, kv_heads=kv_heads, page_size=page_size, num_tokens=num_tokens,
        pages_per_seq=-(-64 // page_size))
    if dtype != np.float32:  # inputs rounded once, shared by kernel and oracles
        q, k_pages, v_pages = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)) for a in (q, k_pages, v_pages))
    tol = 1e-5 if dtype == np.float32 else 2e-2
    scale = HEAD_DIM ** -0.5
    got = paged_attention_ragged_pallas(jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
                                        tables, token_seq, token_pos, scale=scale, sliding_window=window,
                                        block_q=block_q, interpret=True)
    got = np.asarray(got.astype(jnp.float32))
    assert np.isfinite(got).all()
    ref = np.asarray(paged_attention_reference(q, k_pages, v_pages, tables, token_seq, token_pos, scale=scale,
                                               sliding_window=window))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    want = attention_dense_oracle(q, k_pages, v_pages, tables, token_seq, token_pos, scale=scale,
                                  sliding_window=window)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert not np.any(got[token_pos < 0])  # padding rows are zeros


def test_schedule_covers_every_token_once():
    token_seq = np.array([0] * 37 + [1] * 20 + [2, 3, 4] + [0] * 4, np.int32)
    token_pos = np.array(list(range(37)) + list(range(13, 33)) + [8, 0, 15] + [-1] * 4, np.int32)
    slot, tok0, rows, pos0 = (np.asarray(a) for a in schedule(jnp.asarray(token_seq), jnp.asarray(token_pos), 6, 16))
    covered = np.zeros(len(token_seq), int)
    for s, t, r, p in zip(slot, tok0, rows, pos0):
        if r:
            covered[t:t + r] += 1
            assert (token_seq[t:t + r] == s).all() and (token_pos[t:t + r] == np.arange(p, p + r)).all()
    assert (covered == (token_pos >= 0)).all()
    assert len(slot) == -(-len(token_seq) // 16) + 6  # the static grid bound
    assert (rows > 0).sum() == 3 + 2 + 3  # 37 -> 3 blocks, 20 -> 2, three decode tokens


def test_gpu_dispatch_uses_the_ragged_kernel_for_prefill():
    assert _select_impl(decode_only=False, head_dim=128, page_size=16, backend="gpu") == "pallas_ragged"
    assert _select_impl(decode_only=True, head_dim=128, page_size=16, backend="gpu") == "pallas_decode"
    assert _select_impl(decode_only=False, head_dim=80, page_size=16, backend="gpu") == "reference"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU host the kernel runs for real instead")
@pytest.mark.parametrize("tokens,seqs,heads,kv_heads,head_dim,page_size,dtype,window", [
    (512, 16, 32, 8, 128, 16, jnp.bfloat16, None), (64, 4, 8, 2, 64, 8, jnp.bfloat16, 256),
    (32, 3, 4, 4, 16, 4, jnp.float32, None),
])
def test_ragged_kernel_lowers_to_triton(tokens, seqs, heads, kv_heads, head_dim, page_size, dtype, window):
    """Cross-lower for CUDA on this CPU host: Pallas' Triton lowering runs in Python, so an unsupported op or
    a non-power-of-two tensor fails here (PTX and the numbers still need a GPU)."""
    pages = jax.ShapeDtypeStruct((kv_heads, 40, page_size, head_dim), dtype)
    ints = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    args = (jax.ShapeDtypeStruct((tokens, heads, head_dim), dtype), pages, pages,
            jax.ShapeDtypeStruct((seqs, 16), jnp.int32), ints, ints)
    fn = jax.jit(lambda *a: paged_attention_ragged_pallas(*a, scale=head_dim ** -0.5, sliding_window=window))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    block_q = 64 if tokens >= 256 else 16
    assert f"grid_x = {-(-tokens // block_q) + seqs} : i32, grid_y = {heads} : i32" in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernel; needs a GPU")
def test_ragged_kernel_on_gpu_matches_reference():
    rng = np.random.default_rng(8)
    chunks = [(0, 300), (100, 150), (40, 1), (7, 1), (0, 0)]
    q, k_pages, v_pages, tables, token_seq, token_pos = runner_step(
        rng, chunks, num_heads=8, kv_heads=2, page_size=16, num_tokens=512, pages_per_seq=32, num_pages=160)
    for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)):
        args = [jnp.asarray(a, dtype) for a in (q, k_pages, v_pages)] + [tables, token_seq, token_pos]
        want = np.asarray(paged_attention_reference(*args, scale=0.25).astype(jnp.float32))
        got = jax.jit(lambda *a: paged_attention(*a, scale=0.25))(*args)
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "mistral"])  # mistral: 4 query heads per KV head
def test_model_with_gpu_kernels_interpreted_matches_transformers(tiny_model, monkeypatch, name) -> None:
    """The whole model with the GPU attention kernels in its step (Pallas' interpreter on this CPU host):
    chunked prefill goes through the ragged kernel, decode through the decode kernel; greedy tokens equal
    transformers', alone and beside other prompts (mixed steps)."""
    from inferflux import SamplingParams
    from inferflux.kernels import ragged_attention
    from tests.test_runtime import PROMPT, effective_hf_model, hf_greedy, make_llm

    monkeypatch.setenv("INFERFLUX_ATTENTION", "pallas-interpret")
    traced = []  # the step really holds the kernel: count its traces (one per layer per compiled program)
    kernel = ragged_attention.paged_attention_ragged_pallas
    monkeypatch.setattr(ragged_attention, "paged_attention_ragged_pallas",
                        lambda *a, **k: traced.append(1) or kernel(*a, **k))
    folder = tiny_model(name)
    expected = hf_greedy(effective_hf_model(folder), PROMPT, 16)
    llm = make_llm(folder, max_num_batched_tokens=32)  # the 12-token prompt and its neighbours share steps
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    rng = np.random.default_rng(0)
    others = [[int(t) for t in rng.integers(1, 500, size=n)] for n in (21, 5, 40)]
    outs = llm.generate([others[0], PROMPT, *others[1:]], params)
    assert outs[1].outputs[0].token_ids == expected
    assert llm.generate([PROMPT], params)[0].outputs[0].token_ids == expected
    assert traced
