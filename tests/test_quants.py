"""Bit-exactness of inferflux.formats.quants against gguf's numpy reference.

Every comparison is on bit patterns (f32 viewed as uint32), NaN payloads
included, never allclose: the loader promises the same weights llama.cpp's
Python tooling would produce. On XLA:CPU (x86) everything matches exactly,
including inf/NaN block scales, so no case is exempted here.

The quant bits are random bytes; the f16 scale fields are overwritten with
drawn values so each category (zeros, negatives, normals, f16 subnormals,
and in a separate test inf/NaN) is sure to occur. Shapes are small and
shared between tests so each type compiles a handful of times only.
"""

from __future__ import annotations

import functools

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from inferflux.errors import ModelFormatError, UnsupportedQuantError
from inferflux.formats.quants import (
    SUPPORTED_TYPES,
    QTensor,
    dequantize,
    dequantize_raw,
)

FLOATS = [T.F32, T.F16, T.BF16]
QUANTS = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]

# Byte offsets of the f16 fields (d, and dmin / m where present) inside one
# block, from ggml's block_* structs. Written out here independently of the
# module under test.
F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}

ROWS = 32
BLOCKS_PER_ROW = {32: 16, 256: 8}  # 512 small blocks or 256 super-blocks per tensor


def _shape(qt: T) -> tuple[int, int]:
    block_size = GGML_QUANT_SIZES[qt][0]
    return ROWS, BLOCKS_PER_ROW[block_size] * block_size


def _f16_scales(rng: np.random.Generator, n: int, nonfinite: bool) -> np.ndarray:
    """f16 bit patterns: +-0, subnormals, normals of both signs (+ inf/NaN)."""
    sign = rng.integers(0, 2, n, dtype=np.uint16) << 15
    zero = sign
    subnormal = sign | rng.integers(1, 0x400, n, dtype=np.uint16)
    normal = sign | rng.integers(0x0400, 0x7C00, n, dtype=np.uint16)
    pools = [zero, subnormal, normal, normal]
    fixed = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF]
    if nonfinite:
        inf = sign | np.uint16(0x7C00)
        nan = sign | np.uint16(0x7C00) | rng.integers(1, 0x400, n, dtype=np.uint16)  # quiet and signalling
        pools += [inf, nan]
        fixed += [0x7C00, 0xFC00, 0x7C01, 0xFE00, 0x7DFF, 0x7FFF]
    out = np.choose(rng.integers(0, len(pools), n), pools).astype(np.uint16)
    out[: len(fixed)] = fixed
    return out


def _quant_raw(qt: T, seed: int, nonfinite: bool = False) -> np.ndarray:
    """[rows, bytes_per_row] uint8 as GGUFReader returns a quantized tensor."""
    rng = np.random.default_rng(seed)
    rows, cols = _shape(qt)
    block_size, type_size = GGML_QUANT_SIZES[qt]
    n_blocks = rows * cols // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qt]:
        scales = _f16_scales(rng, n_blocks, nonfinite)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, -1)


def _float_raw(qt: T) -> np.ndarray:
    """Float tensors in the dtype GGUFReader gives (F32/F16 typed, BF16 bytes)."""
    if qt in (T.F16, T.BF16):
        every_pattern = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
        return every_pattern.view(np.float16) if qt == T.F16 else every_pattern.view(np.uint8)
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 1 << 32, (64, 256), dtype=np.uint64).astype(np.uint32)
    bits[0, :10] = [
        *(0x0, 0x80000000, 0x7F800000, 0xFF800000),  # +-0, +-inf
        *(0x7FC00000, 0x7F800001, 0xFFC12345, 0x7FBFFFFF),  # quiet/signalling NaNs with payloads
        *(0x1, 0x807FFFFF),  # smallest and largest subnormal
    ]
    bits[1, :] = rng.integers(1, 1 << 23, 256) | (rng.integers(0, 2, 256) << 31)  # subnormals
    return bits.view(np.float32)


