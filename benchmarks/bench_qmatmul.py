"""One quantized matrix on the CPU kernel (`inferflux_qmatmul_v2`): CPU time per call by type and row count,
XLA's float32 product of the same matrix beside it, and fused vs separate q|k|v and gate|up calls.

    python -m benchmarks.bench_qmatmul --rows 1,8,64,512 --types Q4_K,Q6_K --f32
    INFERFLUX_QMM_PANEL_ROWS=0 python -m benchmarks.bench_qmatmul ...   # the row path at every M
    python -m benchmarks.bench_qmatmul --fusion --rows 1,8,512
    python -m benchmarks.bench_qmatmul --stream --layers 8 --rows 1,8 --repeats 21   # weights from DRAM
    python -m benchmarks.bench_qmatmul --stream --baseline-lib /tmp/old/_inferflux_cpu.so ...   # A/B two builds

CPU time (user + system of the process, all threads, `getrusage`) is the figure to read on a shared machine:
wall time swings with other processes' load. The matrix is random GGUF blocks of the FFN shape of
TinyLlama-1.1B (5632 x 2048) unless --shape says otherwise. The fusion comparison interleaves the two
programs call by call (each holds --layers layers' worth of calls, chained so none can be skipped).
"""

from __future__ import annotations

import argparse
import resource
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_decode import read_bandwidth
from inferflux.kernels.cpu.qmatmul import GGUFBlocks, qmatmul, qmatmul_many

