"""Speculative decoding (engine/speculative.py): the same tokens as without it, fewer steps, no page leaks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import numpy as np
import pytest

from inferflux import LLM, SamplingParams
from inferflux.config import load_config
from inferflux.engine.engine import Engine
from inferflux.engine.request import Request
from inferflux.engine.speculative import ngram_propose
from inferflux.formats.loader import load_model
from tests.fixtures.abort_cycles import run_abort_cycles

RUNTIME = dict(page_size=16, max_num_seqs=16, max_num_batched_tokens=128, max_model_len=512, num_pages=400,
               max_logprobs=5)
SPEC = dict(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)


def config(spec: bool = True, **runtime):
    overrides = {f"runtime.{k}": v for k, v in {**RUNTIME, **runtime}.items()}
    if spec:
        overrides.update({f"speculative.{k}": v for k, v in SPEC.items()})
    return load_config(overrides=overrides)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plain(model_dir):
    return LLM(model_dir, config(spec=False))


@pytest.fixture(scope="module")
def spec(model_dir):
    return LLM(model_dir, config())


def repetitive_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a random phrase, so prompt lookup finds its continuation."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        phrase = [int(t) for t in rng.integers(1, 900, size=rng.integers(3, 12))]
        prompts.append((phrase * 40)[:int(rng.integers(8, 200))])
    return prompts


def test_ngram_propose_takes_the_latest_longest_match() -> None:
    ids = [5, 6, 7, 1, 2, 9, 9, 1, 2, 3, 4, 8, 1, 2]
    assert ngram_propose(ids, 1, 3, 3) == [3, 4, 8]  # "1 2" last seen before 3 4 8
    assert ngram_propose(ids, 1, 3, 10) == [3, 4, 8, 1, 2]
    assert ngram_propose([1, 2, 3], 1, 2, 4) == []
    assert ngram_propose([4, 4], 1, 1, 2) == [4]


def generate(llm: LLM, prompts, params):
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


def test_greedy_is_token_identical_alone_and_batched(plain, spec) -> None:
    prompts = repetitive_prompts(8, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [generate(plain, [p], params)[0] for p in prompts]
    before = spec.engine.stats()
    alone = [generate(spec, [p], params)[0] for p in prompts]
    assert alone == expected
    # A batch of 8: half opt out, so speculating and ordinary rows share steps.
    mixed = [dataclass_replace(params, speculative=i % 2 == 0) for i in range(8)]
    outs = spec.generate(prompts, mixed)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = spec.engine.stats()
    assert stats.spec_accepted_tokens - before.spec_accepted_tokens > 0
    assert stats.spec_draft_tokens >= stats.spec_accepted_tokens
    assert spec.engine.allocator.num_free == spec.engine.allocator.num_usable  # parked prefix pages count as free


def dataclass_replace(params: SamplingParams, **changes) -> SamplingParams:
    return dataclasses.replace(params, **changes)


def test_fewer_steps_and_the_opt_out(plain, spec) -> None:
    """A prompt that repeats itself is generated in fewer steps; `speculative: false` proposes nothing."""
    prompt = repetitive_prompts(1, seed=3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    steps = spec.engine.stats().num_steps
    drafts = spec.engine.stats().spec_draft_tokens
    off = generate(spec, [prompt], dataclass_replace(params, speculative=False))
    assert spec.engine.stats().spec_draft_tokens == drafts
    off_steps = spec.engine.stats().num_steps - steps
    steps = spec.engine.stats().num_steps
    on = generate(spec, [prompt], params)
    assert on == off == generate(plain, [prompt], params)
    assert spec.engine.stats().num_steps - steps < off_steps


def test_sampled_penalties_logprobs_and_n_are_token_identical(plain, spec) -> None:
    """Seeded sampling draws the same tokens (and logprobs) with speculation: each verified row samples with
    the key, penalties and min_tokens ban of its position."""
    prompts = repetitive_prompts(6, seed=1)
    cases = [
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=30, seed=11, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=5, max_tokens=30, seed=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=30, repetition_penalty=1.3, presence_penalty=0.2, min_tokens=20),
        SamplingParams(temperature=0.5, max_tokens=20, seed=13, n=3, ignore_eos=True),
    ]
    for params in cases:
        want = plain.generate(prompts, params)
        got = spec.generate(prompts, params)
        for w, g in zip(want, got):
            for wo, go in zip(w.outputs, g.outputs):
                assert go.token_ids == wo.token_ids
                if params.logprobs is not None:
                    assert [lp.token_id for lp in go.logprobs] == [lp.token_id for lp in wo.logprobs]
                    np.testing.assert_allclose([lp.logprob for lp in go.logprobs],
                                               [lp.logprob for lp in wo.logprobs], atol=1e-4)


def test_sampled_distribution_at_a_position_matches(plain, spec) -> None:
    """Over many unseeded requests the token at an accepted-heavy position has the target's distribution
    (chi-square, as the sampler tests do): speculation must not bias sampling toward its proposals."""
    from scipy import stats as scipy_stats

    # A cycle of four tokens, and a logit bias that makes the model pick among them: prompt lookup proposes
    # the cycle's next token, which the target samples often but not always (both runs use the same bias).
    cycle = [10, 20, 30, 40]
    prompt = cycle * 10
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, logit_bias={t: 6.0 for t in cycle})
    position = 6
    count = 300
    before = spec.engine.stats().spec_accepted_tokens
    # Different seeds for the two runs: with equal seeds the tokens are equal (the test above), which a
    # chi-square test would pass trivially.
    a = [o.outputs[0].token_ids[position] for o in plain.generate(
        [prompt] * count, [dataclass_replace(params, seed=i) for i in range(count)])]
    b = [o.outputs[0].token_ids[position] for o in spec.generate(
        [prompt] * count, [dataclass_replace(params, seed=10_000 + i) for i in range(count)])]
    assert spec.engine.stats().spec_accepted_tokens > before  # proposals were made and some accepted
    tokens = sorted(set(a) | set(b))
    table = np.array([[a.count(t) for t in tokens], [b.count(t) for t in tokens]])
    keep = table.sum(axis=0) >= 10  # pool rare tokens so every expected count is large enough
    table = np.column_stack([table[:, keep], table[:, ~keep].sum(axis=1)]) if (~keep).any() else table[:, keep]
    table = table[:, table.sum(axis=0) > 0]
    assert table.shape[1] >= 2
    p = scipy_stats.chi2_contingency(table)[1]
    assert p > 1e-3, (p, table)


def test_no_page_leaks_after_200_speculative_requests_with_aborts(model_dir) -> None:
    """200 speculative submit/abort cycles (break, cancel, abort by id, finish) free every page."""
    rng = random.Random(7)
    prompts = repetitive_prompts(200, seed=5)
    engine = Engine(load_model(model_dir), config()).start()

    def make_request(i: int, prompt: list[int]) -> Request:
        return Request(prompt, SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 30),
                                              seed=i, ignore_eos=True))

    async def main() -> tuple[int, int]:
        return await run_abort_cycles(engine, prompts, make_request, rng)

    try:
        start_free, end_free = asyncio.run(main())
        stats = engine.stats()
    finally:
        engine.stop()
    assert end_free == start_free
    assert stats.spec_accepted_tokens > 0
    assert not engine.core.has_unfinished
    assert not engine.core.speculation._backoff  # per-sequence state goes with the sequence


def test_server_opt_out_metrics_and_status(model_dir) -> None:
    """Through the server: `speculative: false` gives the same text, /metrics counts proposals under vLLM's
    names, and `inferctl status` shows the acceptance."""
    import subprocess
    import sys

    import httpx
    import openai

    from tests.fixtures.server import Server

    srv = Server(model_dir, "tiny", extra=[f"speculative.{k}={v}" for k, v in SPEC.items()])
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        cycle = [10, 20, 30, 40]  # greedy among four tokens (logit bias): the output loops, lookup finds it
        texts = []
        for extra in ({"speculative": False}, {}):
            done = client.completions.create(model="tiny", prompt=cycle * 8, max_tokens=32, temperature=0.0,
                                             logit_bias={str(t): 10.0 for t in cycle},
                                             extra_body={"ignore_eos": True, **extra})
            texts.append(done.choices[0].text)
        assert texts[0] == texts[1]
        metrics = httpx.get(srv.url + "/metrics").text
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith(("vllm:spec_decode", "inferflux:spec_decode"))}
        assert values["vllm:spec_decode_num_draft_tokens_total"] >= values["vllm:spec_decode_num_accepted_tokens_total"]
        assert values["vllm:spec_decode_num_accepted_tokens_total"] > 0
        assert 0 < values["inferflux:spec_decode_acceptance_rate"] <= 1
        assert values["inferflux:spec_decode_mean_accepted_length"] > 1
        out = subprocess.run([sys.executable, "-m", "inferctl.cli", "status", "--url", srv.url, "--json",
                              "--window", "0"], capture_output=True, text=True, timeout=60)
        status = json.loads(out.stdout)
        assert status["spec_accepted_tokens_total"] == values["vllm:spec_decode_num_accepted_tokens_total"]
        assert 0 < status["spec_acceptance_rate"] <= 1
        bad = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "speculative": "maybe"})
        assert bad.status_code == 400
        dialect_opt_outs(srv, client)
    finally:
        assert srv.stop() == 0, srv.output()


def dialect_opt_outs(srv, client) -> None:
    """Each dialect's request carries `speculative: false` (Ollama: in `options`): with it the server proposes
    nothing for the request, without it the same request gets proposals (a repeated phrase: lookup finds it)."""
    import anthropic
    import httpx
    import ollama

    def drafted() -> float:
        for line in httpx.get(srv.url + "/metrics").text.splitlines():
            if line.startswith("vllm:spec_decode_num_draft_tokens_total"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no draft token counter")

    text = "one two three four " * 6
    ask = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    calls = {
        "ollama": lambda extra: ollama.Client(host=srv.url).generate(
            model="tiny", prompt=text, raw=True, options={"num_predict": 12, "temperature": 0, **extra}),
        "anthropic": lambda extra: ask.messages.create(
            model="tiny", max_tokens=12, messages=[{"role": "user", "content": text}],
            extra_body={"temperature": 0, **extra}),
        "responses": lambda extra: client.responses.create(
            model="tiny", input=text, max_output_tokens=12, temperature=0, extra_body=extra),
    }
    for name, call in calls.items():
        before = drafted()
        call({"speculative": False})
        assert drafted() == before, name
        call({})
        assert drafted() > before, name
    bad = httpx.post(srv.url + "/api/generate", json={"model": "tiny", "prompt": "x", "stream": False,
                                                      "options": {"speculative": "maybe"}})
    assert bad.status_code == 400 and "speculative" in bad.text


def test_back_off_pauses_a_sequence_whose_proposals_fail(spec) -> None:
    """Eight verifications with nothing accepted pause proposing for 16 decode steps, then it probes again;
    a second bad window pauses twice as long."""
    from inferflux.engine.sequence import Sequence
    from inferflux.engine.speculative import PAUSE_START, WINDOW

    class Proposing:  # what the scheduler does for one sequence: its room, then the proposals that fit
        def __init__(self, speculation) -> None:
            self.speculation = speculation

        def __getattr__(self, name):
            return getattr(self.speculation, name)

        def propose(self, seq, budget: int) -> list[int]:
            room = self.speculation.room(seq, budget)
            return self.speculation.propose([(seq, room)])[0] if room else []

    speculation = Proposing(spec.engine.speculation)
    seq = Sequence([1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=100), seed=0, max_model_len=512)
    assert speculation.propose(seq, 8) == [3, 1, 2]
    for _ in range(WINDOW):
        speculation._record(seq, 4, 0)
    assert [speculation.propose(seq, 8) for _ in range(PAUSE_START)] == [[]] * PAUSE_START
    assert speculation.propose(seq, 8) == [3, 1, 2]
    for _ in range(WINDOW):
        speculation._record(seq, 4, 0)
    assert all(speculation.propose(seq, 8) == [] for _ in range(2 * PAUSE_START))
    assert speculation.propose(seq, 8) == [3, 1, 2]
    assert speculation.propose(seq, 2) == [3, 1]  # the budget caps it
    speculation.forget(seq)
    assert seq.seq_id not in speculation._backoff
    opted_out = Sequence([1, 2, 1, 2], SamplingParams(max_tokens=100, speculative=False), seed=0, max_model_len=512)
    assert speculation.propose(opted_out, 8) == []
    short = Sequence([1, 2, 1, 2], SamplingParams(max_tokens=2), seed=0, max_model_len=512)
    assert speculation.propose(short, 8) == [1]  # one proposal + the token after it = max_tokens
    assert speculation.room(short, 8) == 1


def test_draft_model_quantized_copy_is_token_identical(model_dir, tiny_gguf, plain) -> None:
    """`method: draft` with a Q8_0 copy of the same model: greedy output equals the target's alone, and the
    draft's proposals are often accepted."""
    cfg = config()
    cfg.speculative.method = "draft"
    cfg.speculative.draft_model = str(tiny_gguf("llama", "Q8_0"))
    llm = LLM(model_dir, cfg)
    prompts = repetitive_prompts(4, seed=9) + [[5, 77, 301, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = generate(plain, prompts, params)
    assert [generate(llm, [p], params)[0] for p in prompts] == expected
    drafter = llm.engine.speculation.drafter
    assert drafter is not None
    draft_step, widths = drafter.runner.step, []

    def counted(chunks):  # the real draft step; records how many sequences each one ran
        widths.append(len(chunks))
        return draft_step(chunks)

    drafter.runner.step = counted
    assert generate(llm, prompts, params) == expected  # batched
    drafter.runner.step = draft_step
    assert max(widths) == len(prompts)  # one draft step proposes for every speculating sequence at once
    eight = prompts + repetitive_prompts(3, seed=10)  # a batch of 8, half opting out
    mixed = [dataclass_replace(params, speculative=i % 2 == 0) for i in range(8)]
    assert [o.outputs[0].token_ids for o in llm.generate(eight, mixed)] == generate(plain, eight, params)
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens > 0.3 * stats.spec_draft_tokens > 0
    seeded = SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, seed=3)
    assert generate(llm, prompts, seeded) == generate(plain, prompts, seeded)
    assert drafter.allocator.num_free == drafter.allocator.num_usable  # all released


def test_warmup_builds_the_verify_and_draft_programs_decoding_needs(model_dir, tiny_gguf) -> None:
    """With runtime.warmup, the target's verify programs of speculating decode steps and the draft model's step
    programs exist before the first request, so a batch that speculates from its first decode step on
    compiles nothing."""
    cfg = config(warmup=True, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=256)
    cfg.speculative.method = "draft"
    cfg.speculative.draft_model = str(tiny_gguf("llama", "Q8_0"))
    llm = LLM(model_dir, cfg)
    verifier, drafter = llm.engine.speculation.verifier, llm.engine.speculation.drafter
    assert set(verifier.compiled) == set(verifier.decode_keys(SPEC["num_speculative_tokens"]))
    assert {key[0] for key in verifier.compiled} == {2, 4, 8, 16}
    assert drafter is not None and drafter.runner.compiled_buckets == set(drafter.runner.all_buckets())
    programs = set(llm.engine.runner.programs.keys()), set(drafter.runner.programs.keys())
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [3, 4, 3, 4, 3, 4]]  # both prefill in the first step
    generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert llm.engine.stats().spec_draft_tokens > 0
    assert (set(llm.engine.runner.programs.keys()), set(drafter.runner.programs.keys())) == programs


