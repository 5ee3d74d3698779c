"""Quantize float32 weight matrices into GGML block bytes, matching llama.cpp.

:func:`quantize` takes a 2-D weight ``[rows, cols]`` whose ``cols`` axis is
the contiguous one (GGUF ``ne0``). The result is a ``np.uint8`` array shaped
``[rows, cols // block_size * type_size]``: the exact bytes llama.cpp would
store, in the form ``gguf.GGUFWriter.add_tensor(name, data, raw_dtype=qtype)``
expects.

Why two sources of quantizers:

* F16, BF16, Q8_0, Q4_0 and Q5_0 are delegated to ``gguf.quants.quantize``. The
  ``gguf`` package (maintained inside llama.cpp) already mirrors the reference
  C code for them, so we do not keep a second copy. One divergence is patched
  around: for Q4_0/Q5_0 blocks made only of zeros, the first of them being
  -0.0, gguf stores d = +0 where llama.cpp stores -0 (see :func:`quantize`).
* ``gguf`` cannot quantize K-quants, so Q4_K and Q6_K are implemented here in
  vectorized numpy after llama.cpp's ``quantize_row_q4_K_ref`` /
  ``quantize_row_q6_K_ref`` (``ggml/src/ggml-quants.c``). Those reference
  functions are what ``llama-quantize`` runs when no importance matrix is
  given, and they are what we aim to reproduce byte for byte. The arithmetic is
  kept in float32 in the same operation order as the C code, including its
  strictly left-to-right sums (numpy's ``np.sum`` may sum pairwise), because
  the search over candidate scales compares nearly equal float32 errors and a
  one-ulp difference can flip which candidate wins.

Q5_0 is supported (although not a target type of its own) because it is what
llama.cpp falls back to for Q4_K when a row length is not a multiple of 256;
see :func:`fallback_type`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from inferflux.convert.kquants import GROUP_MAX_EPS, QK_K, quantize_q4_k, quantize_q6_k

__all__ = [
    "GROUP_MAX_EPS",
    "QK_K",
    "SUPPORTED_QUANTIZE_TYPES",
    "block_compatible",
    "fallback_type",
    "quantize",
]

_T = GGMLQuantizationType

SUPPORTED_QUANTIZE_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q5_0, _T.Q4_K, _T.Q6_K}
)
"""Types :func:`quantize` can produce."""

_CHUNK_ELEMENTS = 1 << 22
"""Rows are quantized in groups of about this many values.

