"""Overlapped steps (`runtime.overlap_steps`, docs/runtime.md) against unchained steps, in one process.

One engine generates the same greedy batch again and again, switching chaining on and off between rounds
(`EngineCore.max_chained_seqs`), so both sides share the machine's noise. Prints decode tokens/s per side,
the ratio, and how many steps were chained.

    python -m benchmarks.bench_overlap --make tinyllama-1.1b:Q4_K_M --batch 1,8 --max-tokens 64 --rounds 5
"""

from __future__ import annotations

import argparse
import time

from benchmarks.bench_decode import DEFAULT_CACHE_DIR, model_from_spec
from inferflux import LLM, SamplingParams
from inferflux.config import load_config


def run(llm: LLM, batch: int, max_tokens: int, rounds: int) -> tuple[float, float, int]:
    """Best tokens/s unchained and chained over `rounds` alternating rounds, and the steps chained."""
    prompts = [[1 + (7 * i + j) % 900 for j in range(32)] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    core = llm.engine
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # compile, warm
    best = {0: 0.0, 1 << 30: 0.0}
    chained = 0
    for _ in range(rounds):
        for limit in best:
            core.max_chained_seqs = limit
            before = core.overlapped_steps
            start = time.perf_counter()
            llm.generate(prompts, params)
            best[limit] = max(best[limit], batch * max_tokens / (time.perf_counter() - start))
            chained += core.overlapped_steps - before
    return best[0], best[1 << 30], chained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file or Hugging Face folder")
    parser.add_argument("--make", help="random-weight model from benchmarks.make_model, e.g. tinyllama-1.1b:Q4_K_M")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not (args.model or args.make):
        parser.error("give --model or --make")
    model = args.model or model_from_spec(args.make, DEFAULT_CACHE_DIR)
    batches = [int(b) for b in args.batch.split(",")]
    cfg = load_config(overrides={"runtime.max_num_seqs": max(batches), "runtime.max_model_len": 512,
                                 "runtime.warmup": True})
    llm = LLM(model, cfg)
    print("| batch | unchained tok/s | chained tok/s | chained / unchained | steps chained |")
    print("| --- | --- | --- | --- | --- |")
    for batch in batches:
        off, on, chained = run(llm, batch, args.max_tokens, args.rounds)
        print(f"| {batch} | {off:.1f} | {on:.1f} | {on / off:.2f} | {chained} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
