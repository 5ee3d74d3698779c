"""CPU decode step time, before/after the per-step items of the CPU kernels, in one process (ratios, not absolutes).

    python -m benchmarks.bench_cpu_step --make tinyllama-1.1b:Q4_K_M --batch 1,8 --context 128,1024 \\
        --num-pages 80,2048

The 2-core development machine is shared and noisy, so every variant runs in the same process, one after the
other, on the same loaded model, and the table quotes ratios against the first variant. Variants:

- `reference`: the jax.numpy reference attention (`INFERFLUX_CPU_ATTENTION=off`), whose token buckets start at 8
  rows (below that XLA:CPU copies the whole KV cache each step);
- `ffi, 8 rows`: the C++ FFI attention, buckets still starting at 8 (`runtime.min_token_bucket=8`);
- `ffi`: the FFI attention with the default buckets (1 row for a batch-1 step).

The matmul path is whatever `runtime.cpu_kernels` selects (the same for every variant). `--num-pages` then
times batch-1 decode at context 128 with each KV-cache size, for `reference`, `ffi` and `reference, 1 row` (the
reference in a 1-row program, the reverted attempt whose XLA program copied the cache): the step must not grow
with the cache (no copy). Last, the sampler alone: with and without a row asking for top logprobs, and
`jnp.argmax` against the sampler's two-reduction argmax, and one layer's attention alone (reference against
the kernel's paths) at TinyLlama's head shapes. Steps are timed through `ModelRunner.step` (what the
engine sees, `bench_decode`'s decode chunks), the variants' steps interleaved; p50 and min over `--steps`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_decode import DEFAULT_CACHE_DIR, decode_chunks, environment, model_from_spec

VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "reference": ({"INFERFLUX_CPU_ATTENTION": "off"}, {}),
    "ffi, 8 rows": ({}, {"min_token_bucket": 8}),
    "ffi": ({}, {}),
}


def run(model: Path, batches: list[int], contexts: list[int], num_pages: list[int], steps: int,
        overrides: dict[str, str], log) -> dict[str, Any]:
    """Every (variant, batch, context) decode measurement, then the num_pages sweep; returns rows as dicts.

    All runners of a comparison exist at once and their steps are interleaved (variant A, B, C, A, B, C, ...),
    so a change in the machine's load hits every variant alike; p50 per variant over `steps` rounds.
    """
    import jax

    from inferflux.config import load_config
    from inferflux.engine.model_runner import ModelRunner
    from inferflux.formats.loader import load_model

    loaded = load_model(model)
    mc = loaded.config
    rng = np.random.default_rng(0)

    def runner_for(env: dict[str, str], extra: dict[str, Any], pages: int, shapes: list[tuple[int, int]]):
        """A runner with its programs for `shapes` (batch, context) compiled under `env` (read at trace time)."""
        os.environ.pop("INFERFLUX_CPU_ATTENTION", None)
        os.environ.update(env)
        settings = {"max_num_seqs": max(batches), "max_num_batched_tokens": 512, "num_pages": pages,
                    "max_model_len": max(contexts) + 16, **overrides, **extra}
        config = load_config(overrides={f"runtime.{k}": v for k, v in settings.items()})
        runner = ModelRunner(loaded, config.runtime)
        jax.block_until_ready(runner.state)
        for batch, context in shapes:
            runner.program(runner.bucket_for(batch, batch, -(-(context + 1) // runner.page_size)))
        os.environ.pop("INFERFLUX_CPU_ATTENTION", None)
        return runner

    def compare(runners: dict[str, Any], batch: int, context: int, kind: str) -> None:
        chunks = decode_chunks(batch, context, 16, mc.vocab_size, rng)
        times: dict[str, list[float]] = {label: [] for label in runners}
        for rep in range(steps + 2):
            for label, runner in runners.items():
                start = time.perf_counter()
                runner.step(chunks)
                if rep >= 2:  # the first rounds warm caches
                    times[label].append(time.perf_counter() - start)
        for label, runner in runners.items():
            ms = np.array(times[label]) * 1e3
            bucket = runner.bucket_for(batch, batch, max(len(c.pages) for c in chunks))
            row = {"variant": label, "batch": batch, "context": context, "num_pages": runner.num_pages, "kind": kind,
                   "bucket": list(bucket), "step_ms_p50": float(np.median(ms)), "step_ms_min": float(ms.min()),
                   "tokens_per_s": batch / (float(np.median(ms)) / 1e3)}
            rows.append(row)
            log(f"{kind} {label:12s} batch {batch} context {context} pages {runner.num_pages}: "
                f"{row['step_ms_p50']:.2f} ms/step (min {row['step_ms_min']:.2f}), bucket {row['bucket']}")

    rows: list[dict[str, Any]] = []
    shapes = [(b, c) for c in contexts for b in batches]
    need = 1 + max(batches) * -(-(max(contexts) + 1) // 16)
    runners = {label: runner_for(env, extra, max(need, 80), shapes) for label, (env, extra) in VARIANTS.items()}
    for batch, context in shapes:
        compare(runners, batch, context, "decode")
    del runners
    gc.collect()
    context = min(128, max(contexts))
    sweep = {**{label: VARIANTS[label] for label in ("reference", "ffi")},
             "reference, 1 row": (VARIANTS["reference"][0], {"min_token_bucket": 1})}  # the reverted CPU attempt
    runners = {f"{label}, {pages} pages": runner_for(*sweep[label], pages, [(1, context)])
               for label in sweep for pages in num_pages}
    compare(runners, 1, context, "num_pages")
    del runners
    gc.collect()
    sampler = sampler_times(mc.vocab_size, int(overrides.get("max_logprobs", 20)))
    return {"model": str(model), "environment": environment(), "rows": rows, "sampler": sampler,
            "attention": attention_times()}


def sampler_times(vocab: int, num_logprobs: int, repeats: int = 50) -> list[dict[str, Any]]:
    """ms per call of the step's `sample` at batch 1 and 8 (greedy rows), with and without a row asking for
    top logprobs, and of `jnp.argmax` against the sampler's two-reduction `_argmax`."""
    import jax
    import jax.numpy as jnp

    from inferflux.engine import sampler, sampling_rows

    def timed(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / repeats * 1e3

    rows = []
    for batch in (1, 8):
        logits = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, vocab)), jnp.float32)
        hist, is_out = jnp.full((batch, 128), -1, jnp.int32), jnp.zeros((batch, 128), bool)
        step = jax.jit(lambda x, st, h, o: sampler.sample(x, st, h, o, num_logprobs=num_logprobs))
        for asked in (True, False):
            params = [sampling_rows.RowParams(temperature=0.0, seed=i,
                                              top_logprobs=num_logprobs if asked and not i else 0)
                      for i in range(batch)]
            st = sampling_rows.SamplingTensors.from_params(params, batch)
            rows.append({"what": f"sample, top-{num_logprobs} {'asked by a row' if asked else 'not asked'}",
                         "batch": batch, "ms": timed(step, logits, st, hist, is_out)})
        rows.append({"what": "jnp.argmax", "batch": batch, "ms": timed(jax.jit(lambda x: jnp.argmax(x, -1)), logits)})
        rows.append({"what": "sampler._argmax", "batch": batch, "ms": timed(jax.jit(sampler._argmax), logits)})
    return rows


