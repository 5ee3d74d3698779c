"""Tests for inferflux.convert.quantize, with llama.cpp itself as the oracle.

A tiny F32 ``llama`` GGUF is written once per module and quantized by
llama.cpp's own ``llama_model_quantize`` (through llama-cpp-python) to each
target type; every tensor llama.cpp stores as that type must come out of our
``quantize()`` byte for byte. ``pure`` mode is used so that llama.cpp applies
the requested type to every 2-D tensor instead of its per-tensor mixture,
which gives the most tensors to compare per run. Some rows of the token
embedding are deliberately awkward (zeros, constants, one-signed, heavy tails,
tiny and huge magnitudes) to reach the quantizers' special cases.

A second GGUF adds tensors whose row length does not fit a 256 block (288) or
even a 32 block (100), to check :func:`fallback_type` against the type
llama.cpp actually chose, and the bytes of that fallback.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from inferflux.convert import quantize as quantize_module
from inferflux.convert.quantize import (
    SUPPORTED_QUANTIZE_TYPES,
    block_compatible,
    fallback_type,
    quantize,
)

EMBED = 256
FFN = 512
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
VOCAB = ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(29)]

ODD_SHAPES = {"blk.0.odd32.weight": (8, 288), "blk.0.odd.weight": (4, 100)}
"""Extra tensors (rows, cols): 288 is a multiple of 32 but not 256, 100 of neither."""

LLAMA_FTYPES = {
    "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
}
"""Target type -> llama.cpp file type that (in pure mode) stores 2-D weights as it."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as llama.cpp wrote it: its type and its raw bytes [rows, row_bytes]."""

    qtype: T
    data: np.ndarray


# --------------------------------------------------------------------------
# building and quantizing the tiny model
# --------------------------------------------------------------------------


