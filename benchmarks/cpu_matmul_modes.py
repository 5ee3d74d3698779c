"""CPU decode and prefill steps per `runtime.cpu_kernels` mode, with process CPU time next to wall time.

    python -m benchmarks.cpu_matmul_modes --model /tmp/bench-models/tinyllama-1.1b-Q4_K_M.gguf \\
        --modes auto,off --batch 1,8 --prefill 64

On a shared machine wall time per step swings with other processes' load; the process's CPU time per step
(user + system, all threads, `getrusage`) swings much less, so both are reported. Each mode loads the model
in its own runner, one after the other in this process; compare ratios within one run. A decode step is
`--batch` sequences each adding one token at position 100; a prefill step is one sequence's `--prefill`
tokens. The resident set size after loading is reported per mode (the `off` mode holds float32 weights).
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path

from inferflux.config import load_config
from inferflux.engine.model_runner import Chunk, ModelRunner
from inferflux.engine.sampling_rows import RowParams
from inferflux.formats.loader import load_model


def _rss_gb(field: str = "VmRSS") -> float:
    """Resident set size now (VmRSS) or its peak so far (VmHWM), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _time(runner: ModelRunner, chunks: list[Chunk], steps: int) -> tuple[float, float]:
    """(min wall ms, mean CPU ms) per step, after two untimed steps (the first compiles)."""
    for _ in range(2):
        runner.step(chunks)
    walls, r0 = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        runner.step(chunks)
        walls.append(time.perf_counter() - start)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return min(walls) * 1e3, cpu / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--modes", default="auto,off")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prefill", type=int, default=64, help="tokens of one prefill step (0: none)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    print("| mode | layout | RSS after load GB | RSS after the steps GB | step | wall ms (min) | CPU ms (mean) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        overrides = {"runtime.cpu_kernels": mode, "runtime.num_pages": 80, "runtime.max_model_len": 512,
                     "runtime.max_num_seqs": max(batches), "runtime.max_num_batched_tokens": max(64, args.prefill)}
        runner = ModelRunner(load_model(args.model), load_config(overrides=overrides).runtime)
        rss = _rss_gb()
        rows = []
        for b in batches:
            chunks = [Chunk(tokens=[5], start_pos=100, pages=list(range(1 + 8 * i, 9 + 8 * i)), history=[5],
                            num_prompt=1, sampling=RowParams(temperature=0.0)) for i in range(b)]
            rows.append((f"decode batch {b}", *_time(runner, chunks, args.steps)))
        if args.prefill:
            n = args.prefill
            chunk = [Chunk(tokens=[5] * n, start_pos=0, pages=list(range(1, 1 + -(-n // runner.page_size))),
                           history=[5] * n, num_prompt=n, sampling=RowParams(temperature=0.0))]
            rows.append((f"prefill {n} tokens", *_time(runner, chunk, args.steps)))
        after = _rss_gb()
        for name, wall, cpu in rows:
            print(f"| {mode} | {runner.weight_layout} | {rss:.2f} | {after:.2f} | {name} | {wall:.1f} | {cpu:.1f} |",
                  flush=True)
        del runner
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
