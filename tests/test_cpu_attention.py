"""The CPU paged-attention FFI handler (kernels/cpu/attention.py) against `paged_attention_reference`.

Random ragged steps: prefill chunks and decode tokens together, padding rows, holes of null pages inside a
sequence's context, sliding windows, GQA ratios, page sizes, head sizes (including one the AVX-512 path does
not take), and contexts long enough to be split into segments. Every page slot that is not context holds
NaN, so reading anything masked shows up. Each instruction-set path this CPU has is checked on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inferflux.kernels import cpu
from inferflux.kernels.cpu.attention import paged_attention_cpu
from inferflux.kernels.paged_attention import _select_impl, paged_attention, paged_attention_reference

pytestmark = pytest.mark.skipif(cpu.switched_off(), reason="INFERFLUX_CPU_KERNELS=off")

ISAS = [cpu.Isa.SCALAR, cpu.Isa.AVX2, cpu.Isa.AVX512_VNNI]
TOL = dict(rtol=2e-5, atol=2e-5)


def test_library_is_loaded_and_selected_on_cpu():
    assert cpu.available(), cpu.unavailable_reason()
    assert _select_impl(decode_only=False, head_dim=64, page_size=16, backend="cpu", dtype=jnp.float32) == "cpu"
    assert _select_impl(decode_only=True, head_dim=64, page_size=16, backend="cpu", dtype=jnp.float32) == "cpu"
    # bfloat16 caches stay on the reference; GPU never takes the CPU handler (its steps take the Pallas kernels).
    assert _select_impl(decode_only=False, head_dim=64, page_size=16, backend="cpu",
                        dtype=jnp.bfloat16) == "reference"
    assert _select_impl(decode_only=False, head_dim=64, page_size=16, backend="gpu",
                        dtype=jnp.float32) == "pallas_ragged"


def random_step(rng, *, chunks, kv_heads, group, head_dim, page_size, pages_per_seq, holes=0.0, pad=3):
    """K/V pages (NaN wherever there is no context), block tables and the step's tokens.

    `chunks[s] = (start, n)`: slot s has `start` tokens cached and runs n more (n = 1: a decode token).
    A fraction `holes` of each sequence's pages is left as the null page 0.
    """
    need = sum(-(-(a + n) // page_size) for a, n in chunks)
    num_pages = need + 2
    shape = (kv_heads, num_pages, page_size, head_dim)
    k = np.full(shape, np.nan, np.float32)
    v = np.full(shape, np.nan, np.float32)
    tables = np.zeros((len(chunks), pages_per_seq), np.int32)
    free = list(rng.permutation(np.arange(1, num_pages)))
    seq, pos = [], []
    for s, (start, n) in enumerate(chunks):
        for c in range(-(-(start + n) // page_size)):
            page = free.pop()
            if rng.random() >= holes:
                tables[s, c] = page
            k[:, page] = rng.standard_normal((kv_heads, page_size, head_dim))
            v[:, page] = rng.standard_normal((kv_heads, page_size, head_dim))
        for p in range(start + n, -(-(start + n) // page_size) * page_size):  # past the end: not context
            page = tables[s, p // page_size]
            if page:
                k[:, page, p % page_size] = np.nan
                v[:, page, p % page_size] = np.nan
        seq += [s] * n
        pos += list(range(start, start + n))
    seq += [0] * pad
    pos += [-1] * pad
    order = rng.permutation(len(seq))
    q = rng.standard_normal((len(seq), kv_heads * group, head_dim)).astype(np.float32)
    return (q, k, v, tables, np.asarray(seq, np.int32)[order], np.asarray(pos, np.int32)[order])


def needs(isa: cpu.Isa) -> None:
    if isa > cpu.best_isa():
        pytest.skip(f"this CPU has no {isa.name} path")


CASES = [
    # (chunks, kv_heads, group, head_dim, page_size, window, holes)
    ([(5, 8), (16, 1), (0, 1), (15, 1)], 2, 2, 16, 4, None, 0.0),  # prefill + decode, page boundaries
    ([(0, 37), (100, 1), (3, 5)], 1, 8, 64, 16, None, 0.2),  # GQA 8, holes of null pages
    ([(40, 20), (63, 1)], 4, 1, 32, 8, 7, 0.0),  # MHA, sliding window inside a page
    ([(10, 30), (200, 1), (31, 1)], 2, 3, 128, 32, 50, 0.1),  # GQA 3, window spanning pages
    ([(7, 3), (1, 1)], 2, 4, 24, 1, None, 0.0),  # head_dim 24 (no AVX-512 tile), one-token pages
    ([(700, 1), (300, 12), (520, 1)], 4, 8, 64, 16, None, 0.05),  # long: several 256-position segments
    ([(1000, 1), (0, 1)], 2, 2, 64, 16, 600, 0.0),  # window across segment cuts
]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: i.name)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(isa, case):
    needs(isa)
    chunks, kv_heads, group, head_dim, page_size, window, holes = CASES[case]
    rng = np.random.default_rng(case)
    pages_per_seq = -(-max(a + n for a, n in chunks) // page_size) + 1
    args = random_step(rng, chunks=chunks, kv_heads=kv_heads, group=group, head_dim=head_dim,
                       page_size=page_size, pages_per_seq=pages_per_seq, holes=holes)
    scale = head_dim**-0.5
    want = np.asarray(paged_attention_reference(*map(jnp.asarray, args), scale=scale, sliding_window=window))
    got = np.asarray(jax.jit(lambda *a: paged_attention_cpu(*a, scale=scale, sliding_window=window, isa=isa))(
        *args))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL)
    padding = args[5] < 0
    assert padding.any() and not got[padding].any()  # padding rows are exactly zero


@pytest.mark.parametrize("seed", range(12))
def test_random_ragged_steps(seed):
    """Random shapes through the dispatcher (`paged_attention` inside jit), the production route."""
    rng = np.random.default_rng(100 + seed)
    page_size = int(rng.choice([1, 2, 4, 8, 16, 32]))
    kv_heads, group = int(rng.choice([1, 2, 4])), int(rng.choice([1, 2, 4, 5, 8]))
    head_dim = int(rng.choice([16, 32, 64, 80, 128]))
    pages_per_seq = int(rng.integers(1, 40 if page_size >= 8 else 80))
    chunks = []
    for _ in range(int(rng.integers(1, 6))):
        total = int(rng.integers(1, pages_per_seq * page_size + 1))
        n = 1 if rng.random() < 0.5 else int(rng.integers(1, min(total, 48) + 1))
        chunks.append((total - n, n))
    window = None if rng.random() < 0.5 else int(rng.integers(1, 300))
    args = random_step(rng, chunks=chunks, kv_heads=kv_heads, group=group, head_dim=head_dim,
                       page_size=page_size, pages_per_seq=pages_per_seq, holes=0.1, pad=int(rng.integers(0, 4)))
    scale = head_dim**-0.5
    want = paged_attention_reference(*map(jnp.asarray, args), scale=scale, sliding_window=window)
    got = jax.jit(lambda *a: paged_attention(*a, scale=scale, sliding_window=window))(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def test_a_row_alone_equals_the_row_in_a_batch_bitwise():
    """A token's result depends only on its own query and context, not on what else is in the step."""
    rng = np.random.default_rng(7)
    chunks = [(900, 1), (40, 1), (300, 9), (5, 1), (600, 1)]
    q, k, v, tables, seq, pos = random_step(rng, chunks=chunks, kv_heads=4, group=8, head_dim=64, page_size=16,
                                            pages_per_seq=64, pad=2)
    fn = jax.jit(lambda *a: paged_attention_cpu(*a, scale=0.125))
    batch = np.asarray(fn(q, k, v, tables, seq, pos))
    for t in rng.permutation(len(seq))[:6]:
        alone_pos = np.full_like(pos, -1)
        alone_pos[t] = pos[t]
        alone = np.asarray(fn(q, k, v, tables, seq, alone_pos))
        np.testing.assert_array_equal(alone[t], batch[t])
        solo = np.asarray(fn(q[t:t + 1], k, v, tables[seq[t]:seq[t] + 1], np.zeros(1, np.int32), pos[t:t + 1]))
        np.testing.assert_array_equal(solo[0], batch[t])


