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
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from jax.typing import DTypeLike

from inferflux.errors import ModelFormatError, UnsupportedQuantError

__all__ = [
    "FLOAT_TYPES",
    "QUANTIZED_TYPES",
    "SUPPORTED_TYPES",
    "QTensor",
    "dequantize",
    "dequantize_raw",
]

_T = GGMLQuantizationType

# IQ4_NL/IQ4_XS non-linear 4-bit codebook (ggml's kvalues_iq4nl).
_IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---------------------------------------------------------------------------
# Bit helpers shared by all block families
# ---------------------------------------------------------------------------


def _u16(b: jax.Array) -> jax.Array:
    """Little-endian uint16 from the last axis (2 bytes) as uint32.

    Explicit shifts rather than a widening bitcast, so the result does not
    depend on the host's byte order.
    """
    return b[..., 0].astype(jnp.uint32) | (b[..., 1].astype(jnp.uint32) << 8)


def _u32(b: jax.Array) -> jax.Array:
    """Little-endian uint32 from the last axis (4 bytes)."""
    w = b.astype(jnp.uint32)
    return w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)


def _f16_bits_to_f32(h: jax.Array) -> jax.Array:
    """Exact IEEE f16 -> f32 from the 16-bit pattern, using integer ops only.

    Matches numpy's ``float16.astype(float32)`` for every pattern: subnormals
    are normalised by integer ops (no float op sees them, so FTZ cannot
    touch them), and inf/NaN keep sign and payload (signalling NaNs stay
    signalling, unlike XLA's own conversion).
    """
    h = h.astype(jnp.int32) & 0xFFFF
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    normal = ((exp + (127 - 15)) << 23) | (man << 13)
    inf_nan = 0x7F800000 | (man << 13)
    # Subnormal: man * 2**-24. Its top set bit p moves to the implicit bit,
    # giving exponent p - 24 (biased p + 103). p is garbage when man == 0,
    # but that lane selects zero below.
    p = 31 - jax.lax.clz(man)
    subnormal = ((p + 103) << 23) | ((man << (23 - p)) & 0x7FFFFF)
    magnitude = jnp.where(
        exp == 0x1F, inf_nan, jnp.where(exp != 0, normal, jnp.where(man != 0, subnormal, 0))
    )
    return jax.lax.bitcast_convert_type(sign | magnitude, jnp.float32)


def _f16(b: jax.Array) -> jax.Array:
    """f32 value of a little-endian f16 stored in the last axis (2 bytes)."""
    return _f16_bits_to_f32(_u16(b))


