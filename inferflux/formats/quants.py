"""GGML block quantization: packed on-device tensors and bit-exact dequantizers.

GGUF stores most weights in GGML *blocks*: a row of ``cols`` values (GGUF
``ne0``, the contiguous dimension) is cut into blocks of 32 values
(Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL) or 256-value super-blocks (the K-quants and
IQ4_XS). Each block is a fixed number of bytes holding an f16 scale (some
types also an f16 min), for super-blocks small per-sub-block integer scales,
and the quant bits. Everything here is ``jax.numpy`` working on all blocks at
once, so it jits and runs where the bytes already are (CPU at load time, GPU
when a kernel wants a reference).

Two ways in:

* :func:`dequantize_raw` -- raw GGUF bytes in, f32 out. The CPU loader's path;
  it also handles the plain float types F32/F16/BF16.
* :class:`QTensor` -- the packed representation that quantized matmul kernels
  consume: the quant bits stay packed exactly as in the file, while the scales
  are decoded once at load: the f16 block scales become f32 and the packed
  (e.g. 6-bit) sub-block scales and mins become one int8 per sub-block. A
  kernel then only multiplies ``d * scales[s]`` per sub-block and never
  re-decodes bit-packed scale bytes. Rows are independent, so rows can be
  permuted or selected with :meth:`QTensor.take_rows`.

Bit-exactness contract: for every type in :data:`SUPPORTED_TYPES`, the f32
result equals ``gguf.quants.dequantize`` (the gguf package's numpy reference)
bit for bit, NaN payloads included, for any bytes. Getting there needs care
with three XLA behaviours:

1. **f16 -> f32 conversion.** XLA's ``astype(float32)`` quiets signalling
   NaNs (``0x7c01`` becomes ``0x7fc02000``; numpy keeps ``0x7f802000``), and
   XLA:CPU runs with flush-to-zero/denormals-are-zero, so f16 subnormal scales
   are at the mercy of how the conversion gets lowered. So f16 (and bf16) bits
   are widened to f32 bit patterns with integer ops only
   (:func:`_f16_bits_to_f32`) and reinterpreted with
   ``lax.bitcast_convert_type``. No float op ever sees a subnormal: f16
   subnormals are >= 2**-24, i.e. *normal* in f32, and every later product
   stays >= 2**-24, so FTZ never triggers afterwards either.
2. **Operation order.** We multiply in numpy's order, e.g. Q4_K is
   ``(d * sc) * q - (dmin * m)``, never ``d * (sc * q)``.
3. **FMA contraction.** XLA (LLVM with ``AllowFPOpFusion=Fast``) fuses
   ``x * q - m`` into one FMA, which rounds once where numpy rounds twice.
   For finite values that is harmless *by construction*: every product is
   exact in f32. ``d`` (an f16) has an 11-bit significand and ``|sc * q|`` is
   below 2**13 for every type (largest: Q6_K 128 * 32, IQ4_XS 32 * 127), so
   ``d * sc * q`` fits f32's 24 bits and never rounds; fused and unfused both
   give ``round(d*sc*q - dmin*m)``. (An ``optimization_barrier`` would not
   help: XLA:CPU fuses straight through it.) Kernels that keep the scales as
   the exact f32 values stored here inherit this for the products.
   Non-finite scales are different: an FMA picks the NaN to propagate among
   three operands, numpy's two separate ops pick "first NaN operand,
   quieted" (x86 rule). :func:`_add_like_numpy` selects that NaN explicitly.

Result: on XLA:CPU (x86) every output bit matches, NaN payloads included,
for arbitrary bytes (tests/test_quants.py checks zero, negative, normal,
subnormal, inf and NaN scales). Not covered by that guarantee: other hosts'
NaN conventions (aarch64 numpy prefers a signalling NaN operand and has a
positive default NaN) and GPUs (NVIDIA arithmetic returns one canonical NaN,
so there only NaN-ness, not payload, can match).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from jax.typing import DTypeLike

from inferflux.errors import ModelFormatError, UnsupportedQuantError
from inferflux.formats.quant_blocks import (
    _FAMILIES,
    FLOAT_TYPES,
    QUANTIZED_TYPES,
    SUPPORTED_TYPES,
    Fields,
    _float_values,
)

__all__ = [
    "FLOAT_TYPES",
    "QUANTIZED_TYPES",
    "SUPPORTED_TYPES",
    "QTensor",
    "dequantize",
    "dequantize_raw",
]

# ---------------------------------------------------------------------------
# Validation: turn bad inputs into errors that name the file and tensor.
# ---------------------------------------------------------------------------


def _check_qtype(
    qtype: GGMLQuantizationType | int,
    allowed: frozenset[GGMLQuantizationType],
    name: str,
    path: str | Path,
) -> GGMLQuantizationType:
    """The type as an enum, or UnsupportedQuantError naming file, tensor and type."""
    try:
        qt = GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedQuantError(path, name, f"<unknown ggml type {int(qtype)}>") from None
    if qt not in allowed:
        raise UnsupportedQuantError(path, name, qt.name)
    return qt


def _raw_blocks(
    raw: np.ndarray, qtype: GGMLQuantizationType, shape: Sequence[int], name: str, path: str | Path
) -> np.ndarray:
    """Host view of ``raw`` as uint8 blocks [*shape[:-1], n_blocks, type_size]."""
    shape = tuple(int(s) for s in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or any(s < 0 for s in shape):
        raise ModelFormatError(path, f"tensor {name!r} has invalid shape {shape}")
    if shape[-1] % block_size:
        raise ModelFormatError(
            path,
            f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
            f"{qtype.name} block size {block_size}",
        )
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n_blocks = shape[-1] // block_size
    expected = int(np.prod(shape[:-1], dtype=np.int64)) * n_blocks * type_size
    if data.size != expected:
        raise ModelFormatError(
            path,
            f"tensor {name!r}: {qtype.name} data for shape {shape} should be "
            f"{expected} bytes, got {data.size}",
        )
    return data.reshape(*shape[:-1], n_blocks, type_size)


# ---------------------------------------------------------------------------
# QTensor
# ---------------------------------------------------------------------------


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["qs", "qh", "d", "dmin", "scales", "mins"],
    meta_fields=["qtype", "shape"],
)
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A block-quantized tensor on device, laid out for matmul kernels.

    Logical shape is ``shape`` (``(rows, cols)``; leading batch dims such as
    MoE experts are allowed), ``cols`` being the contiguous dimension GGUF
    quantizes along (``ne0``). Every array below has leading dims
    ``(*shape[:-1], n_blocks)`` with ``n_blocks = cols // block_size``, then:

    ``qs``      uint8 [..., n_blocks, k] -- the low quant bits, packed exactly
                as in the file (nibbles for 4-bit types, int8 bytes for Q8_0,
                crumbs for Q2_K/Q3_K, Q6_K's ``ql``).
    ``qh``      uint8 [..., n_blocks, k] or None -- high-bit planes, packed as
                in the file (Q5_0/Q5_1 ``qh``, Q3_K ``hmask``, Q5_K/Q6_K ``qh``).
    ``d``       f32 [..., n_blocks] -- block (super-block) scale, the file's
                f16 widened exactly.
    ``dmin``    f32 [..., n_blocks] or None -- block min (Q4_1/Q5_1 ``m``) or
                super-block min scale (Q2_K/Q4_K/Q5_K ``dmin``).
    ``scales``  int8 [..., n_blocks, n_sub] or None -- per-sub-block scales
                for K-quants and IQ4_XS, unpacked and offset-corrected (Q3_K
                and IQ4_XS already have the ``- 32`` applied).
    ``mins``    int8 [..., n_blocks, n_sub] or None -- per-sub-block mins
                (Q2_K/Q4_K/Q5_K).

    Value of element ``i`` of sub-block ``s``: ``(d * scales[s]) * q_i -
    (dmin * mins[s])`` for min-types, ``(d * scales[s]) * q_i`` otherwise;
    for the 32-value types ``d * q_i (+ dmin)``. Scales are kept as int8
    next to an f32 super-scale rather than pre-multiplied f32 so the side
    data stays small (0.5-1 bit per weight instead of 2-4).

    Registered as a pytree: arrays are leaves, ``qtype``/``shape`` are static,
    so a QTensor passes straight through ``jax.jit``.
    """

    qs: jax.Array
    qh: jax.Array | None
    d: jax.Array
    dmin: jax.Array | None
    scales: jax.Array | None
    mins: jax.Array | None
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def block_size(self) -> int:
        """Values per block (32, or 256 for K-quants and IQ4_XS)."""
        return GGML_QUANT_SIZES[self.qtype][0]

    @classmethod
    def from_raw(
        cls,
        raw: np.ndarray,
        qtype: GGMLQuantizationType,
        shape: tuple[int, ...],
        *,
        name: str = "?",
        path: str | Path = "?",
    ) -> QTensor:
        """Build from a GGUF tensor's bytes (``GGUFReader`` ``tensor.data``).

        ``raw`` may be ``[rows, bytes_per_row]`` or flat; ``shape`` is the
        logical ``(rows, cols)``. Raises :class:`UnsupportedQuantError` for a
        type that is not block-quantized-and-supported (float types included:
        use :func:`dequantize_raw` for those) and :class:`ModelFormatError` if
        the byte count does not fit the shape.
        """
        qt = _check_qtype(qtype, QUANTIZED_TYPES, name, path)
        blocks = _raw_blocks(raw, qt, shape, name, path)
        fields = _unpack_jit(qt, jnp.asarray(blocks))
        fields = {f: fields.get(f) for f in ("qs", "qh", "d", "dmin", "scales", "mins")}
        return cls(**fields, qtype=qt, shape=tuple(int(s) for s in shape))

    def take_rows(self, index: np.ndarray | Sequence[int]) -> QTensor:
        """Rows ``index`` (along ``shape[-2]``) as a new QTensor.

        Rows are independent (blocks run along cols), so permuting or
        selecting rows is a gather on every field. The GGUF loader uses this
        to undo llama.cpp's Q/K head permutation without dequantizing.
        """
        if len(self.shape) < 2:
            raise ValueError(f"take_rows needs a tensor with rows, got shape {self.shape}")
        idx = np.asarray(index)
        rows = self.shape[-2]
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"row index must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= rows):
            raise IndexError(f"row index out of range for {rows} rows")
        return self.gather_rows(jnp.asarray(idx, dtype=jnp.int32))

    def gather_rows(self, idx: jax.Array) -> QTensor:
        """Rows ``idx`` without host-side checks, so it works on traced indices.

        Used inside compiled steps, e.g. to look up token embeddings from a
        packed embedding table without dequantizing all of it.
        """
        axis = len(self.shape) - 2

        def take(x: jax.Array | None) -> jax.Array | None:
            return None if x is None else jnp.take(x, idx, axis=axis)

        return dataclasses.replace(
            self,
            qs=jnp.take(self.qs, idx, axis=axis),
            qh=take(self.qh),
            d=jnp.take(self.d, idx, axis=axis),
            dmin=take(self.dmin),
            scales=take(self.scales),
            mins=take(self.mins),
            shape=(*self.shape[:-2], int(idx.shape[0]), self.shape[-1]),
        )


