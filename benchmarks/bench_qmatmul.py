"""One quantized matrix on the CPU kernel (`inferflux_qmatmul_v1`): CPU time per call by type and row count,
XLA's float32 product of the same matrix beside it, and fused vs separate q|k|v and gate|up calls.

    python -m benchmarks.bench_qmatmul --rows 1,8,64,512 --types Q4_K,Q6_K --f32
    INFERFLUX_QMM_PANEL_ROWS=0 python -m benchmarks.bench_qmatmul ...   # the row path at every M
    python -m benchmarks.bench_qmatmul --fusion --rows 1,8,512
    python -m benchmarks.bench_qmatmul --stream --layers 8 --rows 1,8 --repeats 21   # weights from DRAM

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

from inferflux.kernels.cpu.qmatmul import GGUFBlocks, qmatmul

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


def stream(types: list[T], rows: list[int], n: int, k: int, layers: int, repeats: int) -> None:
    """Decode-step conditions: `layers` distinct matrices chained in one program (more bytes than the L3 cache
    holds), wall time per matrix (p50) and the weight bytes read per second, against this process's read
    bandwidth (numpy sums of a 1 GiB array on as many threads as XLA's pool has)."""
    rng = np.random.default_rng(0)
    print(f"read bandwidth: {read_bandwidth():.1f} GB/s")
    print("| type | M | wall ms per matrix (p50) | weights GB/s |")
    print("| --- | --- | --- | --- |")
    for qtype in types:
        raws = [random_blocks(qtype, n, k, rng) for _ in range(layers)]
        ws = [GGUFBlocks(jnp.asarray(r), qtype, (n, k)) for r in raws]
        nbytes = sum(r.nbytes for r in raws)

        def chain(x, ws):
            for w in ws:  # each product feeds the next input, so no call can be skipped or reordered
                x = x + 1e-9 * qmatmul(x, w)[:, :k]
            return x

        fn = jax.jit(chain)
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            jax.block_until_ready(fn(x, ws))
            walls = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(x, ws))
                walls.append(time.perf_counter() - start)
            p50 = sorted(walls)[len(walls) // 2]
            print(f"| {qtype.name} | {m} | {p50 * 1e3 / layers:.3f} | {nbytes / p50 / 1e9:.1f} |", flush=True)


def read_bandwidth() -> float:
    """GB/s of numpy sums over a 1 GiB float32 array split across the CPU's cores (best of 4)."""
    import os
    import threading

    a = np.ones(1 << 28, np.float32)
    parts = np.array_split(a, max(1, len(os.sched_getaffinity(0))))
    best = 0.0
    for _ in range(4):
        threads = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def fusion(rows: list[int], layers: int, repeats: int) -> None:
    """q|k|v (2048 + 256 + 256 rows) and gate|up (2 x 5632) of 2048 columns, Q4_K: one call or one per matrix."""
    rng = np.random.default_rng(0)
    k = 2048
    print("| matrices | M | separate ms per layer (p50) | fused (p50) | separate / fused |")
    print("| --- | --- | --- | --- | --- |")
    for name, sizes in (("q|k|v", [2048, 256, 256]), ("gate|up", [5632, 5632])):
        raws = [[random_blocks(T.Q4_K, n, k, rng) for n in sizes] for _ in range(layers)]
        separate = [[GGUFBlocks(jnp.asarray(r), T.Q4_K, (r.shape[0], k)) for r in layer] for layer in raws]
        fused = [GGUFBlocks(jnp.asarray(np.concatenate(layer)), T.Q4_K, (sum(sizes), k)) for layer in raws]

        def run_separate(x, ws):
            for layer in ws:
                ys = [qmatmul(x, w) for w in layer]
                x = x + 1e-9 * sum(y[:, :256].sum(-1, keepdims=True) for y in ys)
            return x

        def run_fused(x, ws):
            for w in ws:
                x = x + 1e-9 * qmatmul(x, w)[:, :256].sum(-1, keepdims=True)
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
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if args.fusion:
        fusion(rows, args.layers, max(args.repeats, 9))
        return 0
    n, k = (int(v) for v in args.shape.split("x"))
    if args.stream:
        stream([T[t] for t in args.types.split(",")], rows, n, k, args.layers, args.repeats)
        return 0
    per_type([T[t] for t in args.types.split(",")], rows, n, k, args.f32, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
