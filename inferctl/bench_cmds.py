"""`inferctl bench NAME [FLAGS]`: the scripts of `benchmarks/`, reachable from the CLI.

Each benchmark is an argparse program (`python -m benchmarks.NAME --help` is the same thing); this
only dispatches, so a flag means the same in both places and every figure in benchmarks/RESULTS.md can
be reproduced with either spelling.

The benchmarks are not installed with the package: they live in the source checkout beside the results
they produced (benchmarks/RESULTS.md), most need the test extras (llama.cpp, transformers, torch), and a
wheel must not claim the top-level name `benchmarks`. So `inferctl bench` imports them from the checkout
this `inferctl` belongs to (an editable install), from any folder; with a wheel install it says where to
get them instead of failing on an import.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = {
    "serving": ("benchmarks.bench_serving", "drive an OpenAI-compatible server: TTFT, TPOT, ITL, throughput"),
    "decode": ("benchmarks.bench_decode", "prefill and decode tokens/s and memory bandwidth, no HTTP"),
    "side-by-side": ("benchmarks.side_by_side", "the same GGUF through llama.cpp's server and InferFlux"),
    "make-model": ("benchmarks.make_model", "random-weight GGUF models of real shapes (TinyLlama, Llama 2/3)"),
    "throughput": ("benchmarks.throughput", "offline LLM.generate throughput"),
    "embeddings": ("benchmarks.embeddings", "embeddings/s beside sentence-transformers"),
    "hf-baseline": ("benchmarks.hf_baseline", "transformers' own generate, the decode baseline"),
}


NOT_INSTALLED = (
    "the benchmarks run from a source checkout of InferFlux (they are not part of the installed package): "
    "clone the repository, `pip install -e '.[test]'` in it, then run `inferctl bench NAME` "
    "(or `python -m benchmarks.NAME`) there"
)


def source_checkout(here: Path | None = None) -> Path | None:
    """The checkout holding `benchmarks/` next to this `inferctl/`, or None (installed from a wheel)."""
    root = (here or Path(__file__)).resolve().parents[1]
    return root if (root / "benchmarks" / "__init__.py").is_file() else None


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    checkout = source_checkout()
    lines = ["usage: inferctl bench NAME [FLAGS]   (inferctl bench NAME --help for its flags)", "",
             f"from {checkout / 'benchmarks'}" if checkout else f"note: {NOT_INSTALLED}", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in BENCHMARKS.items()]
    return "\n".join(lines)


def load_benchmark(module: str) -> ModuleType | None:
    """`benchmarks.X` as importable here, else from this inferctl's checkout; None when there is none."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks":
            raise
    checkout = source_checkout()
    if checkout is None:
        return None
    sys.path.insert(0, str(checkout))
    return importlib.import_module(module)


def bench(argv: list[str]) -> int:
    """Run benchmark `argv[0]` with the remaining arguments; exit status 2 with the list for an unknown one."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        print(f"inferctl bench: unknown benchmark {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = load_benchmark(BENCHMARKS[argv[0]][0])
    if module is None:
        print(f"inferctl bench: {NOT_INSTALLED}", file=sys.stderr)
        return 2
    sys.argv[0] = f"inferctl bench {argv[0]}"  # argparse's usage lines name the command the user typed
    return int(module.main(argv[1:]) or 0)
