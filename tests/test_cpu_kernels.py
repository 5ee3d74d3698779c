"""The CPU FFI kernels: a bit-exact numpy reference for every quantized-matmul type, invariances, packaging.

The reference (`reference_qmatmul`) does what inferflux/kernels/cpu/csrc/qmm_body.inc does, in numpy:
activations quantized in blocks of 32 (absmax / 127, round-half-even), weight blocks decoded to unsigned
integers plus integer sub-block scales, integer dots per sub-block in int64, and the float epilogue in the
kernel's order. The reference itself is checked against `gguf.quants.dequantize(W) @ x` within the error that
activation quantization allows, and its weight decoding against gguf's dequantizer bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inferflux.kernels import cpu
from inferflux.kernels.cpu.qmatmul import KERNEL_TYPES, GGUFBlocks, qmatmul

T = gguf.GGMLQuantizationType
F32 = np.float32
IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int64)
# Byte offsets of each type's f16 scale fields (set to sane values in random blocks).
F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,), T.Q8_0: (0,), T.Q4_0: (0,)}
TYPES = sorted(KERNEL_TYPES, key=int)


def test_extension_is_loaded() -> None:
    """CI builds the library (pip install -e .); a silent fallback to float32 would hide every test below."""
    assert cpu.available(), cpu.unavailable_reason()
    assert cpu.best_isa() >= cpu.Isa.SCALAR


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes as `uint8[rows, row_bytes]`, with finite f16 scales of a sane size."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = rng.uniform(-0.02, 0.02, raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


# --- the reference: weight decoding ---------------------------------------------------------------------------

def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 8 six-bit scales and mins from 12 bytes (ggml's get_scale_min_k4)."""
    sc = sc.astype(np.int64)
    low = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 15) | ((sc[..., 0:4] >> 6) << 4)], -1)
    mins = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], -1)
    return low, mins


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(F32)


def decode(qtype: T, raw: np.ndarray, cols: int) -> dict[str, np.ndarray]:
    """Blocks -> u (unsigned weights, [N, nb, bs]), off, c/m (int sub-block scales/mins), d/dmin (f32 [N, nb])."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = raw.reshape(raw.shape[0], cols // block, size).astype(np.int64)
    if qtype in (T.Q4_K, T.Q5_K):
        c, m = _k_scales(b[..., 4:16])
        qs = b[..., 16:144] if qtype == T.Q4_K else b[..., 48:176]
        groups = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4]).reshape(2, 1)
        u = (groups & 15).reshape(*qs.shape[:-1], 256)
        if qtype == T.Q5_K:
            bits = (b[..., 16:48, None] >> np.arange(8)) & 1  # [.., 32 bytes, 8 bits]: bit s is value 32 s + i's
            u = u | (np.swapaxes(bits, -1, -2).reshape(*qs.shape[:-1], 256) << 4)
        return dict(u=u, off=0, c=c, m=m, d=_f16(raw.reshape(b.shape)[..., 0:2]),
                    dmin=_f16(raw.reshape(b.shape)[..., 2:4]))
    if qtype == T.Q6_K:
        ql, qh = b[..., 0:128], b[..., 128:192]
        low = (ql.reshape(*ql.shape[:-1], 2, 1, 64) >> np.array([0, 4]).reshape(2, 1)) & 15  # [.., half, nib, 64]
        high = (qh.reshape(*qh.shape[:-1], 2, 1, 32) >> np.array([0, 2, 4, 6]).reshape(4, 1)) & 3  # [.., h, 4, 32]
        u = low.reshape(*ql.shape[:-1], 2, 128) | (high.reshape(*ql.shape[:-1], 2, 128) << 4)
        c = b[..., 192:208].astype(np.uint8).view(np.int8).astype(np.int64)
        return dict(u=u.reshape(*ql.shape[:-1], 256), off=32, c=c, m=None,
                    d=_f16(raw.reshape(b.shape)[..., 208:210]), dmin=None)
    if qtype == T.IQ4_XS:
        sh = b[..., 2] | (b[..., 3] << 8)
        s = np.arange(8)
        low = (b[..., 4 + s // 2] >> (4 * (s % 2))) & 15
        c = (low | (((sh[..., None] >> (2 * s)) & 3) << 4)) - 32
        qs = b[..., 8:136].reshape(*b.shape[:-1], 8, 1, 16) >> np.array([0, 4]).reshape(2, 1)
        u = IQ4NL[(qs & 15).reshape(*b.shape[:-1], 256)] + 128
        return dict(u=u, off=128, c=c, m=None, d=_f16(raw.reshape(b.shape)[..., 0:2]), dmin=None)
    if qtype == T.Q8_0:
        u = b[..., 2:34].astype(np.uint8).view(np.int8).astype(np.int64) + 128
        return dict(u=u, off=128, c=None, m=None, d=_f16(raw.reshape(b.shape)[..., 0:2]), dmin=None)
    if qtype == T.Q4_0:
        u = (b[..., 2:18].reshape(*b.shape[:-1], 1, 16) >> np.array([0, 4]).reshape(2, 1)) & 15
        return dict(u=u.reshape(*b.shape[:-1], 32), off=8, c=None, m=None,
                    d=_f16(raw.reshape(b.shape)[..., 0:2]), dmin=None)
    raise AssertionError(qtype)


def decoded_values(qtype: T, dec: dict[str, np.ndarray]) -> np.ndarray:
    """float32 weights from the decoded fields, in gguf's operation order."""
    u, off, d = dec["u"], dec["off"], dec["d"]
    if dec["c"] is None:
        return (d[..., None] * (u - off).astype(F32)).reshape(u.shape[0], -1)
    nsub = dec["c"].shape[-1]
    q = (u - off).reshape(*u.shape[:-1], nsub, -1).astype(F32)
    out = (d[..., None] * dec["c"].astype(F32))[..., None] * q
    if dec["m"] is not None:
        out = out - (dec["dmin"][..., None] * dec["m"].astype(F32))[..., None]
    return out.reshape(u.shape[0], -1)