def test_warmup_covers_verify_steps_when_the_smallest_token_bucket_is_8(model_dir) -> None:
    """With buckets from 8 tokens (GPU's default, or CPU without the kernels), a verify step of 3 rows runs in
    the 8-token program with 4 rows: warm-up builds those row buckets too."""
    llm = LLM(model_dir, config(warmup=True, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=256,
                                min_token_bucket=8))
    verifier = llm.engine.speculation.verifier
    assert {(key[0], key[3]) for key in verifier.compiled} == {(8, 2), (8, 4), (8, 8), (16, 16)}
    programs = set(llm.engine.runner.programs.keys())
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [3, 4, 3, 4, 3, 4]]
    generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    generate(llm, prompts[:1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert llm.engine.stats().spec_draft_tokens > 0
    assert set(llm.engine.runner.programs.keys()) == programs


def test_draft_model_of_another_vocabulary_is_a_clear_error(model_dir, tiny_model) -> None:
    from inferflux.engine.speculative_draft import DraftModelError

    other = tiny_model("qwen2")
    cfg = config()
    cfg.speculative.method = "draft"
    cfg.speculative.draft_model = str(other)
    with pytest.raises(DraftModelError, match="vocabulary"):
        LLM(model_dir, cfg)


def test_draft_model_of_the_same_size_but_other_tokens_is_a_clear_error(model_dir, tmp_path) -> None:
    """Two token ids swapped in the draft's tokenizer: same vocabulary size, other meaning; refused at start."""
    import shutil

    from inferflux.engine.speculative_draft import DraftModelError

    draft = shutil.copytree(model_dir, tmp_path / "draft")
    spec = json.loads((draft / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (draft / "tokenizer.json").write_text(json.dumps(spec))
    cfg = config()
    cfg.speculative.method = "draft"
    cfg.speculative.draft_model = str(draft)
    with pytest.raises(DraftModelError, match="other tokens.*token id 300"):
        LLM(model_dir, cfg)
