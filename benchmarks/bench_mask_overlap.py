"""Where a constrained decode step's host time goes, and whether the grammar mask could hide behind other work.

    python -m benchmarks.bench_mask_overlap                 # tiny model, batch 1 and 8, and a 128k vocabulary

Why: the issue asks that the mask for step n+1 overlap step n's device work where possible. The mask of step
n+1 depends on step n's sampled token, so it can only start once step n's tokens are back on the host; what
could overlap it is the rest of the host work before step n+1 runs (accepting the tokens, scheduling,
`_pack`). This measures, per decode step of the whole engine loop (`LLM.generate`, JSON schema on every
row): the step's wall time, `_pack`, `_advance_grammars` and inside it `fill_masks`; then whether xgrammar's
`batch_fill_next_token_bitmask` releases the GIL (a pure-Python loop on the main thread while a worker
thread fills masks: parallel if the sum of both alone is well above the time together), and the fill's cost
on a 128k-entry vocabulary (bench_grammar's synthetic one), where masks cost the most.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}},
    "required": ["name", "n", "score", "tags"]}


def _timed(obj: Any, name: str, key: str, into: dict[str, list[float]]) -> None:
    inner: Callable[..., Any] = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into[key].append(time.perf_counter() - t)

    setattr(obj, name, wrapper)


def engine_steps(batch: int, max_tokens: int = 48) -> dict[str, Any]:
    from inferflux import LLM, Constraint, SamplingParams
    from tests.fixtures import tokenizers as fx
    from tests.fixtures.models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("llama", Path(tmp) / "m", fx.make_llama3_bpe_tokenizer(Path(tmp) / "tok"))
        llm = LLM(model, page_size=16, max_num_seqs=batch, max_num_batched_tokens=max(64, batch),
                  max_model_len=256, num_pages=64 * batch)
        params = SamplingParams(n=batch, temperature=1.0, seed=1, max_tokens=max_tokens,
                                constraint=Constraint.json_schema(SCHEMA))
        llm.generate("JSON:", params)  # compile the programs and the grammar
        times: dict[str, list[float]] = defaultdict(list)
        for obj, name, key in ((llm.engine, "step", "engine_step"),
                               (llm.engine, "_advance_grammars", "_advance_grammars"),
                               (llm.engine.grammars, "fill_masks", "fill_masks"), (llm.engine.runner, "_pack", "_pack"),
                               (llm.engine.runner, "step", "runner_step (pack+device+get)")):
            _timed(obj, name, key, times)
        llm.generate("JSON:", params)
    fills = times["fill_masks"]
    us = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items() if v}
    return {"batch": batch, "vocab": llm.engine.grammars.vocab_size, "steps": len(times["engine_step"]),
            "median_us": us, "fill_share_of_step": round(sum(fills) / sum(times["engine_step"]), 3)}


def gil_and_large_vocab(batch: int, vocab_size: int = 128_000, seconds: float = 0.5) -> dict[str, Any]:
    """fill_masks on a synthetic 128k vocabulary, each matcher inside a string (the costly state: most tokens
    can continue it); then as many fills on a worker thread beside a Python loop of the same length."""
    import numpy as np
    import xgrammar as xgr

    from benchmarks.bench_grammar import synthetic_vocab

    vocab = synthetic_vocab(vocab_size)
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[0])
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    batcher = xgr.BatchGrammarMatcher(max_threads=2)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    for m in matchers:
        assert m.accept_string('{"name": "ab')
    out = np.empty((batch, -(-len(vocab) // 32)), np.int32)
    steps = 20

    def fills() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            batcher.batch_fill_next_token_bitmask(matchers, out)
        return time.perf_counter() - t

    def python_loop(n: int) -> float:
        t, x = time.perf_counter(), 0
        for i in range(n):
            x += i
        return time.perf_counter() - t

    per_step = fills() / steps
    steps = max(20, int(seconds / per_step))
    n = int(5_000_000 * seconds / python_loop(5_000_000))
    alone_fill, alone_py = fills(), python_loop(n)
    box: list[float] = []
    worker = threading.Thread(target=lambda: box.append(fills()))
    t = time.perf_counter()
    worker.start()
    python_loop(n)
    worker.join()
    together = time.perf_counter() - t
    # The GIL question, independent of how many cores are free: while ONE long batched fill runs on a worker
    # (64 rows), does the main thread execute any bytecode? Held GIL: no ticks inside the call's window.
    wide = [xgr.GrammarMatcher(compiled) for _ in range(64)]
    for m in wide:
        m.accept_string('{"name": "ab')
    wide_out = np.empty((64, out.shape[1]), np.int32)
    window: list[float] = []

    def one_call() -> None:
        window.append(time.perf_counter())
        batcher.batch_fill_next_token_bitmask(wide, wide_out)
        window.append(time.perf_counter())

    ticks: list[float] = []
    worker = threading.Thread(target=one_call)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    inside = sum(window[0] < t < window[1] for t in ticks)
    gil = {"one_fill_of_64_rows_ms": round((window[1] - window[0]) * 1e3, 2), "main_ticks_during_it": inside}
    return gil | {"batch": batch, "vocab": len(vocab), "fill_us_per_step": round(alone_fill / steps * 1e6, 1),
            "fill_steps": steps, "alone_fill_s": round(alone_fill, 3), "alone_python_s": round(alone_py, 3),
            "together_s": round(together, 3), "serial_would_be_s": round(alone_fill + alone_py, 3)}


def main() -> None:
    for batch in (1, 8):
        print(json.dumps(engine_steps(batch)))
    for batch in (1, 8):
        print(json.dumps(gil_and_large_vocab(batch)))


if __name__ == "__main__":
    main()