# --- the reference: activations and the integer matmul --------------------------------------------------------

def quantize_activations(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values [M, nb, block] (as int64) and f32 scales [M, nb]: d = absmax / 127, q = rint(x * 127/absmax)."""
    xb = x.astype(F32).reshape(x.shape[0], -1, block)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax != 0, F32(127) / np.where(amax != 0, amax, F32(1)), F32(0)).astype(F32)
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int64)
    return q, (amax / F32(127)).astype(F32)


def reference_qmatmul(qtype: T, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the kernel computes, bit for bit: y[M, N] float32.

    Activations in blocks of 32. Per output and activation block k: an exact integer S_k (the sub-block dots
    scaled by the integer sub-block scales, offsets removed) and, for Q4_K/Q5_K, Mn_k (mins times activation
    sums); one float term t_k = (d * da_k) * S_k [- (dmin * da_k) * Mn_k]. Terms go to 8 lanes (k mod 8),
    added in order of k, and the lanes are summed as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
    """
    dec = decode(qtype, raw, x.shape[1])
    u, off, d = dec["u"], dec["off"], dec["d"]  # u [N, nb, bs]
    q, da = quantize_activations(x, 32)  # [M, nb32, 32], [M, nb32]
    m_rows, n, nb = q.shape[0], u.shape[0], u.shape[1]
    if dec["c"] is None:  # 32-value blocks: one integer dot and one float term per block
        s = np.einsum("nbi,mbi->mnb", u, q) - off * q.sum(-1)[:, None, :]
        terms = (d[None] * da[:, None, :]) * s.astype(F32)
    else:
        nsub = dec["c"].shape[-1]
        us = u.reshape(n, nb, nsub, -1)
        qs = q.reshape(m_rows, nb, nsub, -1)
        asub = qs.sum(-1)[:, None]  # [M, 1, nb, nsub]
        per_sub = dec["c"][None] * (np.einsum("nbsi,mbsi->mnbs", us, qs) - off * asub)
        s = per_sub.reshape(m_rows, n, nb, 8, nsub // 8).sum(-1)  # per activation block of 32
        assert np.abs(per_sub).max() < 2**31 and np.abs(s).max() < 2**31  # the kernel's int32 cannot overflow
        d_da = d[None, :, :, None] * da.reshape(m_rows, 1, nb, 8)
        terms = d_da * s.astype(F32)
        if dec["m"] is not None:
            mn = dec["m"][None] * asub
            terms = terms - (dec["dmin"][None, :, :, None] * da.reshape(m_rows, 1, nb, 8)) * mn.astype(F32)
        terms = terms.reshape(m_rows, n, nb * 8)
    pad = -terms.shape[2] % 8
    terms = np.concatenate([terms, np.zeros((m_rows, n, pad), F32)], axis=2).reshape(m_rows, n, -1, 8)
    lanes = np.zeros((m_rows, n, 8), F32)
    for g in range(terms.shape[2]):  # groups in order, one f32 add per lane
        lanes = lanes + terms[:, :, g]
    lo = (lanes[..., 0] + lanes[..., 1]) + (lanes[..., 2] + lanes[..., 3])
    hi = (lanes[..., 4] + lanes[..., 5]) + (lanes[..., 6] + lanes[..., 7])
    return lo + hi


def _cols(qtype: T) -> int:
    return 288 if qtype in (T.Q8_0, T.Q4_0) else 768  # 9 blocks of 32 (a partial group of 8), 3 super-blocks


def _inputs(qtype: T, m: int, n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = random_blocks(qtype, n, _cols(qtype), rng)
    x = rng.standard_normal((m, _cols(qtype))).astype(F32)
    x[3 % m] = 0.0  # an all-zero row: absmax 0, scale 0
    if m > 5:
        x[5, :7] *= 50.0  # one block dominated by outliers
    return raw, x


def run_kernel(qtype: T, raw: np.ndarray, x: np.ndarray, isa: cpu.Isa = cpu.Isa.AUTO) -> np.ndarray:
    w = GGUFBlocks(jnp.asarray(raw), qtype, (raw.shape[0], x.shape[1]))
    return np.asarray(jax.jit(lambda a, b: qmatmul(a, b, isa=isa))(jnp.asarray(x), w))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_decodes_like_gguf(qtype: T) -> None:
    raw, _ = _inputs(qtype, 1)
    expected = gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], -1)
    np.testing.assert_array_equal(decoded_values(qtype, decode(qtype, raw, _cols(qtype))), expected)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_within_activation_quantization_bound(qtype: T) -> None:
    """|ref - x @ W.T| <= |W| @ (activation rounding error <= d/2), plus float rounding."""
    raw, x = _inputs(qtype, 16)
    w = gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], -1).astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    _, da = quantize_activations(x, 32)
    half_step = np.repeat(da.astype(np.float64) / 2, 32, axis=1)
    bound = half_step @ np.abs(w).T + 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-30
    err = np.abs(reference_qmatmul(qtype, raw, x) - exact)
    assert np.all(err <= bound), float((err / bound).max())
    assert err.max() > 0  # activations really were quantized


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_equals_reference(qtype: T) -> None:
    raw, x = _inputs(qtype, 512)
    expected = reference_qmatmul(qtype, raw, x)
    for m in [*range(1, 18), 64, 512]:
        np.testing.assert_array_equal(run_kernel(qtype, raw, x[:m]), expected[:m], err_msg=f"M={m}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_isa_gives_the_same_bits(qtype: T) -> None:
    raw, x = _inputs(qtype, 11, seed=1)
    expected = reference_qmatmul(qtype, raw, x)
    for isa in _isas():
        np.testing.assert_array_equal(run_kernel(qtype, raw, x, isa), expected, err_msg=isa.name)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_subnormal_and_zero_scales_give_the_reference_bits(qtype: T) -> None:
    """The AVX-512 few-row path converts f16 scales with vcvtph2ps, the others by integer ops: f16 subnormals
    (which a DAZ setting could flush), zeros of both signs and the smallest normal must come out the same."""
    rng = np.random.default_rng(6)
    raw, x = _inputs(qtype, 9, n=24, seed=6)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(raw.shape[0], -1, size)
    special = np.array([2.0**-24, -(2.0**-24), 3 * 2.0**-20, -(1023 * 2.0**-24), 0.0, -0.0, 2.0**-14], np.float16)
    for offset in F16_FIELDS[qtype]:
        picks = special[rng.integers(0, special.size, blocks.shape[:2])]
        blocks[..., offset:offset + 2] = picks.view(np.uint8).reshape(*blocks.shape[:2], 2)
    raw = blocks.reshape(raw.shape[0], -1)
    expected = reference_qmatmul(qtype, raw, x)
    assert np.any(expected != 0)
    for isa in _isas():
        for m in (1, 2, 9):
            np.testing.assert_array_equal(run_kernel(qtype, raw, x[:m], isa), expected[:m], err_msg=f"{isa.name} M={m}")


def _isas() -> list[cpu.Isa]:
    """Every ISA path this CPU can run."""
    return [isa for isa in cpu.Isa
            if cpu.Isa.SCALAR <= isa <= cpu.best_isa() and (isa != cpu.Isa.AVX_VNNI or _has_avx_vnni())]


def _has_avx_vnni() -> bool:
    try:
        return "avx_vnni" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def test_row_alone_equals_row_in_batch() -> None:
    """Batch invariance: a row computed alone equals the same row at any position of a batch of 8."""
    for qtype in TYPES:
        raw, x = _inputs(qtype, 8, seed=2)
        alone = [run_kernel(qtype, raw, x[i:i + 1])[0] for i in range(8)]
        for shift in range(8):
            batch = run_kernel(qtype, raw, np.roll(x, shift, axis=0))
            for i in range(8):
                np.testing.assert_array_equal(batch[(i + shift) % 8], alone[i])


def test_row_alone_equals_row_in_a_prompt_sized_batch() -> None:
    """Batch invariance across the switch to the panel path (M >= 24): a row alone (the row path) equals the
    same row at any position of 64 (the panel path), on a matrix whose last tile is partial (N = 40)."""
    for qtype in TYPES:
        raw, x = _inputs(qtype, 64, seed=4)
        batch = run_kernel(qtype, raw, x)
        for i in (0, 7, 8, 31, 63):
            np.testing.assert_array_equal(batch[i], run_kernel(qtype, raw, x[i:i + 1])[0], err_msg=qtype.name)


def test_real_rows_computes_the_leading_rows_and_zeros_the_rest() -> None:
    """`rows` (and `real_rows` in a traced step) computes the leading real rows bit for bit as the full call,
    across the switch to the panel path, and writes zeros for the padding; a traced count serves every
    count from one program."""
    from inferflux.kernels.cpu.qmatmul import real_rows

    for qtype in TYPES:
        raw, x = _inputs(qtype, 32, seed=5)
        w = GGUFBlocks(jnp.asarray(raw), qtype, (raw.shape[0], x.shape[1]))
        full = run_kernel(qtype, raw, x)
        counted = jax.jit(lambda a, b, n: qmatmul(a, b, rows=n))
        for n in (0, 1, 5, 24, 31, 32):
            out = np.asarray(counted(jnp.asarray(x), w, jnp.int32(n)))
            np.testing.assert_array_equal(out[:n], full[:n], err_msg=f"{qtype.name} rows={n}")
            assert not out[n:].any(), f"{qtype.name}: padding rows of rows={n} are not zeros"

        def step(a, b, positions):
            with real_rows(positions):
                return qmatmul(a, b), qmatmul(a[:8], b)  # the second has another row count: all computed

        positions = jnp.where(jnp.arange(32) < 7, jnp.arange(32), -1)
        padded, other = jax.jit(step)(jnp.asarray(x), w, positions)
        np.testing.assert_array_equal(np.asarray(padded)[:7], full[:7])
        assert not np.asarray(padded)[7:].any()
        np.testing.assert_array_equal(np.asarray(other), full[:8])


def test_several_weights_in_one_call_equal_one_call_each() -> None:
    """`qmatmul_many` (q|k|v, gate|up) gives each weight's product bit for bit as its own call, with mixed
    types and sizes, on the few-row and the panel path, with padding rows; `linear_many` uses it."""
    from inferflux.kernels.cpu.qmatmul import qmatmul_many
    from inferflux.kernels.quant_matmul import linear_many

    rng = np.random.default_rng(6)
    cols = 768
    ws = [GGUFBlocks(jnp.asarray(random_blocks(qtype, n, cols, rng)), qtype, (n, cols))
          for qtype, n in ((T.Q4_K, 40), (T.Q6_K, 8), (T.Q8_0, 17), (T.IQ4_XS, 33))]
    many = jax.jit(lambda a, b, n: qmatmul_many(a, b, rows=n))
    for m, real in ((1, 1), (8, 5), (32, 32)):
        x = jnp.asarray(rng.standard_normal((m, cols)).astype(F32))
        outs = many(x, ws, jnp.int32(real))
        for w, out in zip(ws, outs):
            alone = np.asarray(jax.jit(lambda a, b, n: qmatmul(a, b, rows=n))(x, w, jnp.int32(real)))
            np.testing.assert_array_equal(np.asarray(out), alone, err_msg=f"{w.qtype.name} M={m}")
        biases = [jnp.full((w.shape[0],), 0.5, F32) for w in ws]
        for got, w in zip(jax.jit(linear_many)(x, ws, biases), ws):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(qmatmul(x, w)) + 0.5)


