"""`inferctl bench NAME [FLAGS]`: the scripts of `benchmarks/`, reachable from the installed CLI.

Each benchmark is an argparse program (`python -m benchmarks.NAME --help` is the same thing); this
only dispatches, so a flag means the same in both places and every figure in benchmarks/RESULTS.md can
be reproduced with either spelling.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "serving": ("benchmarks.bench_serving", "drive an OpenAI-compatible server: TTFT, TPOT, ITL, throughput"),
    "decode": ("benchmarks.bench_decode", "prefill and decode tokens/s and memory bandwidth, no HTTP"),
    "side-by-side": ("benchmarks.side_by_side", "the same GGUF through llama.cpp's server and InferFlux"),
    "make-model": ("benchmarks.make_model", "random-weight GGUF models of real shapes (TinyLlama, Llama 2/3)"),
    "throughput": ("benchmarks.throughput", "offline LLM.generate throughput"),
    "embeddings": ("benchmarks.embeddings", "embeddings/s beside sentence-transformers"),
    "hf-baseline": ("benchmarks.hf_baseline", "transformers' own generate, the decode baseline"),
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: inferctl bench NAME [FLAGS]   (inferctl bench NAME --help for its flags)", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in BENCHMARKS.items()]
    return "\n".join(lines)


def bench(argv: list[str]) -> int:
    """Run benchmark `argv[0]` with the remaining arguments; exit status 2 with the list for an unknown one."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        print(f"inferctl bench: unknown benchmark {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    sys.argv[0] = f"inferctl bench {argv[0]}"  # argparse's usage lines name the command the user typed
    return int(module.main(argv[1:]) or 0)