The K-quant searches hold a dozen temporaries the size of their input; working
in row groups bounds peak memory for large matrices (a 14336x4096 FFN weight
would otherwise need several GiB) without changing any result, since every
super-block is independent.
"""

_F32 = np.float32


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def block_compatible(cols: int, qtype: GGMLQuantizationType) -> bool:
    """Whether a row of ``cols`` values splits into whole blocks of ``qtype``.

    GGML blocks never straddle rows, so a matrix can be stored as ``qtype`` only
    if its contiguous dimension is a multiple of the type's block size (32 for
    Q8_0/Q4_0/Q5_0, 256 for the K-quants, 1 for float types).
    """
    qtype = _check_supported(qtype)
    block_size, _ = GGML_QUANT_SIZES[qtype]
    return cols > 0 and cols % block_size == 0


_FALLBACKS: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    _T.Q4_K: _T.Q5_0,
    _T.Q6_K: _T.Q8_0,
}
"""``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp``."""


def fallback_type(qtype: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    """The type llama.cpp stores a tensor as when ``cols`` does not fit ``qtype``.

    Mirrors ``tensor_type_fallback`` in ``src/llama-quant.cpp`` (called from
    ``llama_tensor_get_type``): a 256-block K-quant drops to a 32-block type of
    similar size (Q4_K -> Q5_0, Q6_K -> Q8_0); a 32-block type has nothing
    smaller to drop to and keeps its type; and if the result still does not
    divide ``cols`` (row length not a multiple of 32) the tensor is stored as
    F16. Returns ``qtype`` itself when it already fits.

    Not mirrored: llama.cpp first sends a non-fitting ``output.weight`` to Q8_0
    in ``llama_tensor_get_type_impl`` before this generic rule; for Q6_K (the
    usual output type) the two agree.
    """
    qtype = _check_supported(qtype)
    if cols <= 0:
        raise ValueError(f"cols must be positive, got {cols}")
    if block_compatible(cols, qtype):
        return qtype
    candidate = _FALLBACKS.get(qtype, qtype)
    if block_compatible(cols, candidate):
        return candidate
    return _T.F16


_SIGNED_ZERO_SENSITIVE = frozenset({_T.Q4_0, _T.Q5_0})
"""Types whose gguf quantizer differs from llama.cpp on blocks of signed zeros."""


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a 2-D float weight ``[rows, cols]`` to GGML block bytes.

    Returns ``np.uint8`` of shape ``[rows, cols // block_size * type_size]``.
    Raises ``ValueError`` for an unsupported type, a non-2-D or non-float array,
    non-finite values (llama.cpp rejects those after quantizing, in
    ``ggml_validate_row_data``; we refuse them up front), or a ``cols`` that is
    not a multiple of the block size (ask :func:`fallback_type` for the type
    llama.cpp would use instead).
    """
    qtype = _check_supported(qtype)
    x = _check_matrix(data, qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_bytes = x.shape[1] // block_size * type_size
    if qtype == _T.F32:
        # Copy so the result never aliases the caller's array.
        return x.view(np.uint8).reshape(x.shape[0], row_bytes).copy()
    if qtype in _K_QUANTIZERS:
        return _in_row_chunks(_K_QUANTIZERS[qtype], x, row_bytes)
    if qtype in _SIGNED_ZERO_SENSITIVE:
        # gguf picks the block's signed max with argmax(|x|), i.e. the first
        # element of an all-zero block, so a leading -0.0 yields d = -0/-8 = +0.
        # The C loop never updates its initial max of +0.0 and stores d = -0.
        # Adding +0.0 turns -0.0 into +0.0 and changes nothing else.
        x = x + _F32(0)
    out = gguf_quants.quantize(x, qtype)  # F16 comes back as float16 values
    return np.ascontiguousarray(out).view(np.uint8).reshape(x.shape[0], row_bytes)


# --------------------------------------------------------------------------
# validation and plumbing
# --------------------------------------------------------------------------


def _check_supported(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    """Normalize ``qtype`` and reject types we cannot produce, naming them."""
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None
    if qtype not in SUPPORTED_QUANTIZE_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_QUANTIZE_TYPES))
        raise ValueError(f"quantizing to {qtype.name} is not supported (supported: {supported})")
    return qtype


def _check_matrix(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Return ``data`` as a C-contiguous float32 matrix, or raise ValueError."""
    if not isinstance(data, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(data).__name__}")
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D [rows, cols] weight, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"expected a floating-point array, got dtype {data.dtype}")
    cols = data.shape[1]
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if cols == 0:
        raise ValueError(f"cannot quantize empty rows (shape {data.shape}) to {qtype.name}")
    if cols % block_size != 0:
        raise ValueError(
            f"cannot quantize shape {data.shape} to {qtype.name}: cols={cols} is not a "
            f"multiple of its block size {block_size}; llama.cpp would store this tensor "
            f"as {fallback_type(qtype, cols).name} (see fallback_type)"
        )
    x = np.ascontiguousarray(data, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"cannot quantize to {qtype.name}: weight contains NaN or Inf")
    return x


def _in_row_chunks(
    fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, row_bytes: int
) -> np.ndarray:
    """Apply a row-independent quantizer over groups of rows (bounds memory)."""
    rows, cols = x.shape
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        part = x[start : start + step]
        out[start : start + step] = fn(part.reshape(-1, QK_K)).reshape(part.shape[0], row_bytes)
    return out


_K_QUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    _T.Q4_K: quantize_q4_k,
    _T.Q6_K: quantize_q6_k,
}