def _awkward_rows(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Rows that hit the quantizers' edge cases (flat groups, zero blocks, ...)."""
    normal = rng.standard_normal((10, cols)).astype(np.float32)
    half_zero = normal[0].copy()
    half_zero[:16] = 0.0  # one all-zero Q6_K sub-block
    half_zero[64:96] = 0.0  # one all-zero Q4_K sub-block
    rows = [
        np.zeros(cols),
        np.full(cols, 0.3),
        np.full(cols, -0.7),
        np.abs(normal[1]),
        -np.abs(normal[2]),
        rng.standard_t(2, cols),
        normal[3] * (rng.random(cols) < 0.05),  # sparse; its zeros include -0.0
        normal[4] * 1e-7,
        normal[5] * 1e3,
        rng.integers(-8, 8, cols).astype(np.float64),
        half_zero,
    ]
    return np.stack(rows).astype(np.float32)


def _model_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights of a tiny Llama, in GGUF layout (numpy [ne1, ne0])."""
    head_dim = EMBED // N_HEADS

    def weight(rows: int, cols: int) -> np.ndarray:
        # Gaussian plus rare large outliers, as trained LLM weights have; the
        # outliers make the K-quant scale searches take their closer calls.
        values = rng.standard_normal((rows, cols)) * 0.02
        values += (rng.random((rows, cols)) < 0.002) * rng.standard_normal((rows, cols))
        return values.astype(np.float32)

    embd = weight(len(VOCAB), EMBED)
    awkward = _awkward_rows(rng, EMBED)
    embd[: len(awkward)] = awkward
    tensors = {
        "token_embd.weight": embd,
        "output_norm.weight": np.ones(EMBED, dtype=np.float32),
        "output.weight": weight(len(VOCAB), EMBED),
    }
    for i in range(N_LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": np.ones(EMBED, dtype=np.float32),
            f"blk.{i}.attn_q.weight": weight(N_HEADS * head_dim, EMBED),
            f"blk.{i}.attn_k.weight": weight(N_KV_HEADS * head_dim, EMBED),
            f"blk.{i}.attn_v.weight": weight(N_KV_HEADS * head_dim, EMBED),
            f"blk.{i}.attn_output.weight": weight(EMBED, N_HEADS * head_dim),
            f"blk.{i}.ffn_norm.weight": np.ones(EMBED, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": weight(FFN, EMBED),
            f"blk.{i}.ffn_up.weight": weight(FFN, EMBED),
            f"blk.{i}.ffn_down.weight": weight(EMBED, FFN),
        }
    return tensors


def _write_f32_gguf(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write a minimal but valid F32 ``llama`` GGUF holding ``tensors``."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(EMBED)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(EMBED // N_HEADS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(VOCAB)
    writer.add_token_scores([0.0] * len(VOCAB))
    writer.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.NORMAL] * (len(VOCAB) - 3)
    )
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_quantize(src: Path, dst: Path, ftype_name: str) -> dict[str, StoredTensor]:
    """Quantize ``src`` with llama.cpp (pure mode) and read every tensor back."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.pure = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype_name}) failed with {rc}"
    stored = {}
    for tensor in gguf.GGUFReader(dst).tensors:
        qtype = T(tensor.tensor_type)
        rows = int(np.prod(tensor.shape[1:]))
        raw = np.asarray(tensor.data).view(np.uint8).reshape(rows, -1)
        stored[tensor.name] = StoredTensor(qtype, raw)
    return stored


@pytest.fixture(scope="module")
def model_tensors() -> dict[str, np.ndarray]:
    """The tiny model's float32 weights (fixed seed)."""
    return _model_tensors(np.random.default_rng(1234))


@pytest.fixture(scope="module")
def odd_tensors(model_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tiny model plus tensors whose row length fits no 256 (or 32) block."""
    rng = np.random.default_rng(99)
    extra = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in ODD_SHAPES.items()
    }
    return model_tensors | extra


@pytest.fixture(scope="module")
def llama_cpp_outputs(
    tmp_path_factory: pytest.TempPathFactory, model_tensors: dict[str, np.ndarray]
) -> dict[str, dict[str, StoredTensor]]:
    """llama.cpp's quantization of the tiny model, per target type name."""
    workdir = tmp_path_factory.mktemp("quantize")
    src = workdir / "tiny-f32.gguf"
    _write_f32_gguf(src, model_tensors)
    return {
        target: _llama_cpp_quantize(src, workdir / f"tiny-{target}.gguf", ftype)
        for target, ftype in LLAMA_FTYPES.items()
    }


@pytest.fixture(scope="module")
def llama_cpp_odd_outputs(
    tmp_path_factory: pytest.TempPathFactory, odd_tensors: dict[str, np.ndarray]
) -> dict[str, dict[str, StoredTensor]]:
    """llama.cpp's quantization of the model with odd-shaped extra tensors."""
    workdir = tmp_path_factory.mktemp("quantize-odd")
    src = workdir / "odd-f32.gguf"
    _write_f32_gguf(src, odd_tensors)
    return {
        target: _llama_cpp_quantize(src, workdir / f"odd-{target}.gguf", LLAMA_FTYPES[target])
        for target in ("Q4_K", "Q6_K", "Q4_0")
    }


# --------------------------------------------------------------------------
# bit-exactness against llama.cpp
# --------------------------------------------------------------------------


def _mismatch_report(ours: np.ndarray, ref: np.ndarray, source: np.ndarray, qtype: T) -> str:
    """Describe how far our bytes are from llama.cpp's (for a failing assert)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    same = (ours.reshape(-1, type_size) == ref.reshape(-1, type_size)).all(axis=1)
    ours_err = np.sqrt(np.mean((gguf.quants.dequantize(ours, qtype) - source) ** 2))
    ref_err = np.sqrt(np.mean((gguf.quants.dequantize(ref, qtype) - source) ** 2))
    return (
        f"{same.mean():.4%} of {same.size} blocks identical; "
        f"RMS error ours {ours_err:.4g} vs llama.cpp {ref_err:.4g}"
    )


def _assert_same_bytes(
    name: str, ours: np.ndarray, stored: StoredTensor, source: np.ndarray
) -> None:
    """Bit-identity with llama.cpp; on failure, say how many blocks and how much error."""
    assert ours.shape == stored.data.shape, f"{name}: shape {ours.shape} vs {stored.data.shape}"
    # The message (evaluated only on failure) measures the mismatch.
    assert np.array_equal(ours, stored.data), (
        f"{name} ({stored.qtype.name}): "
        f"{_mismatch_report(ours, stored.data, source, stored.qtype)}"
    )


@pytest.mark.parametrize("target", list(LLAMA_FTYPES))
def test_bytes_match_llama_cpp(
    target: str,
    model_tensors: dict[str, np.ndarray],
    llama_cpp_outputs: dict[str, dict[str, StoredTensor]],
) -> None:
    """Every 2-D weight llama.cpp stored as ``target`` is byte-identical to ours."""
    qtype = T[target]
    stored = llama_cpp_outputs[target]
    matrices = [name for name, data in model_tensors.items() if data.ndim == 2]
    compared = [name for name in matrices if stored[name].qtype == qtype]
    assert compared == matrices, f"llama.cpp did not store all matrices as {target}"
    for name in compared:
        data = model_tensors[name]
        _assert_same_bytes(name, quantize(data, qtype), stored[name], data)


@pytest.mark.parametrize("target", ["Q4_K", "Q6_K", "Q4_0"])
def test_fallback_matches_llama_cpp(
    target: str,
    odd_tensors: dict[str, np.ndarray],
    llama_cpp_odd_outputs: dict[str, dict[str, StoredTensor]],
) -> None:
    """For rows that fit no block, llama.cpp picks fallback_type(), with our bytes."""
    stored = llama_cpp_odd_outputs[target]
    for name in ODD_SHAPES:
        data = odd_tensors[name]
        expected = fallback_type(T[target], data.shape[1])
        assert stored[name].qtype == expected, f"{name}: llama.cpp chose {stored[name].qtype.name}"
        _assert_same_bytes(name, quantize(data, expected), stored[name], data)


# --------------------------------------------------------------------------
# fallback and compatibility rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qtype", "cols", "expected"),
    [
        (T.Q4_K, 512, T.Q4_K),
        (T.Q4_K, 288, T.Q5_0),
        (T.Q4_K, 100, T.F16),
        (T.Q6_K, 288, T.Q8_0),
        (T.Q6_K, 100, T.F16),
        (T.Q8_0, 96, T.Q8_0),
        (T.Q8_0, 100, T.F16),
        (T.Q4_0, 100, T.F16),
        (T.Q5_0, 48, T.F16),
        (T.F32, 7, T.F32),
        (T.BF16, 7, T.BF16),
        (T.F16, 7, T.F16),
    ],
)
def test_fallback_type(qtype: T, cols: int, expected: T) -> None:
    assert fallback_type(qtype, cols) == expected
    assert block_compatible(cols, fallback_type(qtype, cols))


def test_block_compatible() -> None:
    assert block_compatible(256, T.Q4_K)
    assert not block_compatible(288, T.Q4_K)
    assert block_compatible(288, T.Q8_0)
    assert not block_compatible(100, T.Q4_0)
    assert block_compatible(3, T.F32)
    assert not block_compatible(0, T.F16)


def test_fallback_type_rejects_unsupported_types() -> None:
    with pytest.raises(ValueError, match="Q2_K"):
        fallback_type(T.Q2_K, 100)
    with pytest.raises(ValueError, match="positive"):
        fallback_type(T.Q4_K, 0)


# --------------------------------------------------------------------------
# round trip and input validation
# --------------------------------------------------------------------------

ROUND_TRIP_BOUNDS = {
    T.F32: 0.0,
    T.F16: 1e-3,
    T.BF16: 5e-3,
    T.Q8_0: 1e-2,
    T.Q6_K: 2.5e-2,
    T.Q5_0: 6e-2,
    T.Q4_K: 9e-2,
    T.Q4_0: 1.1e-1,
}
"""RMS round-trip error relative to the data's RMS, for Gaussian weights.

Measured with this module's data: F16 2.1e-4, BF16 1.6e-3, Q8_0 5.4e-3,
Q6_K 1.8e-2, Q5_0 4.3e-2, Q4_K 7.2e-2, Q4_0 8.6e-2.
"""


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_QUANTIZE_TYPES, key=lambda t: t.name))
def test_round_trip_error(qtype: T) -> None:
    assert set(ROUND_TRIP_BOUNDS) == SUPPORTED_QUANTIZE_TYPES
    data = np.random.default_rng(7).standard_normal((64, 512)).astype(np.float32) * 0.05
    packed = quantize(data, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert packed.dtype == np.uint8
    assert packed.shape == (64, 512 // block_size * type_size)
    restored = gguf.quants.dequantize(packed, qtype)
    rel_rms = np.sqrt(np.mean((restored - data) ** 2) / np.mean(data**2))
    assert rel_rms <= ROUND_TRIP_BOUNDS[qtype], f"{qtype.name}: relative RMS error {rel_rms:.3g}"


def test_row_chunking_does_not_change_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large matrices are quantized in row groups; the grouping must be invisible."""
    data = np.random.default_rng(3).standard_normal((7, 512)).astype(np.float32)
    whole = {qtype: quantize(data, qtype) for qtype in (T.Q4_K, T.Q6_K)}
    monkeypatch.setattr(quantize_module, "_CHUNK_ELEMENTS", 3 * 512)  # 3 rows per group
    for qtype, expected in whole.items():
        assert np.array_equal(quantize(data, qtype), expected), qtype.name


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0])
def test_signed_zero_block_scale_matches_llama_cpp(qtype: T) -> None:
    """An all-zero block starting with -0.0 stores d = -0.0 (fp16 0x8000), as C does.

    llama.cpp's loop keeps its initial max of +0.0, so d = +0.0 / -8 = -0.0;
    gguf's own quantizer would take the leading -0.0 and store +0.0.
    """
    data = np.zeros((1, 32), dtype=np.float32)
    data[0, ::2] = -0.0
    packed = quantize(data, qtype)
    assert packed[0, :2].view(np.uint16)[0] == 0x8000


