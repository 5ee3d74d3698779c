"""Prompt logprobs (vLLM's `prompt_logprobs`, OpenAI's `echo` + `logprobs`), checked against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inferflux import LLM, SamplingParams

RUNTIME = dict(page_size=16, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=256, num_pages=120,
               max_logprobs=5)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"), **RUNTIME)


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model):
    """log_softmax of transformers' logits at every position of a prompt: the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, dim=-1).numpy()

    return run


def prompt(length: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, 900, size=length)]


@pytest.mark.parametrize("length", [2, 13, 70])  # 70 > max_num_batched_tokens: scored across prefill chunks
def test_prompt_logprobs_equal_transformers(llm, hf_logprobs, length: int) -> None:
    ids = prompt(length, seed=length)
    out = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == length
    assert out.prompt_logprobs[0] is None
    ref = hf_logprobs(ids)
    for pos in range(1, length):
        entry = out.prompt_logprobs[pos]
        assert entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(ref[pos - 1, ids[pos]], abs=2e-4)
        top = sorted(entry.top.items(), key=lambda kv: -kv[1])
        assert len(top) == 3
        assert [t for t, _ in top] == list(np.argsort(-ref[pos - 1], kind="stable")[:3])
        assert [v for _, v in top] == pytest.approx(list(np.sort(ref[pos - 1])[::-1][:3]), abs=2e-4)
    assert len(out.outputs[0].token_ids) == 2  # generation still happens after scoring


def test_scoring_ignores_prefix_cache_and_max_tokens_zero(llm, hf_logprobs) -> None:
    ids = prompt(48, seed=7)
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0))  # the prompt's pages are now cached
    out = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    ref = hf_logprobs(ids)
    got = [e.logprob for e in out.prompt_logprobs[1:]]
    assert got == pytest.approx([ref[p - 1, ids[p]] for p in range(1, len(ids))], abs=2e-4)
    assert all(e.top == {} for e in out.prompt_logprobs[1:])


def test_scoring_in_a_batch_with_n_and_plain_requests(llm) -> None:
    """Scored, n > 1 and plain requests share steps; each equals its solo run."""
    prompts = [prompt(n, seed=100 + n) for n in (5, 40, 17, 33)]
    params = [SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2),
              SamplingParams(max_tokens=4, temperature=0),
              SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1, n=3),
              SamplingParams(max_tokens=0, prompt_logprobs=0)]
    together = llm.generate(prompts, params)
    for ids, sp, out in zip(prompts, params, together):
        solo = llm.generate([ids], sp)[0]
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in solo.outputs]
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx(
                [e.logprob for e in solo.prompt_logprobs[1:]], abs=1e-5)
    assert len(together[2].outputs) == 3


def test_echo_with_logprobs_through_openai(client, llm) -> None:
    text = "The quick brown fox"
    res = client.completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice = res.choices[0]
    ids = llm.tokenizer.encode(text)
    assert choice.text.startswith(text) and "<|begin_of_text|>" not in choice.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = llm.generate([ids], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, logprobs=2))[0]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([e.logprob for e in ref.prompt_logprobs[1:]], abs=1e-5)
    assert lp.token_logprobs[len(ids):] == pytest.approx([e.logprob for e in ref.outputs[0].logprobs], abs=1e-5)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    # Streamed: the same tokens and logprobs, in order.
    chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_echo_max_tokens_zero_and_token_prompts(client, llm) -> None:
    ids = llm.tokenizer.encode("Hello there", add_special_tokens=False)
    res = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    choice = res.choices[0]
    assert choice.text == llm.tokenizer.decode(ids) and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == len(ids) and res.usage.completion_tokens == 0
    plain = client.completions.create(model="tiny", prompt="Hi", max_tokens=2, echo=True)
    assert plain.choices[0].text.startswith("Hi") and plain.choices[0].logprobs is None
    vllm = client.completions.create(model="tiny", prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 1})
    scores = vllm.choices[0].model_extra["prompt_logprobs"]
    assert scores[0] is None and len(scores) == len(ids)
    assert all(str(ids[p]) in scores[p] for p in range(1, len(ids)))


def test_tokenizer_info(server) -> None:
    import httpx

    info = httpx.get(server.url + "/tokenizer_info", timeout=60).json()
    assert info["eos_token"] and info["bos_token"] == "<|begin_of_text|>" and info["model_max_length"] == 256
