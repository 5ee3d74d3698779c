"""Offline throughput: N prompts through `LLM.generate`, reporting requests/s and tokens/s.

Run from the repository root, e.g.
    python -m benchmarks.throughput --make tiny --num-prompts 64 --input-len 128 --output-len 64
    python -m benchmarks.throughput --model path/to/model.gguf --dist uniform --input-len 256

`--make tiny|100m` builds a random-weight Llama (`inferctl make-demo-model` with a given shape) in a
temporary folder, so nothing is downloaded. Greedy decoding with `ignore_eos`, so every request produces
exactly its output length. The first pass over the batch compiles the shape buckets and is not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4),
    "100m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4),
}


def lengths(dist: str, mean: int, count: int, rng: np.random.Generator) -> list[int]:
    if dist == "fixed":
        return [mean] * count
    return [int(x) for x in rng.integers(max(1, mean // 2), mean * 3 // 2 + 1, size=count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="GGUF file or Hugging Face folder")
    source.add_argument("--make", choices=sorted(SHAPES), help="build a random-weight model of this size")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dist", choices=["fixed", "uniform"], default="fixed",
                        help="fixed lengths, or uniform in [len/2, 3*len/2]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="runtime config override, e.g. max_num_seqs=64 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)

    from inferflux import LLM, SamplingParams

    model = args.model
    if args.make:
        from inferflux.convert.demo_model import make_demo_model

        model = make_demo_model(Path(tempfile.mkdtemp()) / args.make, **SHAPES[args.make])
    overrides = dict(item.split("=", 1) for item in args.set)
    max_len = int(args.input_len * (1.5 if args.dist == "uniform" else 1)) + int(
        args.output_len * (1.5 if args.dist == "uniform" else 1)) + 1
    overrides.setdefault("max_model_len", str(max_len))
    llm = LLM(model, **overrides)
    rng = np.random.default_rng(args.seed)
    vocab = llm.model.config.vocab_size
    in_lens = lengths(args.dist, args.input_len, args.num_prompts, rng)
    out_lens = lengths(args.dist, args.output_len, args.num_prompts, rng)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]

    def random_prompts() -> list[list[int]]:
        return [[int(t) for t in rng.integers(0, vocab, size=n)] for n in in_lens]

    # Warm-up pass compiles every bucket this workload touches; the timed pass uses fresh prompts of the
    # same lengths, so the prefix cache gives it nothing.
    llm.generate(random_prompts(), params)
    prompts = random_prompts()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    total = generated + sum(in_lens)
    result = {
        "model": str(args.make or args.model),
        "parameters": int(sum(int(np.prod(w.shape)) for w in llm.model.weights.values())),
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "dist": args.dist, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(args.num_prompts / elapsed, 3),
        "output_tokens_per_s": round(generated / elapsed, 1),
        "total_tokens_per_s": round(total / elapsed, 1),
        "runtime": {k: getattr(llm.config.runtime, k) for k in ("max_num_seqs", "max_num_batched_tokens",
                                                                  "page_size", "max_model_len")},
    }
    print("| model | params | prompts | in/out | requests/s | output tok/s | total tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {result['model']} | {result['parameters'] / 1e6:.1f}M | {args.num_prompts} | "
          f"{args.input_len}/{args.output_len} ({args.dist}) | {result['requests_per_s']} | "
          f"{result['output_tokens_per_s']} | {result['total_tokens_per_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