def _fields(q: QTensor) -> Fields:
    names = ("qs", "qh", "d", "dmin", "scales", "mins")
    return {n: getattr(q, n) for n in names if getattr(q, n) is not None}


@partial(jax.jit, static_argnums=0)
def _unpack_jit(qtype: GGMLQuantizationType, blocks: jax.Array) -> Fields:
    return _FAMILIES[qtype].unpack(blocks)


@jax.jit
def _dequantize_f32(q: QTensor) -> jax.Array:
    return _FAMILIES[q.qtype].values(_fields(q)).reshape(q.shape)


@partial(jax.jit, static_argnums=(0, 2))
def _dequantize_blocks(qtype: GGMLQuantizationType, blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if qtype in FLOAT_TYPES:
        return _float_values(qtype, blocks).reshape(shape)
    family = _FAMILIES[qtype]
    return family.values(family.unpack(blocks)).reshape(shape)


def dequantize(q: QTensor, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """Values of ``q`` with its logical shape.

    In f32 the result is bit-identical to ``gguf.quants.dequantize``; other
    dtypes are that f32 result cast. Jittable (QTensor is a pytree).
    """
    out = _dequantize_f32(q)
    return out if jnp.dtype(dtype) == jnp.float32 else out.astype(dtype)


def dequantize_raw(
    raw: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, ...],
    *,
    name: str = "?",
    path: str | Path = "?",
) -> jax.Array:
    """GGUF tensor bytes -> f32 array of ``shape``, bit-identical to gguf's numpy.

    ``raw`` is what ``GGUFReader`` gives as ``tensor.data`` (any dtype; its
    bytes are used, in row-major order), ``shape`` the logical shape with the
    quantized dimension last. Handles every type in :data:`SUPPORTED_TYPES`,
    including F32/F16/BF16. ``name``/``path`` only feed error messages.
    """
    qt = _check_qtype(qtype, SUPPORTED_TYPES, name, path)
    shape = tuple(int(s) for s in shape)
    blocks = _raw_blocks(raw, qt, shape, name, path)
    return _dequantize_blocks(qt, jnp.asarray(blocks), shape)