_THREADS_SCRIPT = """
import json, os, sys
os.sched_setaffinity(0, {cpus!r})  # before jax starts: XLA sizes its intra-op pool by the affinity mask
sys.path.insert(0, {root!r})
import numpy as np
from tests.test_cpu_attention import random_step
from inferflux.kernels import cpu
from inferflux.kernels.cpu.attention import paged_attention_cpu
args = random_step(np.random.default_rng(11), chunks=[(1500, 1), (600, 24), (90, 1)], kv_heads=2, group=8,
                   head_dim=64, page_size=16, pages_per_seq=100)
out = np.asarray(paged_attention_cpu(*args, scale=0.125))
print(json.dumps({{"threads": cpu.pool_threads(), "out": out.tobytes().hex()}}))
"""


def test_thread_count_does_not_change_results():
    """One pool thread or two (a step big enough to be split over them): the same bits."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(pinned: set[int]) -> dict:
        done = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT.format(root=root, cpus=pinned)],
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=root, capture_output=True, text=True,
                              timeout=300, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    one, two = run({cpus[0]}), run(set(cpus[:2]))
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["out"] == two["out"]


def test_out_of_range_page_ids_are_masked_not_read():
    rng = np.random.default_rng(3)
    q, k, v, tables, seq, pos = random_step(rng, chunks=[(20, 1)], kv_heads=1, group=2, head_dim=16,
                                            page_size=4, pages_per_seq=6, pad=0)
    bad = tables.copy()
    bad[0, 1] = 10_000  # far outside the cache
    bad[0, 2] = -5
    masked = tables.copy()
    masked[0, 1] = masked[0, 2] = 0
    got = np.asarray(paged_attention_cpu(q, k, v, bad, seq, pos, scale=0.25))
    want = np.asarray(paged_attention_cpu(q, k, v, masked, seq, pos, scale=0.25))
    np.testing.assert_array_equal(got, want)


def test_bad_shapes_raise():
    q = jnp.zeros((2, 6, 16))
    pages = jnp.zeros((4, 3, 4, 16))
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_cpu(q, pages, pages, jnp.zeros((1, 2), jnp.int32), jnp.zeros(2, jnp.int32),
                            jnp.zeros(2, jnp.int32), scale=1.0)


# --- the model runner on this kernel: in-place KV updates, batch-1 steps in the smallest (2-row) bucket ------


def _kv_copies(hlo_text: str, kv_shape: tuple[int, ...]) -> list[str]:
    """Lines of optimized HLO that copy a whole KV-cache array (what XLA emits when it cannot update in place)."""
    shape = "f32[" + ",".join(map(str, kv_shape)) + "]"
    return [line for line in hlo_text.splitlines() if shape in line and (" copy(" in line or "copy-start(" in line)]


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_updates_the_cache_in_place_and_batch_1_runs_in_the_2_row_bucket(tiny_model, batch):
    from inferflux import LLM
    from inferflux.engine.model_runner import Chunk
    from inferflux.engine.sampling_rows import RowParams

    llm = LLM(tiny_model("llama"), page_size=8, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128,
              num_pages=300, max_logprobs=2)
    runner = llm.runner
    assert runner.token_buckets[0] == 2  # runtime.min_token_bucket 0 = by backend: 2 with this kernel
    rng = np.random.default_rng(batch)
    chunks = [Chunk(tokens=[int(rng.integers(1, 200))], start_pos=20, pages=[1 + 3 * i, 2 + 3 * i, 3 + 3 * i],
                    history=[int(t) for t in rng.integers(1, 200, 21)], num_prompt=20,
                    sampling=RowParams(temperature=0.0)) for i in range(batch)]
    bucket = runner.bucket_for(batch, batch, 3)
    assert bucket[:2] == ((2, 2) if batch == 1 else (4, 4))
    kv_shape = runner.kv_cache[0][0].shape
    assert not _kv_copies(runner.program(bucket).as_text(), kv_shape)
    runner.step(chunks)
    pointers = [a.unsafe_buffer_pointer() for layer in runner.kv_cache for a in layer]
    first = runner.step(chunks)
    for _ in range(3):
        again = runner.step(chunks)  # the same token at the same position: same K/V, same result
    assert [a.unsafe_buffer_pointer() for layer in runner.kv_cache for a in layer] == pointers
    assert [r.token_id for r in again] == [r.token_id for r in first]


def test_hlo_check_sees_a_copy_of_the_cache():
    """The check above can fail: a program that must keep the old pages too copies them."""
    kv_shape = (2, 512, 8, 16)

    def step(k_pages, k):
        return k_pages.at[:, 3, 0].set(k), k_pages * 2

    args = jax.ShapeDtypeStruct(kv_shape, jnp.float32), jax.ShapeDtypeStruct((2, 16), jnp.float32)
    text = jax.jit(step, donate_argnums=0).lower(*args).compile().as_text()
    assert _kv_copies(text, kv_shape)


def test_mixed_dtypes_keep_the_reference():
    """A bfloat16 cache with float32 queries is not converted (that would copy the cache every layer)."""
    q = jnp.zeros((2, 4, 16), jnp.float32)
    pages = jnp.zeros((2, 5, 4, 16), jnp.bfloat16)
    tables, seq = jnp.zeros((1, 2), jnp.int32), jnp.zeros(2, jnp.int32)

    def text(k):
        return jax.jit(lambda *a: paged_attention(*a, scale=1.0)).lower(q, k, k, tables, seq, seq).as_text()

    assert "inferflux_paged_attention_v1" not in text(pages)
    assert "inferflux_paged_attention_v1" in text(pages.astype(jnp.float32))