@functools.cache
def _case(qt: T, nonfinite: bool = False) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """(raw, logical shape, gguf reference) -- built once per type."""
    if qt in FLOATS:
        raw = _float_raw(qt)
        shape = (raw.shape[0], raw.view(np.uint8).shape[1] // GGML_QUANT_SIZES[qt][1])
    else:
        raw = _quant_raw(qt, seed=int(qt), nonfinite=nonfinite)
        shape = _shape(qt)
    with np.errstate(all="ignore"):  # inf * 0 and friends are part of the test
        ref = gguf.quants.dequantize(raw.view(np.uint8) if qt == T.BF16 else raw, qt)
    assert ref.dtype == np.float32 and ref.shape == shape
    return raw, shape, ref


def _assert_bits_equal(actual: jax.Array | np.ndarray, expected: np.ndarray) -> None:
    actual = np.asarray(actual)
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    a, e = actual.view(np.uint32), expected.view(np.uint32)
    bad = np.argwhere(a != e)
    if bad.size:
        i = tuple(bad[0])
        pytest.fail(
            f"{len(bad)} of {a.size} values differ; first at {i}: got {a[i]:#010x}, want {e[i]:#010x}"
        )


def test_supported_types_are_exactly_the_implemented_ones() -> None:
    assert SUPPORTED_TYPES == frozenset(FLOATS + QUANTS)


@pytest.mark.parametrize("qt", FLOATS + QUANTS, ids=lambda t: t.name)
def test_dequantize_raw_is_bit_exact(qt: T) -> None:
    raw, shape, ref = _case(qt)
    _assert_bits_equal(dequantize_raw(raw, qt, shape), ref)


@pytest.mark.parametrize("qt", [T.F16, T.Q4_K], ids=lambda t: t.name)
def test_dequantize_raw_accepts_flat_bytes(qt: T) -> None:
    raw, shape, ref = _case(qt)
    _assert_bits_equal(dequantize_raw(raw.view(np.uint8).reshape(-1), qt, shape), ref)


@pytest.mark.parametrize("qt", QUANTS, ids=lambda t: t.name)
def test_qtensor_is_bit_exact(qt: T) -> None:
    raw, shape, ref = _case(qt)
    _assert_bits_equal(dequantize(QTensor.from_raw(raw, qt, shape)), ref)


@pytest.mark.parametrize("qt", QUANTS, ids=lambda t: t.name)
def test_nonfinite_scales_are_bit_exact(qt: T) -> None:
    # inf/NaN block scales (and mins): NaN payloads, signalling NaNs and the
    # NaN that numpy picks when both scale and min are NaN all match.
    raw, shape, ref = _case(qt, nonfinite=True)
    assert np.isnan(ref).any() and np.isinf(ref).any()
    _assert_bits_equal(dequantize_raw(raw, qt, shape), ref)
    _assert_bits_equal(dequantize(QTensor.from_raw(raw, qt, shape)), ref)


@pytest.mark.parametrize("qt", QUANTS, ids=lambda t: t.name)
def test_qtensor_layout(qt: T) -> None:
    raw, shape, _ = _case(qt)
    q = QTensor.from_raw(raw, qt, shape)
    rows, cols = shape
    n_blocks = cols // q.block_size
    assert (q.qtype, q.shape) == (qt, shape)
    assert q.d.dtype == jnp.float32 and q.d.shape == (rows, n_blocks)
    assert q.qs.dtype == jnp.uint8 and q.qs.shape[:2] == (rows, n_blocks)
    for field in (q.qh, q.dmin, q.scales, q.mins):
        assert field is None or field.shape[:2] == (rows, n_blocks)
    if q.block_size == 256:
        # Sub-block scales arrive unpacked: one int8 per sub-block.
        assert q.scales is not None and q.scales.dtype == jnp.int8
        assert q.scales.shape == (rows, n_blocks, 256 // (16 if qt in (T.Q2_K, T.Q3_K, T.Q6_K) else 32))
    has_min = qt in (T.Q4_1, T.Q5_1, T.Q2_K, T.Q4_K, T.Q5_K)
    assert (q.dmin is not None) == has_min


def test_qtensor_is_a_pytree_with_static_type_and_shape() -> None:
    raw, shape, _ = _case(T.Q4_K)
    q = QTensor.from_raw(raw, T.Q4_K, shape)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert all(isinstance(x, jax.Array) for x in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, QTensor) and (rebuilt.qtype, rebuilt.shape) == (T.Q4_K, shape)


def test_dequantize_under_jit_takes_qtensor_argument() -> None:
    traces: list[T] = []

    @jax.jit
    def rowsum_and_values(q: QTensor) -> tuple[jax.Array, jax.Array]:
        traces.append(q.qtype)  # runs only while tracing
        x = dequantize(q)
        return x.sum(axis=1), x

    for qt in (T.Q8_0, T.Q4_K):
        raw, shape, ref = _case(qt)
        q = QTensor.from_raw(raw, qt, shape)
        _, values = rowsum_and_values(q)
        _assert_bits_equal(values, ref)
        rowsum_and_values(q)  # cached: same qtype and shape, no retrace
    # qtype is static, so each type traced once and kept its own program.
    assert traces == [T.Q8_0, T.Q4_K]


def test_dequantize_casts_to_requested_dtype() -> None:
    raw, shape, ref = _case(T.Q6_K)
    out = dequantize(QTensor.from_raw(raw, T.Q6_K, shape), dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(ref).astype(jnp.bfloat16)))


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q5_1, T.Q3_K, T.Q4_K, T.Q6_K, T.IQ4_XS], ids=lambda t: t.name)
def test_take_rows_permutes_dequantized_rows(qt: T) -> None:
    raw, shape, ref = _case(qt)
    q = QTensor.from_raw(raw, qt, shape)
    perm = np.random.default_rng(0).permutation(shape[0])
    permuted = q.take_rows(perm)
    assert permuted.shape == shape and permuted.qtype == qt
    _assert_bits_equal(dequantize(permuted), ref[perm])