T = gguf.GGMLQuantizationType


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes with finite, small f16 scales (as tests/test_cpu_kernels.py makes them)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    offsets = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}.get(qtype, (0,))
    for offset in offsets:
        scales = rng.uniform(-0.02, 0.02, raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def _cpu_ms(fn, *args, repeats: int) -> float:
    """Median CPU ms of `repeats` calls after one untimed call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        jax.block_until_ready(fn(*args))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        times.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    return sorted(times)[len(times) // 2] * 1e3


def per_type(types: list[T], rows: list[int], n: int, k: int, f32: bool, repeats: int) -> None:
    rng = np.random.default_rng(0)
    kernel = jax.jit(qmatmul)
    dense = jax.jit(lambda a, b: a @ b.T)
    print("| type | M | CPU ms per call | GOP per CPU-second |" + (" float32 CPU ms |" if f32 else ""))
    print("| --- | --- | --- | --- |" + (" --- |" if f32 else ""))
    for qtype in types:
        raw = random_blocks(qtype, n, k, rng)
        w = GGUFBlocks(jnp.asarray(raw), qtype, (n, k))
        wf = jnp.asarray(gguf.quants.dequantize(raw, qtype).reshape(n, k)) if f32 else None
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            ms = _cpu_ms(kernel, x, w, repeats=repeats)
            line = f"| {qtype.name} | {m} | {ms:.2f} | {2 * m * n * k / ms / 1e6:.0f} |"
            if wf is not None:
                line += f" {_cpu_ms(dense, x, wf, repeats=repeats):.2f} |"
            print(line, flush=True)


def stream(types: list[T], rows: list[int], n: int, k: int, layers: int, repeats: int,
           baseline: str | None = None) -> None:
    """Decode-step conditions: `layers` distinct matrices chained in one program (more bytes than the L3 cache
    holds), wall time per matrix (p50) and the weight bytes read per second, against this process's read
    bandwidth. With `baseline` (another build of the kernel library, e.g. the previous commit's), the same
    chain runs on its `inferflux_qmatmul_v2` too, call for call interleaved with ours in this process (both see
    the same machine load), and the two must give the same bits."""
    rng = np.random.default_rng(0)
    print(f"read bandwidth: {read_bandwidth():.1f} GB/s")
    kernels = {"this build": qmatmul}
    if baseline:
        kernels = {"baseline": _baseline_qmatmul(baseline), **kernels}
    print("| type | M | " + " | ".join(f"{name}: ms per matrix (p50) | GB/s" for name in kernels)
          + (" | baseline / this build |" if baseline else " |"))
    print("| --- | --- |" + " --- | --- |" * len(kernels) + (" --- |" if baseline else ""))
    for qtype in types:
        raws = [random_blocks(qtype, n, k, rng) for _ in range(layers)]
        ws = [GGUFBlocks(jnp.asarray(r), qtype, (n, k)) for r in raws]
        nbytes = sum(r.nbytes for r in raws)

        def chain(fn):
            def run(x, mats):
                for w in mats:  # each product feeds the next input, so no call can be skipped or reordered
                    x = x + 1e-9 * fn(x, w)[:, :k]
                return x
            return jax.jit(run)

        fns = {name: chain(fn) for name, fn in kernels.items()}
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            outs = [np.asarray(fn(x, ws)) for fn in fns.values()]
            assert all(np.array_equal(outs[0], o) for o in outs[1:]), "the builds give different results"
            walls: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fn(x, ws))
                    walls[name].append(time.perf_counter() - start)
            p50 = {name: sorted(v)[len(v) // 2] for name, v in walls.items()}
            cells = " | ".join(f"{p50[name] * 1e3 / layers:.3f} | {nbytes / p50[name] / 1e9:.1f}" for name in fns)
            ratio = f" {p50['baseline'] / p50['this build']:.2f} |" if baseline else ""
            print(f"| {qtype.name} | {m} | {cells} |{ratio}", flush=True)


def _baseline_qmatmul(path: str):
    """`qmatmul` through another build's handler, registered under its own target name."""
    import ctypes

    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target("baseline_qmatmul", jax.ffi.pycapsule(lib.inferflux_qmatmul_v2), platform="cpu")

    def run(x, w):
        return jax.ffi.ffi_call("baseline_qmatmul", jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))(
            x, jnp.int32(x.shape[0]), w.raw, qtypes=np.array([int(w.qtype)], np.int64), isa=np.int64(0))
    return run


def fusion(rows: list[int], layers: int, repeats: int) -> None:
    """q|k|v (2048 + 256 + 256 rows) and gate|up (2 x 5632) of 2048 columns, Q4_K: one call per matrix, or
    one `qmatmul_many` call for the group (what the model does)."""
    rng = np.random.default_rng(0)
    k = 2048
    print("| matrices | M | separate ms per layer (p50) | fused (p50) | separate / fused |")
    print("| --- | --- | --- | --- | --- |")
    for name, sizes in (("q|k|v", [2048, 256, 256]), ("gate|up", [5632, 5632])):
        raws = [[random_blocks(T.Q4_K, n, k, rng) for n in sizes] for _ in range(layers)]
        separate = [[GGUFBlocks(jnp.asarray(r), T.Q4_K, (r.shape[0], k)) for r in layer] for layer in raws]
        fused = separate

        def run_separate(x, ws):
            for layer in ws:
                ys = [qmatmul(x, w) for w in layer]
                x = x + 1e-9 * sum(y[:, :256].sum(-1, keepdims=True) for y in ys)
            return x

        def run_fused(x, ws):
            for layer in ws:
                ys = qmatmul_many(x, layer)
                x = x + 1e-9 * sum(y[:, :256].sum(-1, keepdims=True) for y in ys)
            return x

        fs, ff = jax.jit(run_separate), jax.jit(run_fused)
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            jax.block_until_ready(fs(x, separate))
            jax.block_until_ready(ff(x, fused))
            walls: dict[str, list[float]] = {"separate": [], "fused": []}
            for _ in range(repeats):  # interleaved: both see the same load
                for tag, fn, ws in (("separate", fs, separate), ("fused", ff, fused)):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(x, ws))
                    walls[tag].append((time.perf_counter() - start) * 1e3 / layers)
            p50 = {tag: sorted(v)[len(v) // 2] for tag, v in walls.items()}
            print(f"| {name} | {m} | {p50['separate']:.3f} | {p50['fused']:.3f} | "
                  f"{p50['separate'] / p50['fused']:.2f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,IQ4_XS")
    parser.add_argument("--rows", default="1,8,64,512", help="activation rows M")
    parser.add_argument("--shape", default="5632x2048", help="N x K of the matrix")
    parser.add_argument("--f32", action="store_true", help="also time XLA's float32 product")
    parser.add_argument("--fusion", action="store_true", help="fused vs separate projections instead")
    parser.add_argument("--stream", action="store_true",
                        help="wall time over --layers distinct matrices per type (weights streamed from memory)")
    parser.add_argument("--baseline-lib", default=None,
                        help="with --stream: another build of _inferflux_cpu*.so to time beside this one")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if args.fusion:
        fusion(rows, args.layers, max(args.repeats, 9))
        return 0
    n, k = (int(v) for v in args.shape.split("x"))
    if args.stream:
        stream([T[t] for t in args.types.split(",")], rows, n, k, args.layers, args.repeats, args.baseline_lib)
        return 0
    per_type([T[t] for t in args.types.split(",")], rows, n, k, args.f32, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