_PANEL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
from tests.test_cpu_kernels import TYPES, _inputs, _isas, reference_qmatmul, run_kernel
for t in TYPES:
    for n in (40, 5):  # a partial last tile; a matrix smaller than one tile
        raw, x = _inputs(t, 64, n=n, seed=5)
        expected = reference_qmatmul(t, raw, x)
        for isa in _isas():
            for m in {rows!r}:
                np.testing.assert_array_equal(run_kernel(t, raw, x[:m], isa), expected[:m],
                                              err_msg=f"{{t.name}} {{isa.name}} N={{n}} M={{m}}")
print("ok")
"""


@pytest.mark.parametrize("panel_rows,rows", [("1", [*range(1, 18), 64]), ("0", [16, 17, 64])],
                         ids=["panel-from-1-row", "panel-off"])
def test_panel_and_row_paths_equal_the_reference(panel_rows: str, rows: list[int]) -> None:
    """INFERFLUX_QMM_PANEL_ROWS moves the switch between the two paths: the panel path at every M (its
    8-row passes and their 1..7-row tails, the AVX2 signed dots of Q8_0/IQ4_XS) and the row path where the
    panel would run by default give the reference's bits on every ISA."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "INFERFLUX_QMM_PANEL_ROWS": panel_rows}
    done = subprocess.run([sys.executable, "-c", _PANEL_SCRIPT.format(root=root, rows=rows)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


_THREADS_SCRIPT = """
import json, os, sys
os.sched_setaffinity(0, {cpus!r})  # before jax starts: XLA sizes its intra-op pool by the affinity mask
sys.path.insert(0, {root!r})
from tests.test_cpu_kernels import TYPES, _inputs, run_kernel
from inferflux.kernels import cpu
out = {{t.name: run_kernel(t, *_inputs(t, 9, seed=3)).tobytes().hex() for t in TYPES}}
print(json.dumps({{"threads": cpu.pool_threads(), "out": out}}))
"""


def _run_on_cpus(cpus: set[int]) -> dict:
    """The script in a fresh process pinned to `cpus` (XLA_FLAGS such as --xla_cpu_multi_thread_eigen=false
    leave the FFI pool's size as it is, measured; the affinity mask sets it)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT.format(root=root, cpus=cpus)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_thread_count_does_not_change_results() -> None:
    """A one-thread pool and a two-thread pool give the same bits."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    one, two = _run_on_cpus({cpus[0]}), _run_on_cpus(set(cpus[:2]))
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["out"] == two["out"]


def test_bad_shapes_are_errors() -> None:
    raw, x = _inputs(T.Q4_K, 2)
    with pytest.raises(ValueError):
        qmatmul(jnp.asarray(x[:, :256]), GGUFBlocks(jnp.asarray(raw), T.Q4_K, (raw.shape[0], x.shape[1])))


def test_env_switch_forces_the_float_path() -> None:
    """INFERFLUX_CPU_KERNELS=off: the library is not loaded and CPU weights are dequantized at load."""
    script = ("from inferflux.kernels import cpu; from inferflux.engine import device; "
              "print(cpu.available(), device.weight_layout('auto'), device.weight_layout('exact'))")
    env = {**os.environ, "INFERFLUX_CPU_KERNELS": "off", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.split() == ["False", "dense", "dense"]


def test_layouts_by_mode() -> None:
    from inferflux.engine import device

    assert device.weight_layout("auto", "cpu") == (device.GGUF_BLOCKS if cpu.fast_path() else device.DENSE)
    assert device.weight_layout("exact", "cpu") == device.GGUF_BLOCKS
    assert device.weight_layout("off", "cpu") == device.DENSE
    assert device.weight_layout("auto", "gpu") == device.QTENSOR


def test_gguf_blocks_alias_the_mapped_file(tiny_gguf) -> None:
    """On the kernel layout a quantized matrix is the file's mapped bytes, not a copy (resident memory about
    the file's size): XLA:CPU aliases 64-byte aligned host buffers, and every tensor of our files is."""
    from inferflux.engine import device
    from inferflux.engine.weight_prep import prepare_weights
    from inferflux.formats.loader import load_model
    from inferflux.formats.weights import QuantizedWeight

    weights = load_model(tiny_gguf("llama-q", "Q4_K")).weights
    quantized = {n: w for n, w in weights.items() if isinstance(w, QuantizedWeight) and len(w.shape) == 2}
    prepared = prepare_weights(quantized, jnp.float32, device.GGUF_BLOCKS)
    aliased = [n for n, w in quantized.items() if isinstance(prepared[n], GGUFBlocks)
               and prepared[n].raw.unsafe_buffer_pointer() == np.asarray(w.raw).ctypes.data]
    assert aliased and len(aliased) == len([w for w in quantized.values() if np.asarray(w.raw).ctypes.data % 64 == 0])
    name = aliased[0]  # and the aliased array holds the file's bytes
    np.testing.assert_array_equal(np.asarray(prepared[name].raw).reshape(-1),
                                  np.asarray(quantized[name].raw).view(np.uint8).reshape(-1))
