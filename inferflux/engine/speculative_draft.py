"""Draft-model proposals (`speculative.method: draft`): a smaller or more quantized model of the same
vocabulary proposes k tokens greedily; the target verifies them as it verifies prompt lookup.

The draft runs on the engine thread with its own `ModelRunner` (its own paged KV cache and compiled
programs) and its own page allocator, with no prefix caching. Per target sequence it keeps the tokens whose
K/V its cache holds; before proposing, it keeps the longest prefix of them that the sequence still has
(after the target accepted some proposals and rejected the rest, only those survive), computes the rest
(a catch-up chunk, cut to the step's token budget), then decodes k tokens greedily, one draft step each.

Greedy proposals are a point mass, so the target's verification (engine/speculative.py) keeps its
output exactly its own for greedy and sampled requests alike. When the draft's cache has no page left
for a sequence, that sequence simply gets no proposals (its draft state is dropped and rebuilt later).
Draft steps run one sequence at a time: simple, and the draft is meant to be much cheaper than the target.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from inferflux.config import Config
from inferflux.engine.kv_cache import PageAllocator
from inferflux.engine.model_runner import Chunk, ModelRunner
from inferflux.engine.sampling_rows import RowParams
from inferflux.engine.sequence import Sequence
from inferflux.errors import InferFluxError
from inferflux.formats.loader import load_model
from inferflux.formats.model_config import ModelConfig

GREEDY = RowParams(temperature=0.0, seed=0)


class DraftModelError(InferFluxError):
    """The draft model cannot propose for the target (missing, or another vocabulary)."""


@dataclasses.dataclass
class _DraftSeq:
    ids: list[int] = dataclasses.field(default_factory=list)  # tokens whose K/V the draft cache holds
    pages: list[int] = dataclasses.field(default_factory=list)


class DraftProposer:
    def __init__(self, config: Config, target: ModelConfig) -> None:
        source = config.speculative.draft_model
        if not source:
            raise DraftModelError("speculative.method=draft needs speculative.draft_model (a path or a stored "
                                  "model's name)")
        from inferflux.store import open_store

        try:
            path = open_store(config.home_path).resolve(source)
        except InferFluxError as exc:
            raise DraftModelError(f"speculative.draft_model: {exc}") from None
        model = load_model(Path(path))
        if model.config.vocab_size != target.vocab_size:
            raise DraftModelError(
                f"speculative.draft_model {source} has a vocabulary of {model.config.vocab_size} tokens, the "
                f"model it drafts for {target.vocab_size}: a draft must share the target's vocabulary")
        runtime = dataclasses.replace(config.runtime, warmup=False, max_loras=0, prefix_caching=False,
                                      max_logprobs=0)
        self.runner = ModelRunner(model, runtime)
        self.page_size = self.runner.page_size
        self.allocator = PageAllocator(self.runner.num_pages, self.page_size, prefix_caching=False)
        self.max_chunk = runtime.max_num_batched_tokens
        self._seqs: dict[int, _DraftSeq] = {}

    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to `k` greedy draft tokens after the sequence's tokens; [] when the draft cache is full."""
        state = self._seqs.setdefault(seq.seq_id, _DraftSeq())
        target = seq.all_ids
        keep = 0
        for a, b in zip(state.ids, target[:-1]):  # the last token is always run: its logits give proposal 1
            if a != b:
                break
            keep += 1
        self._truncate(state, keep)
        pending = target[keep:]
        proposals: list[int] = []
        while len(proposals) < k:
            run, rest = pending[:self.max_chunk], pending[self.max_chunk:]
            if not self._cover(state, len(state.ids) + len(run)):
                self.forget(seq)
                return []
            out = self.runner.step([Chunk(tokens=run, start_pos=len(state.ids), pages=state.pages,
                                          sampling=None if rest else GREEDY)])[0]
            state.ids += run
            if rest:
                pending = rest
                continue
            assert out is not None
            proposals.append(out.token_id)
            pending = [out.token_id]
        return proposals

    def forget(self, seq: Sequence) -> None:
        state = self._seqs.pop(seq.seq_id, None)
        if state is not None and state.pages:
            self.allocator.release(state.pages)

    def _truncate(self, state: _DraftSeq, length: int) -> None:
        state.ids = state.ids[:length]
        keep = -(-length // self.page_size)
        if len(state.pages) > keep:
            self.allocator.release(state.pages[keep:])
            state.pages = state.pages[:keep]

    def _cover(self, state: _DraftSeq, length: int) -> bool:
        need = -(-length // self.page_size) - len(state.pages)
        if need <= 0:
            return True
        if need > self.allocator.num_free or length > self.runner.max_model_len:
            return False
        state.pages = state.pages + self.allocator.allocate(need)
        return True
