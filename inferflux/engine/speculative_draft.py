"""Draft-model proposals (`speculative.method: draft`): a smaller or more quantized model of the same
vocabulary proposes k tokens greedily; the target verifies them as it verifies prompt lookup.

The draft runs on the engine thread with its own `ModelRunner` (its own paged KV cache and compiled
programs) and its own page allocator, with no prefix caching. Per target sequence it keeps the tokens whose
K/V its cache holds; before proposing, it keeps the longest prefix of them that the sequence still has
(after the target accepted some proposals and rejected the rest, only those survive), computes the rest
(a catch-up chunk, cut to the step's token budget), then decodes k tokens greedily, one draft step each.
Draft steps are batched like the target's: every sequence speculating in a target step runs in the same
draft steps (catch-up chunks and decodes mixed, ragged), so 8 streams pay for k + 1 draft steps, not 8(k + 1).

Greedy proposals are a point mass, so the target's verification (engine/speculative.py) keeps its
output exactly its own for greedy and sampled requests alike. When the draft's cache has no page left
for a sequence, that sequence simply gets no more proposals (its draft state is dropped and rebuilt later).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from pathlib import Path

from inferflux.config import Config
from inferflux.engine.kv_cache import PageAllocator
from inferflux.engine.model_runner import Chunk, ModelRunner
from inferflux.engine.sampling_rows import RowParams
from inferflux.engine.sequence import Sequence
from inferflux.errors import InferFluxError
from inferflux.formats.loader import load_model
from inferflux.formats.model_config import ModelConfig
from inferflux.formats.tokenizer import Tokenizer

GREEDY = RowParams(temperature=0.0, seed=0)
STALL_STEPS = 16  # proposal calls a sequence skips after the draft cache had no page for it


class DraftModelError(InferFluxError):
    """The draft model cannot propose for the target (missing, or another vocabulary)."""


@dataclasses.dataclass
class _DraftSeq:
    ids: list[int] = dataclasses.field(default_factory=list)  # tokens whose K/V the draft cache holds
    pages: list[int] = dataclasses.field(default_factory=list)


def _same_tokens(source: str, draft: Tokenizer, target: Tokenizer) -> None:
    """A draft of the right size but other tokens (another tokenizer, or ids in another order) proposes ids
    that mean other text: an error at start, naming the first id that differs."""
    ours, theirs = draft.backend.get_vocab(with_added_tokens=True), target.backend.get_vocab(with_added_tokens=True)
    if ours != theirs:
        by_id = {i: t for t, i in ours.items()}
        first = min(i for t, i in theirs.items() if by_id.get(i) != t)
        raise DraftModelError(
            f"speculative.draft_model {source} has other tokens than the model it drafts for (token id {first} "
            f"is {by_id.get(first)!r} there, {target.id_to_token(first)!r} here): a draft must share the "
            "target's vocabulary")


@dataclasses.dataclass
class _Pending:
    """A sequence still proposing in this call: the tokens its next draft step runs, how many proposals."""

    index: int
    seq: Sequence
    state: _DraftSeq
    tokens: list[int]
    k: int


class DraftProposer:
    def __init__(self, config: Config, target: ModelConfig, tokenizer: Tokenizer | None = None) -> None:
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
        if tokenizer is not None:
            _same_tokens(source, model.tokenizer, tokenizer)
        runtime = dataclasses.replace(config.runtime, warmup=False, max_loras=0, prefix_caching=False,
                                      max_logprobs=0)
        self.runner = ModelRunner(model, runtime)
        if config.runtime.warmup:  # its step programs too, so the first proposals do not wait for compiles
            self.runner.warmup()
        self.page_size = self.runner.page_size
        self.allocator = PageAllocator(self.runner.num_pages, self.page_size, prefix_caching=False)
        self.max_chunk = runtime.max_num_batched_tokens
        self.max_seqs = runtime.max_num_seqs
        self._seqs: dict[int, _DraftSeq] = {}
        self._stalled: dict[int, int] = {}  # seq id -> calls left without proposals (its draft cache was full)

    def propose(self, items: Seq[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k greedy draft tokens after each (sequence, k), all sequences in the same draft steps;
        a sequence whose draft cache runs out of pages gets the proposals it has so far, and none for the next
        STALL_STEPS calls (its dropped state would otherwise be recomputed from its first token each step)."""
        out: list[list[int]] = [[] for _ in items]
        live: list[_Pending] = []
        for i, (seq, k) in enumerate(items):
            if self._stalled.get(seq.seq_id, 0) > 0:
                self._stalled[seq.seq_id] -= 1
                continue
            if len(seq.all_ids) + k > self.runner.max_model_len:  # past the draft's context: nothing to run
                continue
            state = self._seqs.setdefault(seq.seq_id, _DraftSeq())
            target = seq.all_ids
            keep = 0
            for a, b in zip(state.ids, target[:-1]):  # the last token is always run: its logits give proposal 1
                if a != b:
                    break
                keep += 1
            self._truncate(state, keep)
            if k > 0:
                live.append(_Pending(i, seq, state, list(target[keep:]), k))
        while live:
            batch: list[tuple[_Pending, list[int]]] = []
            budget = self.max_chunk
            for entry in live:
                if len(batch) == self.max_seqs or budget == 0:
                    break
                run = entry.tokens[:budget]
                if not self._cover(entry.state, len(entry.state.ids) + len(run)):
                    self.forget(entry.seq)
                    self._stalled[entry.seq.seq_id] = STALL_STEPS
                    entry.k = 0  # no room: keep what it has
                    continue
                batch.append((entry, run))
                budget -= len(run)
            chunks = [Chunk(tokens=run, start_pos=len(e.state.ids), pages=e.state.pages,
                            sampling=None if len(run) < len(e.tokens) else GREEDY) for e, run in batch]
            for (entry, run), sample in zip(batch, self.runner.step(chunks) if chunks else []):
                entry.state.ids += run
                entry.tokens = entry.tokens[len(run):]
                if sample is not None:  # the chunk reached the last token: its sample is the next proposal
                    out[entry.index].append(sample.token_id)
                    entry.tokens = [sample.token_id]
            live = [e for e in live if e.k > len(out[e.index])]
        return out

    def forget(self, seq: Sequence) -> None:
        self._stalled.pop(seq.seq_id, None)
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
