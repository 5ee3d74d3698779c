"""Which tokens of which sequences run in the next step (vLLM v1's policy, nano-vllm's size).

Each step has a token budget (`runtime.max_num_batched_tokens`) and a cap on
sequences (`runtime.max_num_seqs`). Running sequences go first, oldest first:
a decoding sequence takes one token, a sequence still in its prompt takes the
next chunk that fits (chunked prefill), so one long prompt never stalls the
decodes. What budget is left admits waiting sequences in arrival order, each
starting after whatever prefix of its prompt the prefix cache already holds.

When a running sequence needs a page and none is free, the most recently
admitted running sequence is preempted: its pages are released (full pages
stay in the prefix cache) and it goes back to the front of the queue, to be
recomputed later. Its generated tokens are kept, so it resumes exactly
where it was. Waiting sequences are not admitted in a step that preempted.

Pages are the `KVCacheManager`'s business: the scheduler asks it to attach a
prefix, to make room for a chunk, and to free a sequence, and never counts
pages itself. An embedding request is a sequence like any other here: it only
ever has prompt chunks, and it leaves when its last chunk ran.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence as Seq
from typing import Protocol

from inferflux.engine.kv_cache import KVCacheManager
from inferflux.engine.sequence import Sequence


class Proposer(Protocol):
    """Speculative decoding's side of scheduling (engine/speculative.py)."""

    # True: `propose` runs once per step for every speculating sequence together (a draft model's batched
    # steps), after the others are scheduled; False: per sequence as it is scheduled (prompt lookup).
    batched: bool

    def room(self, seq: Sequence, budget: int) -> int:
        """How many tokens a decoding sequence may propose this step (0: none), at most `budget`."""
        ...

    def propose(self, items: Seq[tuple[Sequence, int]]) -> list[list[int]]:
        """Up to k proposals for each (sequence, k)."""
        ...


@dataclasses.dataclass
class ScheduledChunk:
    seq: Sequence
    tokens: list[int]
    # Speculative decoding: proposed tokens run after `tokens` and verified (engine/speculative.py); their
    # pages are allocated and their tokens counted in the budget like any other.
    draft: list[int] = dataclasses.field(default_factory=list)

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits pick the next one."""
        return self.seq.num_computed + len(self.tokens) == len(self.seq.all_ids)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Speculative decoding's proposer (engine/speculative.py), set by the engine when it is on.
        self.proposer: Proposer | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and release its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def queued_demand(self) -> tuple[int, int]:
        """(prompt tokens not yet computed, pages the waiting sequences still need): the autoscaling hints."""
        page = self.kv.page_size
        tokens = sum(max(0, len(s.prompt_ids) - s.num_computed) for s in (*self.waiting, *self.running))
        pages = sum(max(0, -(-len(s.all_ids) // page) - len(s.pages)) for s in self.waiting)
        return tokens, pages

    def snapshot(self) -> list[tuple[str, Sequence]]:
        """("running" | "waiting", sequence) for every queued sequence (engine thread: see Engine.inspect)."""
        return [("running", s) for s in self.running] + [("waiting", s) for s in self.waiting]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        budget = self.max_num_batched_tokens
        preempted = False
        reserved: list[tuple[ScheduledChunk, int]] = []  # room kept for a batched proposer's proposals
        running = list(self.running)
        for i, seq in enumerate(running):
            if seq not in self.running:  # preempted earlier in this loop
                continue
            if len(chunks) == self.max_num_seqs or budget == 0:
                break
            tokens = seq.next_chunk(budget)
            # Proposals never take the one token each later running sequence needs to make progress.
            draft, room = self._draft(seq, tokens, budget - (len(running) - i - 1))
            while not self.kv.allocate(seq, len(tokens) + len(draft) + room):
                if draft or room:  # short of pages: drop the proposals before preempting anyone
                    draft, room = [], 0
                    continue
                if any(c.draft for c in chunks) or reserved:  # and those of the sequences scheduled before
                    budget += self._drop_proposals(chunks, reserved)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, tokens, draft))
                if room:
                    reserved.append((chunks[-1], room))
                budget -= len(tokens) + len(draft) + room
        if reserved:
            budget += self._propose_batched(reserved)
        if not preempted:
            self._admit(chunks, budget)
        return chunks

    def _draft(self, seq: Sequence, tokens: list[int], budget: int) -> tuple[list[int], int]:
        """Proposals for a decoding sequence (its one new token is its last), within what the budget leaves;
        or, for a batched proposer, the room to keep for them (proposals, room)."""
        proposer = self.proposer
        if proposer is None or len(tokens) != 1 or seq.num_computed + 1 != len(seq.all_ids):
            return [], 0
        room = proposer.room(seq, budget - 1)
        if room <= 0:
            return [], 0
        if proposer.batched:
            return [], room
        return proposer.propose([(seq, room)])[0][:room], 0

    def _drop_proposals(self, chunks: list[ScheduledChunk], reserved: list[tuple[ScheduledChunk, int]]) -> int:
        """Give back the pages and budget of every proposal (and room kept for one) scheduled so far."""
        freed = sum(room for _, room in reserved)
        holding = [chunk for chunk, _ in reserved] + [chunk for chunk in chunks if chunk.draft]
        reserved.clear()
        for chunk in holding:
            freed += len(chunk.draft)
            chunk.draft = []
            self.kv.trim(chunk.seq, len(chunk.tokens))
        return freed

    def _propose_batched(self, reserved: list[tuple[ScheduledChunk, int]]) -> int:
        """Fill the room kept for proposals, all sequences at once; give back the pages and budget not used."""
        assert self.proposer is not None
        unused = 0
        for (chunk, room), draft in zip(reserved, self.proposer.propose([(c.seq, r) for c, r in reserved])):
            chunk.draft = draft[:room]
            self.kv.trim(chunk.seq, len(chunk.tokens) + len(chunk.draft))
            unused += room - len(chunk.draft)
        return unused

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        for seq in list(self.waiting):
            if len(chunks) == self.max_num_seqs or budget == 0:
                return
            if seq.parent is not None and seq.parent.in_prefill and not seq.parent.finished:
                continue  # n > 1: wait for the first sample's prompt pages, then share them
            if not seq.pages:
                cached = self.kv.attach_prefix(seq)
                if not seq.output_ids:  # first admission: what the prompt got from the cache (usage.cached_tokens)
                    seq.num_cached_tokens = cached
            tokens = seq.next_chunk(budget)
            if not self.kv.allocate(seq, len(tokens)):
                self.kv.free(seq)  # give back the matched prefix; try again next step
                return
            self.waiting.remove(seq)
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, tokens))
            budget -= len(tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
