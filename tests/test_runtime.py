"""The model runner end to end: fidelity to transformers and llama.cpp, invariances, no recompilation."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from inferflux import LLM, SamplingParams
from inferflux.config import load_config
from inferflux.formats.loader import load_model
from inferflux.formats.weights import QuantizedWeight, iter_names

GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 7, 230, 64, 3, 150, 11, 300, 12]
TEST_RUNTIME = dict(page_size=8, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, num_pages=160,
                    max_logprobs=5)

# Types llama.cpp makes from our F32 file (pure mode: every matrix gets the type); the rest come from our converter.
LLAMA_CPP_TYPES = {
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K", "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
}
OUR_TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q6_K"]
# Teacher-forced top-1 agreement with llama.cpp over 128 random tokens (seed 1), as measured on the tiny
# llama-q model, rounded down to 0.05. The F32 file agrees 100% and every type here is token-identical to
# transformers on its dequantized weights, so the gap is llama.cpp's own arithmetic: it quantizes activations
# (Q8_0/Q8_K) before quantized matmuls, which flips near-ties between top logits of a random-weight model.
# Measured: Q8_0 .938, Q4_0 .883, Q4_K .898, Q6_K .828, Q4_1 .914, Q5_0 .938, Q5_1 .938, Q2_K .867,
# Q3_K .953, Q5_K .906, IQ4_NL .898, IQ4_XS .898.
# With the CPU kernels (which quantize activations, in blocks of 32 where llama.cpp uses 256 for K-quants)
# the agreement moved, measured over 512 tokens: Q8_0 .955, Q4_0 .965, Q4_K .861, Q6_K .865, IQ4_XS .861,
# Q5_K .844 (ours is closer to transformers than llama.cpp is for K-quants, so further from llama.cpp).
AGREEMENT_FLOOR = {"Q8_0": 0.9, "Q4_0": 0.85, "Q4_K": 0.85, "Q6_K": 0.8, "Q4_1": 0.9, "Q5_0": 0.9, "Q5_1": 0.9,
                   "Q2_K": 0.85, "Q3_K": 0.9, "Q5_K": 0.8, "IQ4_NL": 0.85, "IQ4_XS": 0.85}
# How far our agreement with transformers may fall below llama.cpp's, in standard deviations of the paired
# difference (McNemar: tokens only ours misses minus tokens only llama.cpp misses, against the square root of
# their sum): see test_quantized_types.
AGREEMENT_SIGMAS = 2.0


def make_llm(path: Path, **overrides) -> LLM:
    return LLM(path, **{**TEST_RUNTIME, **overrides})


def effective_hf_model(folder: Path, gguf_path: Path | None = None) -> torch.nn.Module:
    """transformers' model of `folder`, with the weights a GGUF file really holds (dequantized by gguf)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if gguf_path is None:
        return model
    loaded = load_model(gguf_path)
    hf_names = {ours: hf for ours, hf, _ in iter_names(loaded.config.num_layers)}
    state = {}
    for ours, weight in loaded.weights.items():
        if isinstance(weight, QuantizedWeight):
            value = gguf.quants.dequantize(weight.raw, weight.qtype).reshape(weight.shape)
        else:
            value = np.asarray(weight, np.float32)
        state[hf_names[ours]] = torch.from_numpy(np.array(value, np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    if loaded.config.tie_word_embeddings:
        model.tie_weights()
    return model


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("source", ["safetensors", "F32", "F16"])
def test_greedy_matches_transformers(tiny_model, tiny_gguf, name: str, source: str) -> None:
    folder = tiny_model(name)
    gguf_path = None if source == "safetensors" else tiny_gguf(name, source)
    expected = hf_greedy(effective_hf_model(folder, gguf_path), PROMPT, 48)
    llm = make_llm(gguf_path or folder)
    out = llm.generate([PROMPT], GREEDY)[0].outputs[0]
    assert out.token_ids == expected
    assert out.finish_reason == "length"


@pytest.fixture(scope="session")
def quantized_gguf(tiny_gguf, tmp_path_factory):
    """`quantized_gguf(type)` -> a GGUF of the llama-q model at that type (ours, or llama.cpp's quantizer)."""
    import llama_cpp
    out_dir = tmp_path_factory.mktemp("quantized")
    made: dict[str, Path] = {}

    def get(qtype: str) -> Path:
        if qtype in OUR_TYPES:
            return tiny_gguf("llama-q", qtype)
        if qtype not in made:
            dst = out_dir / f"llama-q-{qtype}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[qtype])
            params.pure = True
            rc = llama_cpp.llama_model_quantize(str(tiny_gguf("llama-q", "F32")).encode(), str(dst).encode(),
                                                ctypes.byref(params))
            assert rc == 0
            made[qtype] = dst
        return made[qtype]

    return get


def _teacher_forced_top1_llama_cpp(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(tokens)
    top1 = np.argmax(np.asarray(llm.scores[: len(tokens)]), axis=-1)
    llm.close()
    return top1


def _teacher_forced_top1_ours(llm: LLM, tokens: list[int]) -> np.ndarray:
    """Argmax after each prefix: the final hidden states of one chunked prefill, through the model's head.

    The head is multiplied by `linear` on the runner's own weight representation (the CPU kernels where the
    runner uses them); its rows are independent of each other, so this is what a step samples from.
    """
    from inferflux.engine.model_runner import Chunk, prepare_weights
    from inferflux.kernels.quant_matmul import linear

    runner, weights = llm.runner, llm.model.weights
    name = "embed" if llm.model.config.tie_word_embeddings else "lm_head"
    head = prepare_weights({name: weights[name]}, runner.dtype, runner.weight_layout)[name]
    chunk = runner.token_buckets[-1]
    pages = llm.allocator.allocate(-(-len(tokens) // runner.page_size))
    try:
        hidden = np.concatenate([
            runner.hidden_states([Chunk(tokens=tokens[i:i + chunk], start_pos=i, pages=pages)])[0]
            for i in range(0, len(tokens), chunk)])
    finally:
        llm.allocator.release(pages)
    logits = jax.jit(lambda h, w: linear(h, w, out_dtype=jnp.float32))(hidden, head)
    return np.asarray(jnp.argmax(logits, axis=-1))


def _teacher_forced_top1_hf(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].argmax(-1).numpy()


def _agreements(llm: LLM, hf_model: torch.nn.Module, path: Path, sequences: int = 4) -> dict[str, float]:
    """Teacher-forced top-1 agreement over `sequences` x 128 random tokens: ours vs llama.cpp, and each vs
    transformers on the file's dequantized weights."""
    rng = np.random.default_rng(1)
    hits = np.zeros(5)
    for _ in range(sequences):
        tokens = [int(t) for t in rng.integers(1, llm.model.config.vocab_size - 10, size=128)]
        ours, llama = _teacher_forced_top1_ours(llm, tokens), _teacher_forced_top1_llama_cpp(path, tokens)
        hf = _teacher_forced_top1_hf(hf_model, tokens)
        hits += [np.sum(ours == llama), np.sum(ours == hf), np.sum(llama == hf),
                 np.sum((ours != hf) & (llama == hf)), np.sum((ours == hf) & (llama != hf))]
    total = 128 * sequences
    rates = dict(zip(("ours_llama", "ours_hf", "llama_hf"), (float(h) / total for h in hits[:3])))
    return {**rates, "only_ours_misses": int(hits[3]), "only_llama_misses": int(hits[4])}


@pytest.mark.parametrize("qtype", OUR_TYPES + sorted(LLAMA_CPP_TYPES))
def test_quantized_types(tiny_model, quantized_gguf, qtype: str) -> None:
    """Exact mode: token-identical to transformers on the dequantized weights. Default (CPU kernels where
    the type has one): as close to transformers as llama.cpp is, and close to llama.cpp, teacher-forced."""
    path = quantized_gguf(qtype)
    stored = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors
              if len(t.shape) == 2}
    assert qtype in stored  # the file really holds this type
    hf_model = effective_hf_model(tiny_model("llama-q"), path)
    expected = hf_greedy(hf_model, PROMPT, 48)
    exact = make_llm(path, cpu_kernels="exact")
    assert exact.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == expected
    del exact

    llm = make_llm(path)
    rates = _agreements(llm, hf_model, path)
    assert rates["ours_llama"] >= AGREEMENT_FLOOR[qtype], f"{qtype}: {rates}"
    # Both quantize activations to int8 before quantized matmuls (ours where the type has a CPU kernel); ours
    # must lose no more to it than llama.cpp does. Measured over these 512 tokens, ours minus llama.cpp's:
    # Q4_K +3.5%, Q5_K +3.1%, Q6_K +3.1%, IQ4_XS +4.3% (our activation blocks are 32 values, ggml's 256),
    # Q4_0 +0.4%, Q8_0 -1.2%. For Q8_0 and Q4_0 the arithmetic is ggml's own (activation blocks of 32; ggml
    # rounds their scales to f16 and keeps an f16 KV cache, we do neither), so which near-ties flip is chance:
    # over 2,048 tokens (16 sequences) Q8_0 was .918 vs llama.cpp's .922 (ours ahead in 6 sequences, behind
    # in 8) and Q4_0 .922 vs .921, and the misses of both sit at the same near-ties (median top-2 logit gap
    # 0.025 vs 0.027 logit standard deviations, 0.21 over all tokens). A strict ">=" would be a coin toss on
    # these types; the bound is the paired difference's noise (McNemar), not a fixed share.
    excess = rates["only_ours_misses"] - rates["only_llama_misses"]
    noise = AGREEMENT_SIGMAS * np.sqrt(rates["only_ours_misses"] + rates["only_llama_misses"])
    assert excess <= noise, f"{qtype}: {rates}"


def test_batch_invariance(tiny_model) -> None:
    """A prompt decoded alone and beside 7 others (padding and other pages present) gives the same result."""
    llm = make_llm(tiny_model("qwen2"))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)
    alone = llm.generate([PROMPT], params)[0].outputs[0]
    rng = np.random.default_rng(0)
    others = [[int(t) for t in rng.integers(1, 500, size=n)] for n in (3, 9, 17, 30, 5, 41, 12)]
    batch = llm.generate(others[:3] + [PROMPT] + others[3:], params)
    together = batch[3].outputs[0]
    assert together.token_ids == alone.token_ids
    for a, b in zip(alone.logprobs, together.logprobs):
        assert a.token_id == b.token_id
        assert abs(a.logprob - b.logprob) < 1e-4
        assert a.top.keys() == b.top.keys()
        for token in a.top:
            assert abs(a.top[token] - b.top[token]) < 1e-4


def test_batch_invariance_is_bitwise_at_full_width(tmp_path_factory) -> None:
    """At the 1.1B model's width, on the CPU kernels: a prompt decoded alone and beside 7 others gives the
    same logprobs bit for bit. (One-row programs broke this: XLA:CPU reduced a [1, 2048] row in another order
    than [M, 2048], so the smallest CPU token bucket is 2, its padding row skipped by the kernels.)"""
    from benchmarks.make_model import make_gguf

    path = make_gguf("wide", "Q8_0", tmp_path_factory.mktemp("wide") / "wide-Q8_0.gguf", seed=3)
    llm = make_llm(path)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    alone = llm.generate([PROMPT], params)[0].outputs[0]
    rng = np.random.default_rng(1)
    others = [[int(t) for t in rng.integers(1, 4000, size=n)] for n in (3, 9, 17, 30, 5, 41, 12)]
    together = llm.generate(others[:3] + [PROMPT] + others[3:], params)[3].outputs[0]
    assert together.token_ids == alone.token_ids
    assert [(lp.logprob, lp.top) for lp in together.logprobs] == [(lp.logprob, lp.top) for lp in alone.logprobs]


def test_chunked_prefill_invariance(tiny_model) -> None:
    """A 300-token prompt prefilled in one chunk or in chunks of 64 yields the same next-token logprobs."""
    from inferflux.engine.model_runner import Chunk
    from inferflux.engine.sampling_rows import RowParams

    prompt = [int(t) for t in np.random.default_rng(3).integers(1, 500, size=300)]
    llm = make_llm(tiny_model("llama"), max_num_batched_tokens=512, max_model_len=512, num_pages=100)
    runner = llm.runner
    greedy = RowParams(temperature=0.0)

    def prefill(chunk_size: int):
        pages = llm.allocator.allocate(-(-len(prompt) // runner.page_size))
        try:
            for start in range(0, len(prompt), chunk_size):
                end = min(start + chunk_size, len(prompt))
                last = end == len(prompt)
                (result,) = runner.step([Chunk(tokens=prompt[start:end], start_pos=start, pages=pages,
                                               history=prompt[:end], num_prompt=end,
                                               sampling=greedy if last else None)])
            return result
        finally:
            llm.allocator.release(pages)

    whole, chunked = prefill(300), prefill(64)
    assert whole.token_id == chunked.token_id
    np.testing.assert_array_equal(whole.top_ids, chunked.top_ids)
    np.testing.assert_allclose(whole.top_logprobs, chunked.top_logprobs, atol=1e-4)


def test_sampling_end_to_end(tiny_model) -> None:
    llm = make_llm(tiny_model("mistral"))
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    top1 = llm.generate([PROMPT], SamplingParams(temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True, seed=7))
    assert top1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=1234)
    first = llm.generate([PROMPT], seeded)[0].outputs[0].token_ids
    # Same seed, now in a batch with other requests and at another row: same tokens.
    batch = llm.generate([PROMPT[:5], PROMPT, PROMPT[3:]],
                         [SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True), seeded,
                          SamplingParams(temperature=0.5, max_tokens=20, ignore_eos=True, seed=1)])
    assert batch[1].outputs[0].token_ids == first
    other_seed = llm.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=99))
    assert other_seed[0].outputs[0].token_ids != first


def test_generate_api(tiny_model) -> None:
    llm = make_llm(tiny_model("llama"))
    outs = llm.generate(["Hello world", "The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=8,
                                                                                 ignore_eos=True, logprobs=3))
    assert [o.prompt for o in outs] == ["Hello world", "The quick brown fox"]
    for out in outs:
        completion = out.outputs[0]
        assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt)
        assert len(completion.token_ids) == 8 and completion.finish_reason == "length"
        assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert len(completion.logprobs) == 8 and all(len(lp.top) == 3 for lp in completion.logprobs)
    # n > 1 with a seed: distinct samples, reproducible.
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, n=3, seed=5)
    a, b = llm.generate("Hi", params)[0], llm.generate("Hi", params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    # stop token ids, and a stop string cut out of the returned text.
    free = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[4]
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id]))
    assert stopped[0].outputs[0].token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert stopped[0].outputs[0].finish_reason == "stop"
    text = free.text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    if needle.strip():
        cut = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[needle]))
        assert cut[0].outputs[0].text == text[: text.find(needle)]
        assert cut[0].outputs[0].finish_reason == "stop"
    chat = llm.chat([{"role": "user", "content": "Hi there"}], SamplingParams(temperature=0.0, max_tokens=4))
    assert chat[0].prompt_token_ids[0] == llm.tokenizer.bos_id
    assert chat[0].prompt_token_ids.count(llm.tokenizer.bos_id) == 1


