"""Q4_K and Q6_K in vectorized numpy, byte for byte what llama.cpp's reference quantizers write.

After ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref`` (``ggml/src/ggml-quants.c``), which
``llama-quantize`` runs when no importance matrix is given. The arithmetic is kept in float32 in the
C code's operation order, including its strictly left-to-right sums, because the search over
candidate scales compares nearly equal float32 errors and a one-ulp difference can flip which
candidate wins. `inferflux.convert.quantize` is the public entry point; these take super-blocks
``[n, 256]`` and return their bytes ``[n, type_size]``.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
"""Super-block length of the K-quants (``QK_K`` in ggml-common.h)."""

GROUP_MAX_EPS = np.float32(1e-15)
"""ggml's threshold below which a group counts as all zero (``GROUP_MAX_EPS``)."""

_F32 = np.float32


# --------------------------------------------------------------------------
# float32 helpers matching the C reference
#
# The K-quant code works on "position-major" arrays: a batch of G groups of n
# values is held as [n, G], so that per-group quantities are plain [G] vectors
# and a per-group sum is n contiguous vector additions.
# --------------------------------------------------------------------------


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum ``[n, G]`` over ``n`` strictly left to right in float32, like a C ``+=`` loop.

    ``np.sum`` may sum pairwise, which rounds differently from the reference
    loops; an explicit loop over the (short) group axis fixes the order, and
    each step is one contiguous vector add across all groups.
    """
    total = a[0].astype(_F32, copy=True)
    for row in a[1:]:
        total += row
    return total


def _round_half_even(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``, kept in float32: nearest integer, ties to even.

    The C version adds 1.5*2^23 and reads the mantissa, which is
    round-half-to-even for |v| < 2^22 (the range it asserts); ``np.rint`` on the
    same float32 value gives the same integer. Staying in float32 avoids an int
    conversion on the hot path; the values are exact small integers.
    """
    return np.rint(v)


def _to_fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float32 to fp16 (``GGML_FP32_TO_FP16``: round-to-nearest-even).

    Returns the fp16 bit pattern (to store) and its float32 value (the C code
    re-reads the stored half with ``GGML_FP16_TO_FP32`` before requantizing).
    """
    h = v.astype(np.float16)
    return h.view(np.uint16), h.astype(_F32)


def _position_major(blocks: np.ndarray, group: int) -> np.ndarray:
    """``[n_blocks, 256]`` -> ``[group, n_groups]`` (see the note above)."""
    return np.ascontiguousarray(blocks.reshape(-1, group).T)


# --------------------------------------------------------------------------
# Q4_K
# --------------------------------------------------------------------------


def _make_qkx2_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) fit per group, after ggml's ``make_qkx2_quants``.

    ``x`` and ``weights`` are position-major ``[n, groups]``. Each group is
    quantized as ``x ~ scale * L - the_min`` with ``L`` in ``[0, nmax]``.
    Starting from the plain min/max grid, ``nstep + 1`` candidate grids
    ``(rmin + rdelta*is + nmax) / (max - min)`` are tried; for each, the
    weighted least-squares (scale, min) is solved in closed form and kept if
    its weighted squared error beats the best so far (``use_mad = false``, as
    Q4_K uses). Returns ``(scale [G], the_min [G], L [n, G] as float32)``.

    Quirk kept on purpose: the C loop overwrites ``min`` whenever a candidate
    wins, so later candidate grids are built from ``max - best_min_so_far`` and
    ``x - best_min_so_far`` rather than the data minimum. Using the data
    minimum throughout would be the "cleaner" search but gives different bytes.
    """
    xmin = np.minimum(x.min(axis=0), _F32(0))
    xmax = x.max(axis=0)
    flat = xmax == xmin
    # Flat groups are finished before the search in C; a dummy range keeps the
    # vectorized arithmetic finite and their results are overwritten below.
    safe_max = np.where(flat, xmin + _F32(1), xmax)
    sum_w = _seq_sum(weights)
    sum_x = _seq_sum(weights * x)
    top = _F32(nmax)

    iscale = top / (safe_max - xmin)
    scale = _F32(1) / iscale
    levels = np.clip(_round_half_even(iscale * (x - xmin)), 0, top)
    best_error = _weighted_sq_error(scale, xmin, levels, x, weights)
    best_min = xmin

    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + top) / (safe_max - best_min)
        cand = np.clip(_round_half_even(iscale * (x - best_min)), 0, top)
        wl = weights * cand
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * cand)
        sum_xl = _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, _F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur_error = _weighted_sq_error(this_scale, this_min, cand, x, weights)
        better = (det > 0) & (cur_error < best_error)
        levels = np.where(better, cand, levels)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)

    scale = np.where(flat, _F32(0), scale)
    levels = np.where(flat, _F32(0), levels)
    best_min = np.where(flat, xmin, best_min)
    return scale.astype(_F32), (-best_min).astype(_F32), levels


