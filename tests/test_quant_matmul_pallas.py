"""The fused dequantizing Pallas matmul (kernels/quant_matmul_pallas.py) in Pallas' interpreter, against
gguf's own dequantizer (`gguf.quants.dequantize(W) @ x`), and cross-lowered for CUDA on this CPU host.

Weights are random quant bytes with f16 scales drawn in a moderate range (so bf16 products stay finite),
packed into a `QTensor` exactly as the GGUF loader does.
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from inferflux.formats.quants import QTensor
from inferflux.kernels.quant_matmul_pallas import FUSED_TYPES, fused_supported, qmatmul_pallas

F16_AT = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_K: (0, 2), T.Q6_K: (208,)}  # byte offsets of f16 fields (ggml structs)


def random_weight(qtype: T, rows: int, cols: int, seed: int) -> np.ndarray:
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    for off in F16_AT[qtype]:
        scales = (rng.uniform(0.5, 2.0, raw.shape[:2]) * rng.choice([-1, 1], raw.shape[:2]) / 64).astype(np.float16)
        raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", FUSED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k,dtype", [(3, 64, 512, np.float32), (20, 32, 768, np.float32),
                                         (1, 128, 512, jnp.bfloat16)])
def test_fused_matmul_interpret_matches_gguf(qtype, m, n, k, dtype):
    raw = random_weight(qtype, n, k, seed=m + n)
    w = QTensor.from_raw(raw, qtype, (n, k))
    assert fused_supported(w)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    if dtype != np.float32:
        x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    dense = gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float64)
    want = x.astype(np.float64) @ dense.T
    got = np.asarray(qmatmul_pallas(jnp.asarray(x, dtype), w, interpret=True))
    assert got.shape == (m, n) and got.dtype == np.float32
    if dtype == np.float32:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    else:  # the tile is rounded to bf16 before the dot, as the XLA path's bf16 copy is
        rounded = np.asarray(jnp.asarray(dense, jnp.bfloat16).astype(jnp.float32), np.float64)
        np.testing.assert_allclose(got, x @ rounded.T, rtol=1e-3, atol=1e-3 * np.abs(want).max())
        assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()


def test_leading_dims_and_unsupported():
    raw = random_weight(T.Q8_0, 32, 64, seed=0)
    w = QTensor.from_raw(raw, T.Q8_0, (32, 64))
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    got = np.asarray(qmatmul_pallas(jnp.asarray(x), w, interpret=True))
    want = x @ gguf.quants.dequantize(raw, T.Q8_0).reshape(32, 64).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    odd = QTensor.from_raw(random_weight(T.Q8_0, 24, 64, seed=1), T.Q8_0, (24, 64))
    assert not fused_supported(odd)  # 24 rows: no 16-row power-of-two tile
    with pytest.raises(ValueError, match="no fused"):
        qmatmul_pallas(jnp.asarray(x), odd)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU host the kernel runs for real instead")
@pytest.mark.parametrize("qtype", FUSED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 11008), (64, 11008, 4096)])  # Llama-2-7B down / up projections
def test_fused_matmul_lowers_to_triton(qtype, m, n, k):
    block = GGML_QUANT_SIZES[qtype][0]
    # Abstract QTensor fields with the loader's shapes, from a small real one scaled up.
    small = QTensor.from_raw(random_weight(qtype, 16, block * 2, seed=3), qtype, (16, block * 2))
    fields = {}
    for name in ("qs", "qh", "d", "dmin", "scales", "mins"):
        a = getattr(small, name)
        fields[name] = None if a is None else jax.ShapeDtypeStruct((n, k // block, *a.shape[2:]), a.dtype)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)

    def fn(x, qs, qh, d, dmin, scales, mins):
        q = QTensor(qs=qs, qh=qh, d=d, dmin=dmin, scales=scales, mins=mins, qtype=qtype, shape=(n, k))
        return qmatmul_pallas(x, q)

    text = jax.jit(fn).trace(x, *fields.values()).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
