"""The engine: continuous batching, chunked prefill, prefix caching, preemption, aborts, stop rules."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from inferflux import LLM, SamplingParams
from inferflux.config import load_config
from inferflux.engine.engine import Engine
from inferflux.engine.request import Request
from inferflux.engine.sampling_params import SamplingParamsError
from inferflux.formats.loader import load_model
from tests.fixtures.abort_cycles import run_abort_cycles

RUNTIME = dict(page_size=16, max_num_seqs=16, max_num_batched_tokens=128, max_model_len=512, num_pages=400,
               max_logprobs=5)


def config(**overrides):
    return load_config(overrides={f"runtime.{k}": v for k, v in {**RUNTIME, **overrides}.items()})


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model("llama"))


@pytest.fixture(scope="module")
def solo(tiny_model):
    """A separate LLM that runs each request alone: the reference outputs."""
    llm = LLM(tiny_model("llama"), **RUNTIME)

    def run(prompt: list[int], params: SamplingParams) -> list[int]:
        return llm.generate([prompt], params)[0].outputs[0].token_ids

    return run


def random_prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, 900, size=rng.integers(low, high + 1))] for _ in range(count)]


async def collect(engine: Engine, request: Request, delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    tokens: list[int] = []
    async for out in await engine.submit(request):
        tokens += out.new_token_ids
    return tokens


def run_engine(model, cfg, coro_factory):
    engine = Engine(model, cfg).start()
    try:
        return asyncio.run(coro_factory(engine)), engine
    finally:
        engine.stop()


def test_64_staggered_requests_equal_solo_runs(model, solo) -> None:
    prompts = random_prompts(64, 5, 400, seed=0)
    rng = random.Random(1)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40), ignore_eos=True) for _ in prompts]

    async def main(engine):
        return await asyncio.gather(*[
            collect(engine, Request(p, sp), delay=0.01 * (i % 16)) for i, (p, sp) in enumerate(zip(prompts, params))
        ])

    outputs, engine = run_engine(model, config(), main)
    for prompt, sp, got in zip(prompts, params, outputs):
        assert len(got) == sp.max_tokens
        assert got == solo(prompt, sp)
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.generation_tokens == sum(sp.max_tokens for sp in params)


def test_preemption_keeps_outputs(model, solo) -> None:
    """A cache too small for the batch forces preemption; recomputation gives identical outputs."""
    prompts = random_prompts(10, 40, 90, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def main(engine):
        return await asyncio.gather(*[collect(engine, Request(p, params)) for p in prompts])

    outputs, engine = run_engine(model, config(num_pages=30, prefix_caching=False), main)
    assert engine.stats().num_preemptions > 0
    for prompt, got in zip(prompts, outputs):
        assert got == solo(prompt, params)
    assert engine.core.allocator.num_free == engine.core.allocator.num_usable


def test_shared_system_prompt_hits_prefix_cache(model, solo) -> None:
    system = random_prompts(1, 256, 256, seed=3)[0]
    users = random_prompts(16, 5, 30, seed=4)
    prompts = [system + u for u in users]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def main(engine):
        first = await collect(engine, Request(prompts[0], params))
        before = engine.stats()
        rest = await asyncio.gather(*[collect(engine, Request(p, params)) for p in prompts[1:]])
        after = engine.stats()
        return [first] + rest, before, after

    (outputs, before, after), engine = run_engine(model, config(), main)
    shared_pages = len(system) // RUNTIME["page_size"]
    hits = after.prefix_hits - before.prefix_hits
    assert hits / (shared_pages * 15) > 0.8
    for prompt, got in zip(prompts, outputs):
        assert got == solo(prompt, params)


def test_cached_tokens_reported(model) -> None:
    system = random_prompts(1, 64, 64, seed=8)[0]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    async def main(engine):
        outs = []
        for suffix in ([1, 2, 3], [4, 5, 6]):
            async for out in await engine.submit(Request(system + suffix, params)):
                last = out
            outs.append(last)
        return outs

    (first, second), _ = run_engine(model, config(), main)
    assert first.cached_tokens == 0 and second.cached_tokens == 64
    assert second.prompt_tokens == 67 and second.completion_tokens == 2
    assert second.first_token_time >= second.arrival_time


def test_aborts_never_leak_pages(model) -> None:
    """200 random submit/abort cycles (breaking out, cancelling the task, aborting by id) free every page."""
    prompts = random_prompts(200, 5, 120, seed=5)
    rng = random.Random(6)

    def make_request(i: int, prompt: list[int]) -> Request:
        return Request(prompt, SamplingParams(temperature=0.8, max_tokens=rng.randint(1, 30), seed=i))

    async def main(engine):
        return await run_abort_cycles(engine, prompts, make_request, rng)

    (start_free, end_free), engine = run_engine(model, config(), main)
    assert end_free == start_free
    assert not engine.core.has_unfinished


def test_bad_request_raises_at_submit(model) -> None:
    async def main(engine):
        with pytest.raises(SamplingParamsError, match="context"):
            await engine.submit(Request([1] * 600, SamplingParams()))
        with pytest.raises(SamplingParamsError, match="temperature"):
            await engine.submit(Request([1, 2], SamplingParams(temperature=-1)))
        with pytest.raises(SamplingParamsError, match="outside the vocabulary"):
            await engine.submit(Request([10**6], SamplingParams()))
        return await collect(engine, Request([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)))

    tokens, _ = run_engine(model, config(), main)
    assert len(tokens) == 3  # the engine still serves after bad requests


# --- stop rules, through the offline API (which drives the same engine core) ---


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"), **RUNTIME)


PROMPT = [5, 17, 42, 99, 7, 230, 64, 3, 150, 11, 300, 12]


def test_max_tokens_and_ignore_eos(llm) -> None:
    free = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert len(free.token_ids) == 20 and free.finish_reason == "length"
    eos = next(iter(llm.tokenizer.eos_ids))
    banned_eos = SamplingParams(temperature=0.0, max_tokens=20, logit_bias={eos: 100.0})
    forced = llm.generate([PROMPT], banned_eos)[0].outputs[0]
    assert forced.token_ids == [eos] and forced.finish_reason == "stop" and forced.text == ""
    ignored = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                    logit_bias={eos: 100.0}))[0].outputs[0]
    assert ignored.token_ids == [eos] * 5 and ignored.finish_reason == "length"


def test_min_tokens_holds_back_stop_tokens(llm) -> None:
    eos = next(iter(llm.tokenizer.eos_ids))
    params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=6, logit_bias={eos: 5.0})
    out = llm.generate([PROMPT], params)[0].outputs[0]
    assert len(out.token_ids) >= 6 and eos not in out.token_ids[:6]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos


def test_stop_token_ids(llm) -> None:
    free = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[5]
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop"


def test_stop_string_spanning_tokens(llm) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    free = llm.generate(["Once upon a time"], params)[0].outputs[0]
    pieces = [llm.tokenizer.decode([t]) for t in free.token_ids]
    # A stop string made of the end of one token's text and the start of the next ones.
    i = next(i for i in range(3, len(pieces) - 2) if pieces[i] and pieces[i + 1])
    stop = pieces[i][-1:] + pieces[i + 1] + pieces[i + 2][:1]
    expected = free.text[: free.text.find(stop)]
    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                            stop=[stop, "never-appears-anywhere"]))[0].outputs[0]
    assert out.text == expected and stop not in out.text
    assert out.finish_reason == "stop"
    assert len(out.token_ids) <= len(free.token_ids)


def test_n_samples_share_prompt_pages(llm) -> None:
    prompt = random_prompts(1, 100, 100, seed=9)[0]
    before = llm.engine.stats().prefix_hits
    out = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=8, n=4, seed=3, ignore_eos=True))[0]
    assert len(out.outputs) == 4 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    # The three later samples reuse the first one's full prompt pages.
    assert llm.engine.stats().prefix_hits - before >= 3 * (len(prompt) // RUNTIME["page_size"] - 1)