def _split_bits(x: jax.Array, bits: int, group: int) -> jax.Array:
    """Unpack ``bits``-wide fields from the bytes on the last axis.

    GGML packs by *groups*: the first ``group`` output values are the lowest
    ``bits`` of bytes ``0..group-1``, the next ``group`` values the next
    ``bits`` of the same bytes, and so on; then the next ``group`` bytes.
    With ``group=1`` this is plain little-endian bit order (Q5 ``qh``).
    Output order is ``(n // group, 8 // bits, group)`` flattened.
    """
    per_byte = 8 // bits
    *lead, n = x.shape
    shifts = jnp.arange(0, 8, bits, dtype=jnp.uint8).reshape(per_byte, 1)
    fields = (x.reshape(*lead, n // group, 1, group) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*lead, n * per_byte)


def _k_scale_min(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins packed in 12 bytes.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7;
    bytes 4-7 the same for mins; bytes 8-11 the low nibbles of scale 4-7
    (low half) and of min 4-7 (high half).
    """
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(jnp.int8), mn.astype(jnp.int8)


def _q3k_scales(packed: jax.Array) -> jax.Array:
    """Q3_K: 16 six-bit scales (offset by 32) packed in 12 bytes.

    Bytes 0-7 carry the low nibbles (scale i in byte i % 8, nibble i // 8);
    bytes 8-11 the 2-bit high parts (scale i in byte 8 + i % 4, bits 2*(i//4)).
    """
    low = _split_bits(packed[..., 0:8], 4, 8)
    high = _split_bits(packed[..., 8:12], 2, 4)
    return ((low | (high << 4)).astype(jnp.int32) - 32).astype(jnp.int8)


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _add_like_numpy(p: jax.Array, m: jax.Array, negate: bool) -> jax.Array:
    """``p + m`` (or ``p - m``) with the NaN numpy returns, immune to FMA fusion.

    ``p`` is a product. numpy evaluates the product and the add separately,
    and x86 then returns the *first* NaN operand, quieted. When XLA fuses the
    pair into one FMA, the hardware picks among three operands instead, so a
    NaN block scale and a NaN min can yield the other payload. Selecting the
    NaN explicitly pins numpy's choice. Other lanes are left to the
    arithmetic: exact for finite values (see the module docstring), and the
    hardware's default NaN for inf - inf either way.
    """
    out = p - m if negate else p + m
    quiet_m = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(m, jnp.uint32) | 0x00400000, jnp.float32
    )
    return jnp.where(jnp.isnan(p), p, jnp.where(jnp.isnan(m), quiet_m, out))


def _lut(table: Sequence[int], idx: jax.Array) -> jax.Array:
    """Codebook lookup, f32 out (the codebook entries are small integers)."""
    return jnp.asarray(table, dtype=jnp.float32)[idx.astype(jnp.int32)]


# ---------------------------------------------------------------------------
# Block families.
#
# ``unpack`` takes uint8 blocks [..., n_blocks, type_size] and returns the
# QTensor data fields; ``values`` takes those fields and returns f32
# [..., n_blocks, block_size] in numpy's exact operation order.
# ---------------------------------------------------------------------------

Fields = dict[str, jax.Array]


# Q4_0: d(f16) qs[16]; value = d * (nibble - 8). Low nibbles are values 0-15.
def _unpack_q4_0(b: jax.Array) -> Fields:
    return {"d": _f16(b[..., 0:2]), "qs": b[..., 2:18]}


def _values_q4_0(f: Fields) -> jax.Array:
    q = _split_bits(f["qs"], 4, 16).astype(jnp.int32) - 8
    return f["d"][..., None] * _f32(q)


# Q4_1: d(f16) m(f16) qs[16]; value = d * nibble + m.
def _unpack_q4_1(b: jax.Array) -> Fields:
    return {"d": _f16(b[..., 0:2]), "dmin": _f16(b[..., 2:4]), "qs": b[..., 4:20]}


def _values_q4_1(f: Fields) -> jax.Array:
    q = _f32(_split_bits(f["qs"], 4, 16))
    return _add_like_numpy(f["d"][..., None] * q, f["dmin"][..., None], negate=False)


# Q5_0: d(f16) qh[4] qs[16]; qh bit i is the 5th bit of value i.
def _q5(f: Fields) -> jax.Array:
    return _split_bits(f["qs"], 4, 16) | (_split_bits(f["qh"], 1, 1) << 4)


def _unpack_q5_0(b: jax.Array) -> Fields:
    return {"d": _f16(b[..., 0:2]), "qh": b[..., 2:6], "qs": b[..., 6:22]}


def _values_q5_0(f: Fields) -> jax.Array:
    return f["d"][..., None] * _f32(_q5(f).astype(jnp.int32) - 16)


# Q5_1: d(f16) m(f16) qh[4] qs[16]; value = d * q + m.
def _unpack_q5_1(b: jax.Array) -> Fields:
    return {"d": _f16(b[..., 0:2]), "dmin": _f16(b[..., 2:4]), "qh": b[..., 4:8], "qs": b[..., 8:24]}


def _values_q5_1(f: Fields) -> jax.Array:
    return _add_like_numpy(f["d"][..., None] * _f32(_q5(f)), f["dmin"][..., None], negate=False)


# Q8_0: d(f16) qs[32] int8; value = q * d.
def _unpack_q8_0(b: jax.Array) -> Fields:
    return {"d": _f16(b[..., 0:2]), "qs": b[..., 2:34]}


def _values_q8_0(f: Fields) -> jax.Array:
    q = jax.lax.bitcast_convert_type(f["qs"], jnp.int8)
    return _f32(q) * f["d"][..., None]


# IQ4_NL: d(f16) qs[16]; value = d * codebook[nibble], Q4_0 nibble order.
def _unpack_iq4_nl(b: jax.Array) -> Fields:
    return _unpack_q4_0(b)


def _values_iq4_nl(f: Fields) -> jax.Array:
    return f["d"][..., None] * _lut(_IQ4NL_VALUES, _split_bits(f["qs"], 4, 16))


# Q2_K: scales[16] (low nibble scale, high nibble min) qs[64] d dmin;
# 16 sub-blocks of 16: value = (d * sc) * q - (dmin * m).
def _unpack_q2_k(b: jax.Array) -> Fields:
    sc = b[..., 0:16]
    return {
        "scales": (sc & 0x0F).astype(jnp.int8),
        "mins": (sc >> 4).astype(jnp.int8),
        "qs": b[..., 16:80],
        "d": _f16(b[..., 80:82]),
        "dmin": _f16(b[..., 82:84]),
    }


def _scaled_minus_min(f: Fields, q: jax.Array) -> jax.Array:
    """(d * sc) * q - (dmin * m) per sub-block; shared by Q2_K/Q4_K/Q5_K."""
    n_sub = f["scales"].shape[-1]
    q = _f32(q).reshape(*q.shape[:-1], n_sub, -1)
    dl = f["d"][..., None] * _f32(f["scales"])
    ml = f["dmin"][..., None] * _f32(f["mins"])
    out = _add_like_numpy(dl[..., None] * q, ml[..., None], negate=True)
    return out.reshape(*out.shape[:-2], -1)


def _scaled(f: Fields, q: jax.Array) -> jax.Array:
    """(d * sc) * q per sub-block; shared by Q3_K/Q6_K/IQ4_XS."""
    n_sub = f["scales"].shape[-1]
    q = q.reshape(*q.shape[:-1], n_sub, -1)
    dl = f["d"][..., None] * _f32(f["scales"])
    out = dl[..., None] * q
    return out.reshape(*out.shape[:-2], -1)


def _values_q2_k(f: Fields) -> jax.Array:
    return _scaled_minus_min(f, _split_bits(f["qs"], 2, 32))


# Q3_K: hmask[32] qs[64] scales[12] d; 16 sub-blocks of 16:
# value = (d * (sc - 32)) * (q2 - (0 if hmask bit else 4)).
def _unpack_q3_k(b: jax.Array) -> Fields:
    return {
        "qh": b[..., 0:32],
        "qs": b[..., 32:96],
        "scales": _q3k_scales(b[..., 96:108]),
        "d": _f16(b[..., 108:110]),
    }


def _values_q3_k(f: Fields) -> jax.Array:
    low = _split_bits(f["qs"], 2, 32).astype(jnp.int32)
    high = _split_bits(f["qh"], 1, 32).astype(jnp.int32)
    return _scaled(f, _f32(low - ((high ^ 1) << 2)))


# Q4_K: d dmin scales[12] qs[128]; 8 sub-blocks of 32.
def _unpack_q4_k(b: jax.Array) -> Fields:
    sc, mn = _k_scale_min(b[..., 4:16])
    return {"d": _f16(b[..., 0:2]), "dmin": _f16(b[..., 2:4]), "scales": sc, "mins": mn, "qs": b[..., 16:144]}


def _values_q4_k(f: Fields) -> jax.Array:
    return _scaled_minus_min(f, _split_bits(f["qs"], 4, 32))


# Q5_K: d dmin scales[12] qh[32] qs[128]; 8 sub-blocks of 32.
def _unpack_q5_k(b: jax.Array) -> Fields:
    sc, mn = _k_scale_min(b[..., 4:16])
    return {
        "d": _f16(b[..., 0:2]),
        "dmin": _f16(b[..., 2:4]),
        "scales": sc,
        "mins": mn,
        "qh": b[..., 16:48],
        "qs": b[..., 48:176],
    }


def _values_q5_k(f: Fields) -> jax.Array:
    q = _split_bits(f["qs"], 4, 32) | (_split_bits(f["qh"], 1, 32) << 4)
    return _scaled_minus_min(f, q)


# Q6_K: ql[128] qh[64] scales[16] int8, d; 16 sub-blocks of 16:
# value = (d * sc) * ((ql | qh << 4) - 32).
def _unpack_q6_k(b: jax.Array) -> Fields:
    return {
        "qs": b[..., 0:128],
        "qh": b[..., 128:192],
        "scales": jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8),
        "d": _f16(b[..., 208:210]),
    }


def _values_q6_k(f: Fields) -> jax.Array:
    q = _split_bits(f["qs"], 4, 64) | (_split_bits(f["qh"], 2, 32) << 4)
    return _scaled(f, _f32(q.astype(jnp.int32) - 32))


# IQ4_XS: d scales_h(u16) scales_l[4] qs[128]; 8 sub-blocks of 32:
# value = (d * (sc - 32)) * codebook[nibble]; 6-bit sc = low nibble | 2 high bits.
def _unpack_iq4_xs(b: jax.Array) -> Fields:
    low = _split_bits(b[..., 4:8], 4, 1)
    high = _split_bits(b[..., 2:4], 2, 1)
    sc = ((low | (high << 4)).astype(jnp.int32) - 32).astype(jnp.int8)
    return {"d": _f16(b[..., 0:2]), "scales": sc, "qs": b[..., 8:136]}


def _values_iq4_xs(f: Fields) -> jax.Array:
    return _scaled(f, _lut(_IQ4NL_VALUES, _split_bits(f["qs"], 4, 16)))


class _Family(NamedTuple):
    unpack: Callable[[jax.Array], Fields]
    values: Callable[[Fields], jax.Array]


_FAMILIES: dict[GGMLQuantizationType, _Family] = {
    _T.Q4_0: _Family(_unpack_q4_0, _values_q4_0),
    _T.Q4_1: _Family(_unpack_q4_1, _values_q4_1),
    _T.Q5_0: _Family(_unpack_q5_0, _values_q5_0),
    _T.Q5_1: _Family(_unpack_q5_1, _values_q5_1),
    _T.Q8_0: _Family(_unpack_q8_0, _values_q8_0),
    _T.Q2_K: _Family(_unpack_q2_k, _values_q2_k),
    _T.Q3_K: _Family(_unpack_q3_k, _values_q3_k),
    _T.Q4_K: _Family(_unpack_q4_k, _values_q4_k),
    _T.Q5_K: _Family(_unpack_q5_k, _values_q5_k),
    _T.Q6_K: _Family(_unpack_q6_k, _values_q6_k),
    _T.IQ4_NL: _Family(_unpack_iq4_nl, _values_iq4_nl),
    _T.IQ4_XS: _Family(_unpack_iq4_xs, _values_iq4_xs),
}

#: Block-quantized types that :class:`QTensor` can hold.
QUANTIZED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_FAMILIES)
#: Plain float types; :func:`dequantize_raw` handles them, QTensor does not.
FLOAT_TYPES: frozenset[GGMLQuantizationType] = frozenset({_T.F32, _T.F16, _T.BF16})
#: Every type :func:`dequantize_raw` accepts.
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = QUANTIZED_TYPES | FLOAT_TYPES


def _float_values(qtype: GGMLQuantizationType, b: jax.Array) -> jax.Array:
    """F32/F16/BF16 element bytes [..., n, itemsize] -> f32 [..., n], via bits only."""
    if qtype == _T.F32:
        return jax.lax.bitcast_convert_type(_u32(b), jnp.float32)
    if qtype == _T.F16:
        return _f16_bits_to_f32(_u16(b))
    # BF16 is the top half of an f32.
    return jax.lax.bitcast_convert_type(_u16(b) << 16, jnp.float32)


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
