"""One sequence being generated: its tokens, its pages, how far its KV cache is filled, and when it stops.

Both the research batch loop (`inferflux.llm`) and the server's scheduler
drive sequences through the same three calls: `next_chunk` (which tokens to
run next), `append` (a sampled token arrived) and `check_stop`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable
from collections.abc import Sequence as Seq

from inferflux.engine.sampling_params import SamplingParams
from inferflux.engine.sampling_rows import RowParams

_ids = itertools.count()


@dataclasses.dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: dict[int, float]  # the top-N alternatives (token id -> logprob)


@dataclasses.dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_model_len: int
    eos_ids: frozenset[int] = frozenset()
    seq_id: int = dataclasses.field(default_factory=lambda: next(_ids))
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    # Logprobs of prompt tokens 1.. (token 0 has none), collected while the prompt runs (params.prompt_logprobs).
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    page_hashes: list[int] = dataclasses.field(default_factory=list)  # prefix-cache keys of its full pages
    num_computed: int = 0  # tokens whose K/V is in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    finish_reason: str | None = None  # "stop", "length" or "abort"
    parent: Sequence | None = None  # n > 1: the sample whose prompt pages this one reuses
    adapter: Hashable = None  # LoRA adapter set's key, engine/lora.py `AdapterSet.key` (prefix-cache keys include it)
    index: int = 0  # which of the request's n samples
    pooling: str | None = None  # an embedding request ("mean" or "last"): prompt only, nothing sampled

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def is_embedding(self) -> bool:
        return self.pooling is not None

    @property
    def computes_every_position(self) -> bool:
        """Every prompt token must run here (so none come from the prefix cache): scoring needs each
        position's logits, an embedding each position's hidden state."""
        return self.is_embedding or self.wants_prompt_logprobs

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt still has tokens to score (only the first sample scores; the others share its list)."""
        return (self.params.prompt_logprobs is not None and self.index == 0
                and len(self.prompt_logprobs) < len(self.prompt_ids) - 1)

    def next_chunk(self, budget: int) -> list[int]:
        """Up to `budget` tokens not yet in the cache (a prompt chunk, or the last sampled token)."""
        tokens = self.all_ids
        return tokens[self.num_computed:self.num_computed + budget]

    def row_params(self, ahead: int = 0) -> RowParams:
        """This sequence's sampling knobs for the next token, as the sampler's row; `ahead` > 0: for the token
        that many positions later, as if the tokens before it had been generated (speculative verification)."""
        p = self.params
        step = len(self.output_ids) + ahead
        bias = {int(k): float(v) for k, v in (p.logit_bias or {}).items()}
        if step < p.min_tokens:  # min_tokens: stop tokens cannot be sampled yet
            bias.update({t: float("-inf") for t in self._stop_ids()})
        row = RowParams.from_sampling_params(p, step=step)
        return dataclasses.replace(row, seed=self.seed, logit_bias=bias)

    def _stop_ids(self) -> set[int]:
        p = self.params
        return set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(self.eos_ids))

    def append(self, token_id: int, logprob: float, top_ids: Seq[int], top_logprobs: Seq[float]) -> None:
        self.output_ids.append(token_id)
        if self.params.logprobs is not None:
            n = self.params.logprobs
            self.logprobs.append(TokenLogprobs(
                token_id, logprob, {int(t): float(v) for t, v in zip(top_ids[:n], top_logprobs[:n])}))
        self.check_stop()

    def check_stop(self) -> None:
        p = self.params
        if len(self.output_ids) >= p.min_tokens and self.output_ids[-1] in self._stop_ids():
            self.finish_reason = "stop"
        elif p.max_tokens is not None and len(self.output_ids) >= p.max_tokens:
            self.finish_reason = "length"
        elif len(self.prompt_ids) + len(self.output_ids) >= self.max_model_len:
            self.finish_reason = "length"