def test_output_does_not_alias_input() -> None:
    data = np.ones((2, 32), dtype=np.float32)
    packed = quantize(data, T.F32)
    data[:] = 2.0
    assert np.array_equal(packed.view(np.float32), np.ones((2, 32), dtype=np.float32))


@pytest.mark.parametrize(
    ("data", "qtype", "message"),
    [
        (np.zeros(256, dtype=np.float32), T.Q4_K, "2-D"),
        (np.zeros((2, 2, 256), dtype=np.float32), T.Q6_K, "2-D"),
        (np.zeros((2, 288), dtype=np.float32), T.Q4_K, r"Q4_K.*288.*Q5_0"),
        (np.zeros((2, 100), dtype=np.float32), T.Q8_0, r"Q8_0.*100.*F16"),
        (np.zeros((2, 0), dtype=np.float32), T.Q8_0, "empty"),
        (np.zeros((2, 256), dtype=np.int32), T.Q4_K, "floating"),
        (np.full((2, 256), np.nan, dtype=np.float32), T.Q6_K, "NaN"),
        (np.zeros((2, 256), dtype=np.float32), T.Q2_K, "Q2_K is not supported"),
        (np.zeros((2, 256), dtype=np.float32), 999, "unknown"),
        ([[0.0] * 256], T.Q4_K, "numpy array"),
    ],
)
def test_bad_input_raises(data: np.ndarray, qtype: T, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize(data, qtype)
