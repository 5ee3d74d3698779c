"""Speculative decoding: propose a few tokens per sequence, verify them all in one target step.

```
schedule: a decoding sequence's chunk = [last token] + proposals (ngram prompt lookup), within the budget
step:     the verify program samples after every token of such a chunk (engine/speculative_verify.py)
accept:   the longest prefix of proposals equal to the tokens sampled there, plus the next sampled token;
          K/V of rejected proposals rolled back (pages past the new length freed, never registered)
```

Why the output is exactly the target's, greedy or sampled: the token sampled after proposal j is drawn
with the key ordinary decoding would use at that position (`fold_in(seed, step)`, engine/sampler.py),
from the same processed and filtered logits. A proposal is accepted iff it equals that token, so every
token emitted is the token non-speculative decoding would have emitted: speculation changes the speed,
never the text. This *is* the standard rejection-sampling rule for a proposer whose distribution q is a
point mass on its proposal x (prompt lookup): the Gumbel-max draw equals x with probability p(x) (accept
with min(1, p(x)/q(x)) = p(x)), and when it does not, it is distributed as p restricted to the other
tokens and renormalised, which is norm(max(0, p - q)). With temperature, top-p/k and min-p applied as the
sampler applies them, p is the distribution the sampler draws from.

Who speculates: every decoding sequence while `speculative.method` is not "off", unless the request
says `speculative: false`, or has a grammar constraint (the mask after proposal j depends on the grammar
state after it, which only advances on accepted tokens). Everything else composes: a step mixes
speculating and ordinary rows, LoRA coefficients are per sequence, logprobs are per sampled row, and
penalties and `min_tokens` see the proposals before each row.

Back-off: a sequence whose proposals are mostly rejected stops proposing for a while (16 steps, doubling
up to 512 while it stays low), so free generation keeps ordinary decode steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from inferflux.config import Config
from inferflux.engine.model_runner import Chunk, ModelRunner, Sampled
from inferflux.engine.request import StreamOutput
from inferflux.engine.sequence import Sequence
from inferflux.engine.speculative_verify import Verifier

if TYPE_CHECKING:
    from inferflux.engine.core import EngineCore
    from inferflux.engine.scheduler import ScheduledChunk
    from inferflux.engine.speculative_draft import DraftProposer
    from inferflux.formats.tokenizer import Tokenizer

WINDOW = 8  # verified proposal steps per acceptance check
MIN_ACCEPTANCE = 0.25  # accepted / proposed over a window below this pauses proposing
PAUSE_START, PAUSE_MAX = 16, 512  # decode steps a low-acceptance sequence waits before proposing again


def ngram_propose(ids: Seq[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Prompt lookup: the (up to) `k` tokens that followed the latest earlier occurrence of the last n tokens
    of `ids`, for the longest n in [n_min, n_max] that occurs; [] when none does."""
    arr = np.asarray(ids, np.int32)
    length = len(arr)
    if k <= 0:
        return []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        # Windows of arr[:-1]: a match starting at i ends before the last token, so something follows it.
        hits = np.flatnonzero((sliding_window_view(arr[:-1], n) == arr[length - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return [int(t) for t in arr[start:start + k]]
    return []


@dataclasses.dataclass
class _Backoff:
    proposed: int = 0  # proposals verified in the current window
    accepted: int = 0
    steps: int = 0
    pause: int = 0  # decode steps left without proposing
    next_pause: int = PAUSE_START


@dataclasses.dataclass
class SpecStats:
    draft_tokens: int = 0  # tokens proposed and verified
    accepted_tokens: int = 0  # of those, accepted
    num_drafts: int = 0  # verifications (a sequence's proposals in one step)


class Speculation:
    """The engine's speculative decoding: proposing (the scheduler calls `propose`), verifying, accepting."""

    def __init__(self, config: Config, runner: ModelRunner, tokenizer: Tokenizer | None = None) -> None:
        self.config = config.speculative
        self.enabled = self.config.method != "off"
        self.verifier = Verifier(runner)
        self.drafter: DraftProposer | None = None
        if self.config.method == "draft":
            from inferflux.engine.speculative_draft import DraftProposer

            self.drafter = DraftProposer(config, runner.config, tokenizer)
        self.batched = self.drafter is not None  # draft steps run for every speculating sequence at once
        self.stats = SpecStats()
        self._backoff: dict[int, _Backoff] = {}  # seq id -> its back-off state

    # --- proposing (scheduler: `room`, then `propose`) ---

    def eligible(self, seq: Sequence) -> bool:
        return (self.enabled and seq.params.speculative is not False and not seq.is_embedding
                and seq.params.constraint is None)

    def room(self, seq: Sequence, budget: int) -> int:
        """How many tokens a decoding sequence may propose after its last one this step: 0 when it does not
        speculate (or is paused by the back-off), else at most `budget`, never past its `max_tokens` or the
        context (the token after the last proposal must still be one it may emit)."""
        if not self.eligible(seq):
            return 0
        state = self._backoff.setdefault(seq.seq_id, _Backoff())
        if state.pause > 0:
            state.pause -= 1
            return 0
        k = min(self.config.num_speculative_tokens, budget, seq.max_model_len - len(seq.prompt_ids)
                - len(seq.output_ids) - 1)
        if seq.params.max_tokens is not None:
            k = min(k, seq.params.max_tokens - len(seq.output_ids) - 1)
        return max(0, k)

    def propose(self, items: Seq[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k tokens to verify after each (sequence, k) (k from `room`): the draft model's, for all of
        them in batched draft steps, or prompt lookup's."""
        if self.drafter is not None:
            return self.drafter.propose(items)
        return [ngram_propose(seq.all_ids, self.config.prompt_lookup_min, self.config.prompt_lookup_max, k)
                for seq, k in items]

    def forget(self, seq: Sequence) -> None:
        self._backoff.pop(seq.seq_id, None)
        if self.drafter is not None:
            self.drafter.forget(seq)

    def _record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        self.stats.draft_tokens += proposed
        self.stats.accepted_tokens += accepted
        self.stats.num_drafts += 1
        state = self._backoff.setdefault(seq.seq_id, _Backoff())
        state.proposed += proposed
        state.accepted += accepted
        state.steps += 1
        if state.steps >= WINDOW:
            if state.accepted < MIN_ACCEPTANCE * state.proposed:
                state.pause, state.next_pause = state.next_pause, min(PAUSE_MAX, state.next_pause * 2)
            else:
                state.next_pause = PAUSE_START
            state.proposed = state.accepted = state.steps = 0

    # --- verifying and accepting (core) ---

    def run(self, scheduled: Seq[ScheduledChunk], chunks: Seq[Chunk]) -> list[list[Sampled] | Sampled | None]:
        """Run a step in which some chunks carry proposals; a list of samples for those, else what
        `ModelRunner.step` returns for a chunk."""
        run_chunks, rows = [], []
        for sc, chunk in zip(scheduled, chunks):
            if sc.draft:
                run_chunks.append(dataclasses.replace(chunk, tokens=[*chunk.tokens, *sc.draft]))
                rows.append([sc.seq.row_params(ahead=j) for j in range(len(sc.draft) + 1)])
            else:
                run_chunks.append(chunk)
                rows.append([] if chunk.sampling is None else [chunk.sampling])
        results: list[list[Sampled] | Sampled | None] = []
        for sc, samples in zip(scheduled, self.verifier.step(run_chunks, rows)):
            results.append(samples if sc.draft else (samples[0] if samples else None))
        return results

    def accept(self, core: EngineCore, scheduled: ScheduledChunk, samples: list[Sampled] | Sampled | None,
               now: float) -> StreamOutput:
        """Keep the proposals that equal the tokens sampled before them, plus the next sampled token; roll the
        K/V of the rest back. Returns one output with every token emitted (it may stop part-way)."""
        seq, draft = scheduled.seq, scheduled.draft
        if not isinstance(samples, list):
            raise TypeError("a chunk with proposals has one sample per proposal and one after them")
        accepted = 0
        while accepted < len(draft) and samples[accepted].token_id == draft[accepted]:
            accepted += 1
        self._record(seq, len(draft), accepted)
        start = seq.num_computed
        seq.num_computed = start + len(scheduled.tokens) + len(draft)  # what the step computed
        core.kv.rollback(seq, start + len(scheduled.tokens) + accepted)  # minus the rejected proposals
        outputs = []
        for sample in samples[:accepted + 1]:
            outputs.append(core._accept(seq, sample, now))
            if seq.finished:
                break
        if not seq.finished:  # now that the tokens are appended, offer the full computed pages to the cache
            core.kv.cache_computed(seq)
        return merge_outputs(outputs)


def merge_outputs(outputs: list[StreamOutput]) -> StreamOutput:
    """One output for several tokens of one sample emitted in one step (the last one's totals and finish)."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    logprobs = None
    if last.new_logprobs is not None:
        logprobs = [lp for out in outputs for lp in out.new_logprobs or ()]
    return dataclasses.replace(last, new_token_ids=[t for out in outputs for t in out.new_token_ids],
                               new_text="".join(out.new_text for out in outputs), new_logprobs=logprobs,
                               prompt_logprobs=outputs[0].prompt_logprobs)