def test_take_rows_selects_rows_of_stacked_tensor() -> None:
    # A 3-D [experts, rows, cols] tensor: rows are the second-to-last axis.
    raw, (rows, cols), _ = _case(T.Q8_0)
    stacked = raw.reshape(2, rows // 2, -1)
    ref = gguf.quants.dequantize(stacked, T.Q8_0)
    q = QTensor.from_raw(stacked, T.Q8_0, (2, rows // 2, cols))
    index = np.array([3, 0, 3])
    picked = q.take_rows(index)
    assert picked.shape == (2, 3, cols)
    _assert_bits_equal(dequantize(picked), ref[:, index])


def test_take_rows_rejects_out_of_range_index() -> None:
    raw, shape, _ = _case(T.Q4_0)
    q = QTensor.from_raw(raw, T.Q4_0, shape)
    with pytest.raises(IndexError):
        q.take_rows(np.array([0, shape[0]]))


@pytest.mark.parametrize("qt", [T.IQ2_XXS, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_names_tensor_and_type(qt: T) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qt]
    raw = np.zeros((2, type_size), dtype=np.uint8)
    for build in (dequantize_raw, QTensor.from_raw):
        with pytest.raises(UnsupportedQuantError) as err:
            build(raw, qt, (2, block_size), name="blk.0.attn_q.weight", path="model.gguf")
        assert err.value.tensor == "blk.0.attn_q.weight" and err.value.qtype == qt.name
        assert "model.gguf" in str(err.value) and qt.name in str(err.value)


def test_float_type_is_not_a_qtensor() -> None:
    with pytest.raises(UnsupportedQuantError, match="F16"):
        QTensor.from_raw(np.zeros(8, np.float16), T.F16, (2, 4), name="t")


def test_size_mismatches_are_format_errors() -> None:
    raw, (rows, cols), _ = _case(T.Q4_K)
    with pytest.raises(ModelFormatError, match="should be"):
        dequantize_raw(raw[:, :-1], T.Q4_K, (rows, cols), name="w", path="m.gguf")
    with pytest.raises(ModelFormatError, match="block size"):
        QTensor.from_raw(raw, T.Q4_K, (rows, cols + 32), name="w", path="m.gguf")