def attention_times(repeats: int = 20) -> list[dict[str, Any]]:
    """ms per call of one layer's attention, TinyLlama heads (32 query / 4 KV heads, head_dim 64, 16-token
    pages): the jitted reference against the FFI kernel (auto: threads; and each ISA path on one thread's share)."""
    import jax
    import jax.numpy as jnp

    from inferflux.kernels import cpu
    from inferflux.kernels.cpu.attention import paged_attention_cpu
    from inferflux.kernels.paged_attention import paged_attention_reference

    def timed(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / repeats * 1e3

    rng = np.random.default_rng(0)
    rows = []
    for name, (seqs, context, per_seq) in {"decode T=1, context 129": (1, 129, 1),
                                           "decode T=8, context 1025": (8, 1025, 1),
                                           "prefill T=512, context 512": (1, 512, 512)}.items():
        per = -(-context // 16)
        pages = jnp.asarray(rng.standard_normal((4, seqs * per + 1, 16, 64)), jnp.float32)
        tables = jnp.asarray(1 + np.arange(seqs * per, dtype=np.int32).reshape(seqs, per))
        seq = jnp.asarray(np.repeat(np.arange(seqs), per_seq).astype(np.int32))
        pos = jnp.asarray(np.tile(np.arange(context - per_seq, context), seqs).astype(np.int32))
        q = jnp.asarray(rng.standard_normal((seqs * per_seq, 32, 64)), jnp.float32)
        args = (q, pages, pages, tables, seq, pos)
        row = {"what": name, "reference": timed(jax.jit(lambda *a: paged_attention_reference(*a, scale=0.125)), *args)}
        for isa in (cpu.Isa.AUTO, cpu.Isa.SCALAR, cpu.Isa.AVX2, cpu.Isa.AVX512_VNNI):
            if isa <= cpu.best_isa():
                fn = jax.jit(lambda *a, isa=isa: paged_attention_cpu(*a, scale=0.125, isa=isa))
                row[isa.name.lower()] = timed(fn, *args)
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = {(r["batch"], r["context"]): r["step_ms_p50"] for r in rows
            if r["kind"] == "decode" and r["variant"] == "reference"}
    lines = ["| variant | batch | context | bucket | step ms p50 | min | tokens/s | vs reference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in rows if r["kind"] == "decode"):
        ratio = base.get((r["batch"], r["context"]), float("nan")) / r["step_ms_p50"]
        lines.append(f"| {r['variant']} | {r['batch']} | {r['context']} | {tuple(r['bucket'])} | "
                     f"{r['step_ms_p50']:.2f} | {r['step_ms_min']:.2f} | {r['tokens_per_s']:.1f} | {ratio:.2f}x |")
    lines += ["", "| variant (batch 1) | num_pages | step ms p50 | min |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['num_pages']} | {r['step_ms_p50']:.2f} | {r['step_ms_min']:.2f} |"
              for r in rows if r["kind"] == "num_pages"]
    lines += ["", "| sampler | batch | ms |", "| --- | --- | --- |"]
    lines += [f"| {r['what']} | {r['batch']} | {r['ms']:.3f} |" for r in result.get("sampler", [])]
    if result.get("attention"):
        keys = [k for k in result["attention"][0] if k != "what"]
        lines += ["", "| one layer's attention, ms | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
        lines += [f"| {r['what']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in result["attention"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path)
    source.add_argument("--make", metavar="SHAPE:QTYPE")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--context", default="128,1024")
    parser.add_argument("--num-pages", default="80,2048")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    ints = [lambda s: [int(x) for x in s.split(",") if x]] * 3
    batches, contexts, pages = (f(v) for f, v in zip(ints, (args.batch, args.context, args.num_pages)))
    model = args.model or model_from_spec(args.make, DEFAULT_CACHE_DIR, log)
    start = time.perf_counter()
    result = run(model, batches, contexts, pages, args.steps, dict(s.split("=", 1) for s in args.set), log)
    result["seconds"] = time.perf_counter() - start
    result["command"] = "python -m benchmarks.bench_cpu_step " + " ".join(sys.argv[1:] if argv is None else argv)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
