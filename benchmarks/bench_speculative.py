"""Speculative decoding (n-gram prompt lookup): latency with and without it, side by side in one run.

    python -m benchmarks.bench_speculative --make tinyllama-1.1b:Q4_K_M --attention-scale 0 --max-tokens 128
    python -m benchmarks.bench_speculative --make tinyllama-1.1b:Q4_K_M --requests 4 --max-tokens 64
    python -m benchmarks.bench_speculative --model path/to/model.gguf --set max_num_batched_tokens=256

One engine (`speculative.method: ngram`) serves every request; the "off" runs send the per-request opt-out
(`SamplingParams(speculative=False)`), so both modes use the same process, weights, compiled programs and
machine state, and on/off requests alternate (the machine is shared and noisy: compare the ratios of one
run, not absolute times across runs). Requests run one at a time (batch 1: the latency case speculation is
for), greedy, `ignore_eos`, `--max-tokens` each.

Workloads:

- grounded: the answer repeats text the prompt holds. The benchmark models are random-weight files, which
  do not quote their prompt the way a trained model summarising or editing a text does, so the prompt is
  made to hold the model's own answer: first its greedy continuation G of a random text P is generated
  (speculation off), then the request is P + G + P. Continuing P the second time, the model tends to say
  G again, as a trained model answering from its context does.
- free: a random text of the same length, answered from nothing in it.
- loop: a prompt cycling four tokens, and a logit bias that keeps the answer among them, so the (random)
  model's greedy answer falls into a loop that prompt lookup predicts: what speculation gains on this
  machine when most proposals are accepted, whatever the model.

Random-weight models neither copy their context nor (with a 32k vocabulary) loop within a few dozen
tokens, so on them grounded and free find no proposals at all (reported as draft_tokens 0): they measure
what speculation costs when it has nothing to propose, and loop what it gains when it has. With
`--attention-scale 0` (`make_gguf`: every attn_output matrix zero, the same bytes and cost) the model's next
token depends on the current token only, so continuing P the second time it says G again, exactly: the
grounded workload then has the answer-repeats-the-prompt property a trained model summarising or editing a
text has (more perfectly: expect higher acceptance than a real edit). A small nonzero scale (0.001) copies
for a while and then drifts.

Reported per workload and mode: median end-to-end latency, median TPOT ((e2e - TTFT) / (tokens - 1)),
median TTFT, tokens/s; with speculation also the acceptance rate (accepted / proposed tokens), the tokens
emitted per verification, and whether the outputs were token-identical to the "off" runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_decode import DEFAULT_CACHE_DIR, environment, model_from_spec


def _run(llm: Any, prompt: list[int], params: Any) -> tuple[list[int], dict[str, float]]:
    """One request through the offline engine; its tokens and timings (seconds)."""
    tokens: list[int] = []
    last = None
    for out in llm.stream(prompt, params):
        tokens += out.new_token_ids
        last = out
    assert last is not None and last.first_token_time is not None and last.last_token_time is not None
    e2e = last.last_token_time - last.arrival_time
    ttft = last.first_token_time - last.arrival_time
    tpot = (e2e - ttft) / max(1, len(tokens) - 1)
    return tokens, {"e2e_s": e2e, "ttft_s": ttft, "tpot_s": tpot, "tokens": len(tokens)}


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 4)

    total_tokens = sum(r["tokens"] for r in rows)
    return {"e2e_s": med("e2e_s"), "tpot_s": med("tpot_s"), "ttft_s": med("ttft_s"),
            "tokens_per_s": round(total_tokens / sum(r["e2e_s"] for r in rows), 2)}


def run_bench(model: str | Path, requests: int = 4, max_tokens: int = 64, prompt_len: int = 128,
              overrides: dict[str, str] | None = None, spec: dict[str, Any] | None = None, seed: int = 0,
              log: Any = None) -> dict[str, Any]:
    from inferflux import LLM, SamplingParams
    from inferflux.config import load_config

    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4,
            **(spec or {})}
    # Prefix caching off: each mode runs the same prompts, and the second run must not find the first's pages.
    settings = {"runtime.max_model_len": 2048, "runtime.max_num_seqs": 4, "runtime.max_num_batched_tokens": 256,
                "runtime.prefix_caching": False,
                **{(k if "." in k else f"runtime.{k}"): v for k, v in (overrides or {}).items()},
                **{f"speculative.{k}": v for k, v in spec.items()}}
    config = load_config(overrides=settings)
    llm = LLM(model, config)
    vocab = llm.model.config.vocab_size
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    off = dataclasses.replace(params, speculative=False)  # builds the grounded prompts

    def say(line: str) -> None:
        if log:
            log(line)

    workloads: dict[str, list[tuple[list[int], Any]]] = {"grounded": [], "free": [], "loop": []}
    for _ in range(requests):
        text = [int(t) for t in rng.integers(100, vocab, prompt_len)]
        answer, _ = _run(llm, text, off)
        workloads["grounded"].append((text + answer + text, params))
        workloads["free"].append(([int(t) for t in rng.integers(100, vocab, 2 * prompt_len + max_tokens)], params))
        cycle = [int(t) for t in rng.choice(np.arange(100, vocab), 4, replace=False)]
        biased = dataclasses.replace(params, logit_bias={t: 30.0 for t in cycle})
        workloads["loop"].append(((cycle * prompt_len)[:2 * prompt_len + max_tokens], biased))
    # Warm-up: every prompt once in each mode, so the programs the measured runs use (prefill buckets, verify
    # programs per row count) are compiled before anything is timed.
    start = time.perf_counter()
    for prompts in workloads.values():
        for prompt, p in prompts:
            _run(llm, prompt, p)
            _run(llm, prompt, dataclasses.replace(p, speculative=False))
    say(f"warm-up {time.perf_counter() - start:.1f} s")

    result: dict[str, Any] = {"model": str(model), "requests": requests, "max_tokens": max_tokens,
                              "speculative": spec, "settings": settings, "environment": environment(),
                              "workloads": {}}
    for name, prompts in workloads.items():
        rows: dict[str, list[dict[str, float]]] = {"off": [], "ngram": []}
        identical = True
        before = llm.engine.stats()
        for i, (prompt, on_params) in enumerate(prompts):
            off_params = dataclasses.replace(on_params, speculative=False)
            order = [("off", off_params), ("ngram", on_params)]
            if i % 2:
                order.reverse()
            outs = {}
            for mode, p in order:
                outs[mode], timing = _run(llm, prompt, p)
                rows[mode].append(timing)
                say(f"{name} #{i} {mode}: e2e {timing['e2e_s']:.3f} s, tpot {timing['tpot_s'] * 1000:.1f} ms")
            identical &= outs["off"] == outs["ngram"]
        after = llm.engine.stats()
        drafted = after.spec_draft_tokens - before.spec_draft_tokens
        accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
        drafts = after.spec_num_drafts - before.spec_num_drafts
        on, base = _summary(rows["ngram"]), _summary(rows["off"])
        result["workloads"][name] = {
            "off": base, "ngram": on,
            "e2e_ratio": round(on["e2e_s"] / base["e2e_s"], 3), "tpot_ratio": round(on["tpot_s"] / base["tpot_s"], 3),
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "tokens_per_verification": round(1 + accepted / drafts, 2) if drafts else None,
            "draft_tokens": drafted, "accepted_tokens": accepted, "token_identical": identical,
        }
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| workload | mode | e2e p50 (s) | TPOT p50 (ms) | TTFT p50 (s) | tokens/s | e2e ratio | acceptance "
             "| tokens/verification | identical |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, w in result["workloads"].items():
        for mode in ("off", "ngram"):
            m = w[mode]
            extra = (f"{w['e2e_ratio']} | {w['acceptance_rate']} | {w['tokens_per_verification']} | "
                     f"{w['token_identical']}") if mode == "ngram" else " | | |"
            lines.append(f"| {name} | {mode} | {m['e2e_s']} | {m['tpot_s'] * 1000:.1f} | {m['ttft_s']} | "
                         f"{m['tokens_per_s']} | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a GGUF file or Hugging Face folder")
    source.add_argument("--make", metavar="SHAPE:QTYPE", help="a random-weight GGUF from benchmarks.make_model")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--requests", type=int, default=4, help="requests per workload and mode")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens of random text per prompt")
    parser.add_argument("--k", type=int, default=4, help="speculative.num_speculative_tokens")
    parser.add_argument("--attention-scale", type=float, default=1.0,
                        help="with --make: attn_output scaled by this (0: a model that repeats its own text)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="runtime settings")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    model = args.model or model_from_spec(args.make, args.cache_dir, log, args.attention_scale)
    overrides = dict(item.split("=", 1) for item in args.set)
    result = run_bench(model, args.requests, args.max_tokens, args.prompt_len, overrides,
                       {"num_speculative_tokens": args.k}, log=log)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["workloads"], indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
