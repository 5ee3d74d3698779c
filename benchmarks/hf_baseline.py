"""The baseline for `bench_decode`: Hugging Face `transformers`' own `generate` on the same device and shape.

Run from the repository root (needs the test extra: torch and transformers), e.g. on a GPU:
    python -m benchmarks.hf_baseline --shape llama-2-7b --dtype bfloat16 --batch 1,16,64,256 --json hf.json

The model is a randomly initialised `LlamaForCausalLM` of the shape's config, built directly on the device
(weights are noise; cost per token is real), so nothing is downloaded or converted. Reported like
`bench_decode`:
- prefill: one forward pass over a `--prompt-len` prompt with a fresh cache, p50/p99 over `--prefill-runs`;
- decode: per-step time at each batch size with `--context` tokens already cached. `generate` is timed
  with `--decode-steps + 1` new tokens and with 1 new token (prefill + first token); the difference over
  `--decode-steps` is the time of one decode step, so prefill is not counted. Greedy, EOS ignored
  (`min_new_tokens`), the default dynamic cache: what a user of `generate` gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def hf_config(shape: dict[str, Any]):
    """A `LlamaConfig` for one of `benchmarks.make_model.SHAPES`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        rope_theta=shape["rope_theta"], max_position_embeddings=shape["max_position"],
        rms_norm_eps=shape["rms_norm_eps"], tie_word_embeddings=False,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run(shape: str, dtype: str, batches: list[int], context: int, decode_steps: int, prompt_len: int,
        prefill_runs: int, device: str | None = None, seed: int = 0) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.make_model import SHAPES

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    config = hf_config(SHAPES[shape])
    torch.set_default_dtype(torch_dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, config.vocab_size, (batch, length), device=device)

    def generate_time(ids: torch.Tensor, new_tokens: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    prefill = []
    with torch.inference_mode():
        for i in range(prefill_runs + 2):
            ids = prompt(1, prompt_len)
            sync()
            start = time.perf_counter()
            model(ids, use_cache=True)
            sync()
            if i >= 2:  # two warm-ups (cuBLAS heuristics, allocator)
                prefill.append(time.perf_counter() - start)

    decode = []
    for batch in batches:
        ids = prompt(batch, context)
        generate_time(ids, 2)  # warm-up at this batch size
        full = min(generate_time(ids, decode_steps + 1) for _ in range(2))
        first = min(generate_time(ids, 1) for _ in range(2))
        step_s = max(full - first, 1e-9) / decode_steps
        decode.append({"batch": batch, "step_ms": round(step_s * 1e3, 3),
                       "tokens_per_s": round(batch / step_s, 1),
                       "weight_bandwidth_gb_s": round(weight_bytes / step_s / 1e9, 1)})
        print(f"batch {batch}: {step_s * 1e3:.2f} ms/step, {batch / step_s:.1f} tok/s", flush=True)

    return {
        "runtime": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "shape": shape, "dtype": dtype, "weight_bytes": weight_bytes, "context": context,
        "decode_steps": decode_steps,
        "prefill": {"prompt_len": prompt_len, "runs": prefill_runs,
                    "p50_ms": round(statistics.median(prefill) * 1e3, 2),
                    "p99_ms": round(percentile(prefill, 99) * 1e3, 2),
                    "tokens_per_s": round(prompt_len / statistics.median(prefill), 1)},
        "decode": decode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tinyllama-1.1b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", default="1,16,64,256", help="comma-separated batch sizes")
    parser.add_argument("--context", type=int, default=128, help="tokens already in the cache per sequence")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--prefill-runs", type=int, default=20)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    result = run(args.shape, args.dtype, [int(b) for b in args.batch.split(",")], args.context,
                 args.decode_steps, args.prompt_len, args.prefill_runs, args.device)
    pre = result["prefill"]
    print(f"\n{result['runtime']} on {result['device']}, {args.shape} {args.dtype}, "
          f"{result['weight_bytes'] / 2**30:.2f} GiB of weights")
    print(f"prefill {pre['prompt_len']} tokens: p50 {pre['p50_ms']} ms, p99 {pre['p99_ms']} ms "
          f"({pre['tokens_per_s']} tok/s)\n")
    print("| batch | step ms | decode tok/s | weight GB/s |")
    print("| --- | --- | --- | --- |")
    for row in result["decode"]:
        print(f"| {row['batch']} | {row['step_ms']} | {row['tokens_per_s']} | {row['weight_bandwidth_gb_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