def _weighted_sq_error(
    scale: np.ndarray, minimum: np.ndarray, levels: np.ndarray, x: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """``sum w * (scale*L + min - x)^2`` in the reference's order of operations."""
    diff = scale * levels + minimum - x
    return _seq_sum(w * (diff * diff))


def _pack_q4_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack eight 6-bit scales and mins per super-block into 12 bytes.

    Layout (``get_scale_min_k4`` reads it back): bytes 0-3 hold scales 0-3 and
    bytes 4-7 mins 0-3 in their low 6 bits, with the top 2 bits of scales 4-7 /
    mins 4-7 in bits 6-7; bytes 8-11 hold the low nibbles of scale j (low) and
    min j (high) for j = 4..7.
    """
    ls_lo, ls_hi = ls[:, :4], ls[:, 4:]
    lm_lo, lm_hi = lm[:, :4], lm[:, 4:]
    first = ls_lo | ((ls_hi >> 4) << 6)
    second = lm_lo | ((lm_hi >> 4) << 6)
    third = (ls_hi & 0xF) | ((lm_hi & 0xF) << 4)
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def _quantize_6bit_scales(values: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """``MIN(63, (uint8_t)nearest_int(inv * v))``: the C stores into a uint8 first."""
    wrapped = np.rint(inv[:, None] * values).astype(np.int32) & 0xFF
    return np.minimum(wrapped, 63).astype(np.uint8)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks ``[n, 256]`` -> bytes ``[n, 144]`` (``quantize_row_q4_K_ref``).

    Each 256-value super-block has eight 32-value sub-blocks, each with its own
    (scale, min) from :func:`_make_qkx2_quants` weighted by
    ``rms(sub-block) + |x|``. Sub-block scales and mins are then quantized to 6
    bits against fp16 super-scales ``d = max_scale/63`` and
    ``dmin = max_min/63``, and the values are re-quantized to 4 bits with those
    final, rounded scales. Block layout: d, dmin (fp16), 12 scale bytes, 128
    bytes of nibbles (value l and l+32 of each 64-value chunk share a byte).
    """
    n = blocks.shape[0]
    x = _position_major(blocks, 32)  # [32, n*8]
    av_x = np.sqrt(_seq_sum(x * x) / _F32(32))
    weights = av_x + np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales, mins, levels = _make_qkx2_quants(
            x, weights, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20
        )
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)

    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    ls = _quantize_6bit_scales(scales, inv_scale)
    lm = _quantize_6bit_scales(mins, inv_min)
    d_bits, d = _to_fp16(max_scale / _F32(63))
    dmin_bits, dmin = _to_fp16(max_min / _F32(63))

    sub_d = (d[:, None] * ls.astype(_F32)).reshape(-1)
    sub_m = (dmin[:, None] * lm.astype(_F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_round_half_even((x + sub_m) / sub_d), 0, 15)
    # Sub-blocks whose final scale is zero keep the levels of the first fit.
    levels = np.where(sub_d != 0, requant, levels).astype(np.uint8)

    chunks = levels.T.reshape(n, 4, 2, 32)
    qs = (chunks[:, :, 0, :] | (chunks[:, :, 1, :] << 4)).reshape(n, 128)
    head = np.stack([d_bits, dmin_bits], axis=1).view(np.uint8)
    return np.concatenate([head, _pack_q4_k_scales(ls, lm), qs], axis=1)


# --------------------------------------------------------------------------
# Q6_K
# --------------------------------------------------------------------------


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale fit per group, after ggml's ``make_qx_quants`` (rmse_type 1).

    ``x`` is position-major ``[n, groups]``; values map to ``L - nmax`` with
    ``L`` in ``[0, 2*nmax)``. The grid is anchored on the signed value of
    largest magnitude (``-nmax / max``, so that value lands on ``-nmax``), then
    18 perturbed grids ``-(nmax + 0.1*is) / max`` are tried; each gets the
    least-squares scale under weights ``x^2`` and is kept if it explains more
    weighted energy (``sumlx^2 / suml2``). Returns ``(scale [G], L [n, G])``.
    All-zero groups get ``L = 0`` (not ``nmax``), as in the C code.
    """
    idx = np.argmax(np.abs(x), axis=0)[None, :]  # first maximum, as the C loop's strict '>'
    signed_max = np.take_along_axis(x, idx, axis=0)[0]
    zero = np.abs(signed_max) < GROUP_MAX_EPS
    signed_max = np.where(zero, _F32(1), signed_max)
    w = x * x
    lo, hi = _F32(-nmax), _F32(nmax - 1)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = np.clip(_round_half_even(iscale * x), lo, hi)
        sumlx = _seq_sum(w * x * levels)
        suml2 = _seq_sum(w * levels * levels)
        return levels, sumlx, suml2

    levels, sumlx, suml2 = fit(_F32(-nmax) / signed_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
    best = scale * sumlx
    for step in (s for s in range(-9, 10) if s != 0):
        cand, sumlx, suml2 = fit(-(_F32(nmax) + _F32(0.1) * _F32(step)) / signed_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = sumlx / suml2
        levels = np.where(better, cand, levels)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)

    codes = np.where(zero, _F32(0), levels + _F32(nmax)).astype(np.uint8)
    scale = np.where(zero, _F32(0), scale)
    return scale.astype(_F32), codes


def _pack_q6_k_quants(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split 6-bit codes ``[n, 256]`` into ``ql`` (low nibbles) and ``qh`` (high 2 bits).

    Per 128-value half, with quarters q0..q3 of 32 values: ``ql[0:32]`` pairs
    q0 (low nibble) with q2 (high), ``ql[32:64]`` pairs q1 with q3, and
    ``qh[l]`` stacks the top two bits of q0..q3 at bit offsets 0, 2, 4, 6.
    """
    n = codes.shape[0]
    q = codes.reshape(n, 2, 4, 32)
    low = q & 0xF
    ql = low[:, :, 0:2, :] | (low[:, :, 2:4, :] << 4)
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks ``[n, 256]`` -> bytes ``[n, 210]`` (``quantize_row_q6_K_ref``).

    Sixteen 16-value sub-blocks each get a symmetric scale from
    :func:`_make_qx_quants` (6-bit levels, nmax 32). The sub-block scales are
    quantized to int8 against ``d = fp16(max_scale / -128)`` (anchored on the
    largest-magnitude, signed scale), then values are re-quantized with the
    final ``d * scale_j``. Layout: ql (128), qh (64), int8 scales (16),
    d (fp16). Super-blocks whose scales are all ~0 are stored as zero bytes.
    """
    n = blocks.shape[0]
    x = _position_major(blocks, 16)  # [16, n*16]
    scales, codes = _make_qx_quants(x, nmax=32)
    scales = scales.reshape(n, 16)

    idx = np.argmax(np.abs(scales), axis=1)[:, None]
    max_scale = np.take_along_axis(scales, idx, axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    # Zero super-blocks are written as all-zero bytes at the end; give them a
    # harmless scale so the arithmetic below stays finite.
    max_scale = np.where(zero, _F32(-128), max_scale)
    iscale = _F32(-128) / max_scale
    d_bits, d = _to_fp16(_F32(1) / iscale)
    q_scales = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)

    sub_d = (d[:, None] * q_scales.astype(_F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_round_half_even(x / sub_d), -32, 31) + _F32(32)
    # Sub-blocks whose final scale is zero keep the codes of the first fit.
    codes = np.where(sub_d != 0, requant, codes).astype(np.uint8).T.reshape(n, QK_K)

    ql, qh = _pack_q6_k_quants(codes)
    out = np.concatenate(
        [ql, qh, q_scales.view(np.uint8), d_bits[:, None].view(np.uint8)], axis=1
    )
    out[zero] = 0
    return out
