"""Overlapped steps (engine/overlap.py): the same tokens as without them, steps really chained, clean aborts."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from inferflux import LLM, Constraint, SamplingParams
from inferflux.config import load_config
from inferflux.engine.core import EngineCore
from inferflux.engine.engine import Engine
from inferflux.engine.request import Request
from inferflux.formats.loader import load_model
from tests.fixtures.abort_cycles import run_abort_cycles

RUNTIME = dict(page_size=16, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_pages=120,
               max_logprobs=5)


def config(mode: str, **runtime):
    return load_config(overrides={f"runtime.{k}": v for k, v in {**RUNTIME, "overlap_steps": mode, **runtime}.items()})


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plain(model_dir):
    return LLM(model_dir, config("off"))


@pytest.fixture(scope="module")
def chained(model_dir):
    return LLM(model_dir, config("on"))


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, 900, size=int(rng.integers(3, 90)))] for _ in range(count)]


def outputs(llm: LLM, batch, params):
    return [[(o.token_ids, o.text, o.finish_reason) for o in out.outputs] for out in llm.generate(batch, params)]


def test_auto_chains_only_single_sequence_steps_on_cpu(model_dir, plain) -> None:
    core = EngineCore(load_model(model_dir), config("auto"))
    assert core.max_chained_seqs == 1
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, batch in enumerate(([prompts(1, seed=6)[0]], prompts(3, seed=7))):
        for j, prompt in enumerate(batch):
            core.add_request(Request(prompt, params, request_id=f"{i}-{j}"))
        tokens: dict[str, list[int]] = {}
        before = core.overlapped_steps
        while core.has_unfinished:
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert [tokens[f"{i}-{j}"] for j in range(len(batch))] == outputs_ids(plain, batch, params)
        assert (core.overlapped_steps > before) == (len(batch) == 1)


def outputs_ids(llm: LLM, batch, params) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(batch, params)]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=5, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=0.7, max_tokens=16, seed=9, n=3, min_tokens=4),
    SamplingParams(temperature=0.0, max_tokens=30, stop=["a", "e"]),  # stop strings end samples mid-chain
], ids=["greedy", "seeded-logprobs", "n3-min-tokens", "stop-strings"])
def test_chained_steps_give_the_same_outputs(plain, chained, params) -> None:
    batch = prompts(6, seed=1)
    before = chained.engine.overlapped_steps
    want = outputs(plain, batch, params)
    got = outputs(chained, batch, params)
    assert got == want
    assert chained.engine.overlapped_steps - before >= params.max_tokens // 2  # most steps really were chained
    assert plain.engine.overlapped_steps == 0
    if params.logprobs is not None:
        for w, g in zip(plain.generate(batch, params), chained.generate(batch, params)):
            np.testing.assert_allclose([lp.logprob for lp in g.outputs[0].logprobs],
                                       [lp.logprob for lp in w.outputs[0].logprobs], atol=1e-5)
    free = chained.engine.allocator
    assert free.num_free == free.num_usable  # no page kept by a dropped chained token


def test_unchainable_rows_and_admissions_mid_chain(plain, chained) -> None:
    """Penalties and grammars break a chain (they need the last token on the host); requests queued while a
    chain runs are admitted at the next step; the tokens stay those of the unchained engine."""
    batch = prompts(5, seed=2)
    mixed = [SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=18, repetition_penalty=1.3, presence_penalty=0.3),
             SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=12, constraint=Constraint.regex("[ab ]+")),
             SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True)]
    assert outputs(chained, batch, mixed) == outputs(plain, batch, mixed)

    core = chained.engine
    late = prompts(3, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    done: dict[str, list[int]] = {}
    core.add_request(Request(late[0], params, request_id="r0"))
    step = 0
    while core.has_unfinished:
        if step in (3, 7):  # arrive while a chain is in flight
            core.add_request(Request(late[1 + (step == 7)], params, request_id=f"r{1 + (step == 7)}"))
        for out in core.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    solo = [plain.generate([p], params)[0].outputs[0].token_ids for p in late]
    assert [done[f"r{i}"] for i in range(3)] == solo


def test_no_page_leaks_with_aborts_while_steps_are_in_flight(model_dir) -> None:
    """200 submit/abort cycles through the server's engine with chained steps free every page."""
    rng = random.Random(11)
    engine = Engine(load_model(model_dir), config("on")).start()

    def make_request(i: int, prompt: list[int]) -> Request:
        return Request(prompt, SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 30),
                                              seed=i, ignore_eos=True))

    try:
        start_free, end_free = asyncio.run(run_abort_cycles(engine, prompts(200, seed=4), make_request, rng))
        chained_steps = engine.core.overlapped_steps
    finally:
        engine.stop()
    assert end_free == start_free
    assert chained_steps > 0
    assert not engine.core.has_unfinished
