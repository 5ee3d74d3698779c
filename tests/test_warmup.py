"""Bounded compilation: the bucket set a config compiles, the program LRU, and freeing evicted programs' maps.

Why: warm-up of a default config used to compile 312 programs (tokens x seqs x pages), ~360 memory maps each
on XLA:CPU, and crashed at vm.max_map_count. Measurements of time and maps are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from inferflux import LLM, SamplingParams
from inferflux.config import load_config
from inferflux.convert.demo_model import make_demo_model
from inferflux.engine.model_runner import ModelRunner
from inferflux.engine.program_cache import ProgramCache, process_map_count
from inferflux.formats.loader import load_model

SMALL = dict(page_size=8, max_num_seqs=4, max_num_batched_tokens=32, min_token_bucket=8, max_model_len=64,
             num_pages=40, max_logprobs=2, max_logit_bias=4)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


def _runner(path: Path, **runtime: object) -> ModelRunner:
    config = load_config(overrides={f"runtime.{k}": v for k, v in runtime.items()}, environ={})
    return ModelRunner(load_model(path), config.runtime)


def test_default_config_bucket_count(demo_model: Path) -> None:
    """The demo model under the default bucket keys: token buckets x 2 page buckets (14 or 18 programs on CPU).

    Token buckets double from 8 (2 where the CPU attention kernel is loaded) to 512: 7 or 9 of them.
    """
    runner = _runner(demo_model, num_pages=200)  # everything else default; pages only size the KV cache
    tokens = runner.token_buckets
    assert tokens in ([8, 16, 32, 64, 128, 256, 512], [2, 4, 8, 16, 32, 64, 128, 256, 512])
    assert runner.page_buckets == [16, 128]  # 2048-token context / 16-token pages, from page_bucket_growth
    decode = len(runner.seq_buckets) * len(runner.page_buckets) if runner.decode_buckets else 0
    buckets = runner.all_buckets()
    assert len(buckets) == len(set(buckets)) == len(tokens) * 2 + decode
    assert len(buckets) < runner.runtime.max_compiled_programs
    # Every step shape lands in the set: sequences are tied to the token bucket.
    for tokens, seqs, pages in [(1, 1, 1), (9, 3, 5), (512, 32, 128), (33, 32, 2), (200, 1, 64)]:
        assert runner.bucket_for(tokens, seqs, pages) in buckets


def test_warmup_compiles_the_formula_then_nothing(tiny_model) -> None:
    """Warm-up compiles len(token buckets) x len(page buckets) programs, and a workload compiles no more."""
    llm = LLM(tiny_model("llama"), **SMALL, warmup=True)
    runner = llm.runner
    assert runner.token_buckets[-1] == 32 and runner.page_buckets == [8]
    assert runner.programs.compiles == len(runner.all_buckets()) == len(runner.token_buckets) * 1 + (
        len(runner.seq_buckets) * 1 if runner.decode_buckets else 0)
    prompts = [[5, 17, 42], list(range(1, 30)), [7] * 12, [3, 4]]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert runner.programs.compiles == len(runner.all_buckets()) and runner.programs.evictions == 0


def test_warmup_never_compiles_more_than_the_cap(tiny_model) -> None:
    runner = _runner(tiny_model("llama"), **SMALL, max_compiled_programs=2)
    assert len(runner.all_buckets()) > 2
    assert runner.warmup() == 2
    assert len(runner.programs) == 2 and runner.programs.evictions == 0


def test_lru_bound_evicts_and_recompiles_with_same_outputs(tiny_model) -> None:
    prompts = [[5, 17, 42, 99], list(range(1, 40)), [7] * 12, [3, 4], list(range(100, 160))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    unbounded = LLM(tiny_model("llama"), **SMALL)
    expected = [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs])
                for o in unbounded.generate(prompts, params)]
    assert unbounded.runner.programs.evictions == 0
    assert len(unbounded.runner.compiled_buckets) >= 2  # the workload needs more than the bounded LLM keeps
    bounded = LLM(tiny_model("llama"), **SMALL, max_compiled_programs=1)
    for _ in range(2):  # the second round recompiles what the first evicted
        got = [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs])
               for o in bounded.generate(prompts, params)]
        assert got == expected
    assert len(bounded.runner.programs) == 1
    assert bounded.runner.programs.evictions > 0
    assert bounded.runner.programs.compiles > len(set(bounded.runner.compiled_buckets))


@pytest.mark.skipif(process_map_count() is None, reason="counts /proc/self/maps (Linux)")
def test_eviction_frees_the_programs_memory_maps(tiny_model) -> None:
    """On XLA:CPU each program maps its kernels; dropping it from the LRU must unmap them (no growth)."""
    runner = _runner(tiny_model("llama"), **SMALL, max_compiled_programs=2)
    runner.programs.map_budget = None  # only the count cap evicts here
    first, second, third = runner.all_buckets()[:3]
    gc.collect()
    before = process_map_count()
    runner.program(first)  # compiled on first use, as a step would
    one = process_map_count() - before
    runner.program(second)
    two = process_map_count()
    assert one > 20  # a program really maps memory here (else this test measures nothing)
    runner.program(third)  # evicts `first`
    assert runner.compiled_buckets == {second, third}
    assert process_map_count() - two < one / 2


def test_map_budget_evicts_before_the_count_cap() -> None:
    """Past the memory-map budget the LRU keeps shrinking (down to the newest program) whatever the cap."""
    cache = ProgramCache(capacity=100, map_budget=1)  # any process is over 1 map
    for i in range(5):
        cache.put(("step", i), object())
    assert cache.keys() == [("step", 4)] and cache.evictions == 4
    view = cache.view("step")
    assert list(view) == [4] and 4 in view and view.get(3) is None


def test_maps_are_recounted_only_when_the_budget_could_be_crossed(monkeypatch) -> None:
    """over_map_budget reads /proc/self/maps again only once the programs added since the last count could
    have crossed the budget (MAPS_PER_PROGRAM_BOUND each); past it, every check counts."""
    from inferflux.engine import program_cache

    reads = []
    real = program_cache.process_map_count
    monkeypatch.setattr(program_cache, "process_map_count", lambda: reads.append(1) or real())
    now = real()
    cache = ProgramCache(capacity=100, map_budget=now + 3 * program_cache.MAPS_PER_PROGRAM_BOUND + 512)
    for i in range(6):
        cache.put(("step", i), object())
    # counted at the 2nd program (one held: 1 + 1024 <= budget needs no count before), then again when 3 more
    # could cross; never over, so nothing was evicted
    assert 1 <= len(reads) <= 3 and cache.evictions == 0 and len(cache.keys()) == 6
    cache.map_budget = 1
    before = len(reads)
    cache.put(("step", 6), object())
    assert len(reads) > before and cache.keys() == [("step", 6)]


def test_incomplete_cache_entries_are_dropped(tmp_path: Path) -> None:
    import zlib

    from inferflux.engine.compile_cache import drop_incomplete_entries

    whole = zlib.compress(b"x" * 100_000)
    (tmp_path / "jit_a-1-cache").write_bytes(whole)
    (tmp_path / "jit_b-2-cache").write_bytes(whole[: len(whole) // 2])  # killed mid-write
    (tmp_path / "jit_c-3-cache").write_bytes(b"")  # killed after creating the file
    (tmp_path / "jit_d-4-cache").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 10)  # a broken zstd frame
    (tmp_path / "unrelated.txt").write_bytes(b"")
    dropped = drop_incomplete_entries(tmp_path)
    assert sorted(p.name for p in dropped) in (["jit_b-2-cache", "jit_c-3-cache", "jit_d-4-cache"],
                                               ["jit_b-2-cache", "jit_c-3-cache"])  # zstd unchecked w/o a decoder
    assert (tmp_path / "jit_a-1-cache").exists() and (tmp_path / "unrelated.txt").exists()


def test_a_truncated_entry_is_recompiled_and_replaced(tmp_path: Path) -> None:
    """JAX never replaces an entry it cannot read; after a crash mid-write it warned and recompiled forever."""
    import os
    import subprocess
    import sys

    code = ("import sys, warnings; warnings.simplefilter('always'); import jax, jax.numpy as jnp; "
            "from inferflux.engine.compile_cache import enable_persistent_cache; "
            "enable_persistent_cache(sys.argv[1]); print(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(4))[0])")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parent.parent

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                              env=env, cwd=root, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr

    run()
    [entry] = [p for p in tmp_path.glob("jit__lambda*-cache")]
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 3])
    assert "Error reading persistent compilation cache" not in run()
    assert entry.read_bytes() == whole  # the fresh compile wrote it again
    assert "Error reading persistent compilation cache" not in run()
