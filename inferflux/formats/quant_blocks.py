"""GGML block formats in `jax.numpy`: per type, how a block's bytes unpack and become f32 values.

The bit-exactness contract and the XLA behaviours it works around are described in `quants.py`;
this module holds the per-type block layouts (one unpack and one values function per family,
registered in `_FAMILIES`) and the bit helpers they share. `quants.py` builds `QTensor` and the
dequantizers on top of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from gguf import GGMLQuantizationType

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
