"""The engine side of the /debug token trace: what it costs the step when off, what it records when on.

A real `LLM` on the tiny model; the runner's `step` is wrapped only to read the rows it is given (each
row's `top_logprobs` decides whether the step runs the sampler's top-N). Off (no trace attached), a
request without logprobs asks for none; on, every row asks for the trace's `top_n`, the trace records
that many finite alternatives, and the outputs still carry no logprobs.
"""

from __future__ import annotations

import math

import pytest

from inferflux import LLM, SamplingParams
from inferflux.engine.token_trace import TokenTrace

PROMPT = [5, 17, 42, 99, 7, 230, 64, 3]


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(tiny_model("llama"), page_size=16, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128,
               num_pages=40, max_logprobs=5)


def _rows_asked(llm: LLM) -> list[int]:
    """Each sampled row's top_logprobs, for every step from now on (the runner's step, wrapped)."""
    asked: list[int] = []
    step = llm.engine.runner.step

    def recording(chunks, **kwargs):  # kwargs: an overlapped step's token feed (engine/overlap.py)
        asked.extend(c.sampling.top_logprobs for c in chunks if c.sampling is not None)
        return step(chunks, **kwargs)

    llm.engine.runner.step = recording  # type: ignore[method-assign]
    return asked


def test_trace_off_asks_for_no_alternatives_and_on_asks_for_top_n(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    asked = _rows_asked(llm)
    assert llm.engine.token_trace is None
    off = llm.generate([PROMPT], params)[0].outputs[0]
    assert asked and set(asked) == {0}  # free steps: no row wants the top-N, so the step skips it
    asked.clear()
    trace = llm.engine.token_trace = TokenTrace(max_requests=4, top_n=3)
    try:
        on = llm.generate([PROMPT], params)[0].outputs[0]
        with_logprobs = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                              logprobs=5))[0].outputs[0]
    finally:
        llm.engine.token_trace = None
    assert set(asked) == {3, 5}  # the trace's 3 for the bare request, the 5 the other asked for
    assert on.token_ids == off.token_ids and on.logprobs is None  # the response is what it was without the trace
    assert len(with_logprobs.logprobs) == 6 and all(len(t.top) == 5 for t in with_logprobs.logprobs)
    bare, asked_five = sorted(trace.snapshot(), key=lambda entry: entry["started"])
    tokens = bare["samples"][0]
    assert [t[0] for t in tokens] == on.token_ids
    for token_id, logprob, top, _ in tokens:
        assert len(top) == 3 and all(math.isfinite(v) for _, v in top)
        assert top[0] == (token_id, pytest.approx(logprob, abs=1e-5))  # greedy: the most likely token
    assert all(len(t[2]) == 5 for t in asked_five["samples"][0])  # more when the request asked for more
