"""LLM embedding mode: pooled final hidden states of a Llama-family model, checked against transformers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from transformers import AutoModel

from inferflux import LLM, SamplingParams
from inferflux.config import load_config
from inferflux.engine.engine import Engine
from inferflux.engine.request import Request
from inferflux.engine.sampling_params import SamplingParamsError
from inferflux.formats.loader import load_model

RUNTIME = dict(page_size=16, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, num_pages=120)


def hf_hidden(folder, ids: list[int]) -> np.ndarray:
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0].numpy()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_mean_and_last_pooling_match_transformers(tiny_model, name: str) -> None:
    folder = tiny_model(name)
    llm = LLM(folder, **RUNTIME)
    rng = np.random.default_rng(0)
    inputs = [[int(t) for t in rng.integers(1, 500, size=n)] for n in (3, 40, 150)]  # 150 > one step's budget
    mean = llm.embed(inputs, pooling="mean", normalize=False)
    last = llm.embed(inputs, pooling="last", normalize=False)
    for ids, m, lst in zip(inputs, mean, last):
        hidden = hf_hidden(folder, ids)
        np.testing.assert_allclose(m, hidden.mean(axis=0), atol=1e-4)
        np.testing.assert_allclose(lst, hidden[-1], atol=1e-4)
    unit = llm.embed(inputs)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit[1], mean[1] / np.linalg.norm(mean[1]), atol=1e-6)
    assert llm.allocator.num_free == llm.allocator.num_usable  # temporary pages returned


def test_embedding_errors(tiny_model) -> None:
    llm = LLM(tiny_model("llama"), **RUNTIME)
    with pytest.raises(SamplingParamsError, match="context"):
        llm.embed([[1] * 300])
    with pytest.raises(SamplingParamsError, match="pooling"):
        llm.embed("hello", pooling="max")


def test_async_embeddings_interleave_with_generation(tiny_model) -> None:
    folder = tiny_model("llama")
    engine = Engine(load_model(folder), load_config(overrides={f"runtime.{k}": v for k, v in RUNTIME.items()}))
    engine.start()
    inputs = [[5, 6, 7, 8], [9, 10, 11]]

    async def main():
        async def generate():
            tokens = []
            async for out in await engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True))):
                tokens += out.new_token_ids
            return tokens

        gen = asyncio.create_task(generate())
        vectors = await engine.embed(inputs)
        return vectors, await gen

    try:
        vectors, tokens = asyncio.run(main())
    finally:
        engine.stop()
    assert len(tokens) == 30
    for ids, v in zip(inputs, vectors):
        np.testing.assert_allclose(v, hf_hidden(folder, ids).mean(axis=0), atol=1e-4)
