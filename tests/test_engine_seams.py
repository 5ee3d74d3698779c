"""Engine seams: embeddings as a request kind sharing steps with generation, and `LLM.stream`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferflux import LLM, SamplingParams
from inferflux.config import load_config
from inferflux.engine.engine import Engine
from inferflux.engine.request import Request
from inferflux.engine.sampling_params import SamplingParamsError
from inferflux.formats.loader import load_model

RUNTIME = dict(page_size=16, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_pages=120)


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, 500, size=length)] for _ in range(count)]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"), **RUNTIME)


def run_engine(tiny_model, runtime: dict, main):
    cfg = load_config(overrides={f"runtime.{k}": v for k, v in runtime.items()})
    engine = Engine(load_model(tiny_model("llama")), cfg).start()
    try:
        return asyncio.run(main(engine)), engine
    finally:
        engine.stop()


async def generate(engine: Engine, request: Request, started: asyncio.Event | None = None) -> list[int]:
    tokens: list[int] = []
    async for out in await engine.submit(request):
        tokens += out.new_token_ids
        if started is not None:
            started.set()
    return tokens


def test_embedding_shares_steps_with_generation(tiny_model, llm) -> None:
    """An embedding submitted while generations run rides in their steps (no step of its own) and gives the
    vector it gives alone; the generations give what they give alone."""
    gen_prompts = prompts(3, 20, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=100, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, logprobs=2)]
    inputs = prompts(1, 150, seed=2) + prompts(1, 7, seed=3)  # 150 tokens: several chunks of a shared budget
    solo_vectors = llm.embed(inputs, normalize=False)
    solo_last = llm.embed(inputs, pooling="last", normalize=False)
    solo_tokens = [llm.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(gen_prompts, params)]

    async def main(engine: Engine):
        started = asyncio.Event()
        gens = [asyncio.create_task(generate(engine, Request(p, sp), started)) for p, sp in zip(gen_prompts, params)]
        await started.wait()  # the generations are running
        vectors = await engine.embed(inputs)
        last = await engine.embed(inputs, pooling="last")
        done_early = not all(g.done() for g in gens)
        return vectors, last, done_early, await asyncio.gather(*gens)

    (vectors, last, done_early, tokens), engine = run_engine(tiny_model, RUNTIME, main)
    assert done_early  # both embeddings finished while the generations were still running
    np.testing.assert_allclose(vectors, solo_vectors, atol=1e-5)
    np.testing.assert_allclose(last, solo_last, atol=1e-5)
    assert tokens == solo_tokens
    stats = engine.stats()
    # Each generation takes 100 steps from its admission, and all three start within the first three steps.
    # Embeddings with steps of their own would add at least 6 (3 chunks of the 150-token input, twice).
    assert stats.num_steps <= 102
    assert engine.core.allocator.num_free == engine.core.allocator.num_usable
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_embedding_chunks_ride_in_generation_steps(llm) -> None:
    """Stepping the core by hand: every step that runs an embedding's chunk also advances the generation."""
    core = llm.engine
    # This counts steps by calls: with overlapped steps (engine/overlap.py, on CPU for a lone sequence) a call
    # may also return the outputs of the step it just fetched, so it runs unchained here.
    chained, core.max_chained_seqs = core.max_chained_seqs, 0
    try:
        gen = Request(prompts(1, 10, seed=8)[0], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        core.add_request(gen)
        core.step()
        ids = prompts(1, 150, seed=9)[0]
        embed = Request(ids, kind="embed", pooling="last")
        core.add_request(embed)
        steps, vector = 0, None
        while vector is None:
            outputs = core.step()
            steps += 1
            assert [o.request_id for o in outputs if o.request_id == gen.request_id] == [gen.request_id]
            vector = next((o.embedding for o in outputs if o.request_id == embed.request_id), None)
        assert steps == 3  # 150 prompt tokens in chunks of the 63 tokens the decode leaves of the 64-token budget
        np.testing.assert_allclose(vector, llm.embed([ids], pooling="last", normalize=False)[0], atol=1e-5)
        core.abort(gen.request_id)
        assert not core.has_unfinished and llm.allocator.num_used == 0
    finally:
        core.max_chained_seqs = chained


def test_embedding_survives_preemption(tiny_model, llm) -> None:
    """A cache too small for the batch preempts sequences, embeddings included; results are unchanged."""
    gen_prompts = prompts(6, 60, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    inputs = prompts(2, 200, seed=5)
    solo_vectors = llm.embed(inputs, normalize=False)
    solo_tokens = [out.outputs[0].token_ids for out in llm.generate(gen_prompts, params)]

    async def main(engine: Engine):
        started = asyncio.Event()
        gens = [asyncio.create_task(generate(engine, Request(p, params), started)) for p in gen_prompts]
        await started.wait()
        vectors = await engine.embed(inputs)
        return vectors, await asyncio.gather(*gens)

    runtime = {**RUNTIME, "num_pages": 30, "prefix_caching": False}
    (vectors, tokens), engine = run_engine(tiny_model, runtime, main)
    assert engine.stats().num_preemptions > 0
    np.testing.assert_allclose(vectors, solo_vectors, atol=1e-5)
    assert tokens == solo_tokens
    assert engine.core.allocator.num_free == engine.core.allocator.num_usable


def test_embedding_requests_are_checked_at_submit(tiny_model) -> None:
    async def main(engine: Engine):
        with pytest.raises(SamplingParamsError, match="pooling"):
            await engine.embed([[1, 2, 3]], pooling="max")
        with pytest.raises(SamplingParamsError, match="context"):
            await engine.embed([[1, 2, 3], [1] * 300])  # one bad input: nothing is queued
        with pytest.raises(SamplingParamsError, match="kind"):
            await engine.submit(Request([1, 2], kind="score"))  # type: ignore[arg-type]
        assert (await engine.embed([])).shape == (0, engine.core.model.config.hidden_size)
        return await engine.embed([[1, 2, 3]])

    vectors, engine = run_engine(tiny_model, RUNTIME, main)
    assert vectors.shape == (1, engine.core.model.config.hidden_size)
    assert engine.stats().num_waiting == 0


def test_stream_yields_what_generate_returns(llm) -> None:
    prompt = prompts(1, 30, seed=6)[0]
    for params in (SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                   SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True, logprobs=1),
                   SamplingParams(temperature=0.7, seed=3, max_tokens=8, n=2, ignore_eos=True)):
        expected = llm.generate([prompt], params)[0].outputs
        tokens: dict[int, list[int]] = {i: [] for i in range(params.n)}
        text: dict[int, str] = {i: "" for i in range(params.n)}
        finished = []
        for out in llm.stream(prompt, params):
            tokens[out.index] += out.new_token_ids
            text[out.index] += out.new_text
            if out.finished:
                finished.append((out.index, out.finish_reason))
        assert [tokens[c.index] for c in expected] == [c.token_ids for c in expected]
        assert [text[c.index] for c in expected] == [c.text for c in expected]
        assert sorted(finished) == [(c.index, c.finish_reason) for c in expected]
    assert llm.allocator.num_used == 0
    assert not llm.engine.has_unfinished


def test_streams_interleave_and_close_early(llm) -> None:
    """Two streams iterated in turns each get all of their own outputs; closing one aborts only it."""
    a, b = prompts(2, 25, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True)
    expected_a, expected_b = (out.outputs[0].token_ids for out in llm.generate([a, b], params))
    first, second = llm.stream(a, params), llm.stream(b, params)
    got_a: list[int] = []
    got_b: list[int] = []
    for out_a, out_b in zip(first, second):
        got_a += out_a.new_token_ids
        got_b += out_b.new_token_ids
    got_a += [t for out in first for t in out.new_token_ids]
    got_b += [t for out in second for t in out.new_token_ids]
    assert (got_a, got_b) == (expected_a, expected_b)
    assert not llm.engine.has_unfinished

    early = llm.stream(a, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    assert next(early).new_token_ids
    assert llm.engine.has_unfinished
    early.close()
    assert not llm.engine.has_unfinished and llm.allocator.num_used == 0
    with pytest.raises(SamplingParamsError, match="temperature"):
        llm.stream(a, SamplingParams(temperature=-1))  # bad input raises at the call, before iteration
    assert llm.embed([]).shape == (0, llm.model.config.hidden_size)