def test_no_recompilation_after_warmup(tiny_model) -> None:
    """After warm-up, a varied workload lowers and compiles nothing new."""
    llm = make_llm(tiny_model("qwen2"), max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64, warmup=True)
    assert llm.runner.compiled_buckets == set(llm.runner.all_buckets())
    events: list[str] = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(5)
        prompts = [[int(t) for t in rng.integers(1, 500, size=n)] for n in (1, 7, 30, 50, 3)]
        params = [SamplingParams(temperature=t, max_tokens=m, ignore_eos=True, logprobs=lp, seed=1)
                  for t, m, lp in ((0.0, 5, None), (0.8, 12, 2), (1.0, 3, None), (0.0, 10, 5), (0.5, 40, None))]
        llm.generate(prompts, params)
        llm.generate(prompts[:2], params[:2])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert events == []


def test_decode_only_buckets(tiny_model) -> None:
    """Decode-only programs (token t in slot t) give the same tokens as mixed steps.

    On CPU both run the reference attention; this checks the bucket choice and the packing contract.
    """
    prompts = [PROMPT, PROMPT[:5], PROMPT[2:9]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = make_llm(tiny_model("llama"))
    llm.runner.decode_buckets = False
    mixed = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert not any(bucket[3] for bucket in llm.runner.compiled_buckets)
    llm.runner.decode_buckets = True
    decode = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert decode == mixed
    assert any(bucket[3] for bucket in llm.runner.compiled_buckets)
    assert llm.runner.bucket_for(3, 3, 2) == (4, 4, 16, True)  # page buckets 1, 16 (page_bucket_growth 16)


def test_bad_requests_are_clear(tiny_model) -> None:
    from inferflux.engine.sampling_params import SamplingParamsError

    llm = make_llm(tiny_model("qwen2"))
    with pytest.raises(SamplingParamsError, match="context"):
        llm.generate([[1] * 200], SamplingParams(max_tokens=4))
    with pytest.raises(SamplingParamsError, match="top_p"):
        llm.generate("hi", SamplingParams(top_p=0))
    with pytest.raises(SamplingParamsError, match="vocabulary"):
        llm.generate("hi", SamplingParams(logit_bias={10**7: 1.0}))
    assert llm.allocator.num_free == llm.allocator.num_usable  # nothing leaked


def test_config_precedence(tmp_path: Path) -> None:
    from inferflux.config import ConfigError

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("runtime:\n  page_size: 32\n  max_num_seqs: 4\n")
    config = load_config(yaml_file, overrides=["runtime.max_num_seqs=9"],
                         environ={"INFERFLUX_RUNTIME__PAGE_SIZE": "64", "INFERFLUX_RUNTIME__WARMUP": "true"})
    assert (config.runtime.page_size, config.runtime.max_num_seqs, config.runtime.warmup) == (64, 9, True)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(overrides={"runtime.page_sise": 8})
    with pytest.raises(ConfigError, match="must be int"):
        load_config(overrides={"runtime.page_size": "big"})


def test_default_yaml_matches_defaults() -> None:
    """configs/default.yaml documents the defaults; it must not drift from the code."""
    import dataclasses

    from inferflux.config import Config

    root = Path(__file__).resolve().parent.parent
    assert load_config(root / "configs" / "default.yaml", environ={}) == dataclasses.replace(Config())
