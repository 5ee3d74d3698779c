"""The engine's synchronous core: requests in, one scheduled and executed step at a time, deltas out.

`EngineCore` is single-threaded on purpose. The offline `LLM` calls `step()`
in a loop on its own thread; the server's `Engine` runs the same loop on one
dedicated thread that owns all device state. Everything the step produces
for the outside is a plain `StreamOutput`.

Embedding requests (`Request(kind="embed")`) are scheduled with everything
else, like prompts that generate nothing. A step that holds embedding chunks
runs them through the runner's hidden-state program and the rest through the
step program: the two touch disjoint pages, so splitting the step changes no
result, and the step program keeps its one output (sampled ids) instead of
carrying `[T, hidden]` rows back on every step for the rare step that needs
them. When an embedding's last chunk has run, its rows are pooled and its one
final output carries the vector.
"""

from __future__ import annotations

import dataclasses
import random
import time

import jax
import numpy as np

from inferflux.config import Config
from inferflux.engine import device, overlap
from inferflux.engine.detokenizer import StreamDetokenizer
from inferflux.engine.grammar import GrammarCompiler, Matcher
from inferflux.engine.kv_cache import KVCacheManager, PageAllocator
from inferflux.engine.lora import NO_ADAPTER, AdapterSet, LoraSlots
from inferflux.engine.model_runner import Chunk, ModelRunner, PromptScores, sampled_results
from inferflux.engine.request import POOLINGS, EngineStats, Request, StreamOutput
from inferflux.engine.sampling_params import SamplingParamsError
from inferflux.engine.scheduler import ScheduledChunk, Scheduler
from inferflux.engine.sequence import Sequence, TokenLogprobs
from inferflux.engine.speculative import Speculation
from inferflux.engine.token_trace import TokenTrace
from inferflux.formats.loader import LoadedModel


class _Live:
    """A request in flight: its samples and their detokenizers."""

    def __init__(self, request: Request, seqs: list[Sequence], detoks: list[StreamDetokenizer]) -> None:
        self.request = request
        self.seqs = seqs
        self.detoks = detoks
        self.first_token_time: list[float | None] = [None] * len(seqs)
        self.sent_prompt_logprobs = [False] * len(seqs)  # each sample's first output carries them
        self.hidden: list[np.ndarray] = []  # an embedding's final hidden states so far, chunk by chunk
        self.matchers: list[Matcher | None] = [None] * len(seqs)  # structured output: each sample's grammar
        self.scheduled_time: float | None = None  # when its first chunk ran (the end of its queueing)
        self.adapters: AdapterSet = NO_ADAPTER  # its LoRA adapters (slots held until it ends)


class EngineCore:
    def __init__(self, model: LoadedModel, config: Config) -> None:
        runtime = config.runtime
        self.config = config
        self.model = model
        self.tokenizer = model.tokenizer
        self.runner = ModelRunner(model, runtime)
        self.allocator = PageAllocator(self.runner.num_pages, self.runner.page_size, runtime.prefix_caching)
        # A sequence must always fit in the cache on its own, or preemption could never make room for it.
        self.max_model_len = min(self.runner.max_model_len, self.allocator.num_usable * self.runner.page_size)
        self.kv = KVCacheManager(self.allocator)
        self.scheduler = Scheduler(self.kv, runtime.max_num_seqs, runtime.max_num_batched_tokens)
        self._live: dict[str, _Live] = {}  # request id -> request in flight
        self._by_seq: dict[int, _Live] = {}  # sequence id -> its request
        self._seeds = random.Random(runtime.seed)
        self._stats = EngineStats(kv_pages_total=self.allocator.num_usable)
        self.grammars = GrammarCompiler(self.tokenizer, model.config.vocab_size)
        # The /debug page's token trace (engine/token_trace.py); None (no cost) unless the server serves /debug.
        self.token_trace: TokenTrace | None = None
        self.loras = LoraSlots(self.runner)  # LoRA adapter names -> device slots (engine/lora.py)
        # Speculative decoding (engine/speculative.py): the scheduler asks it for proposals, the step verifies.
        self.speculation = Speculation(config, self.runner, self.tokenizer)
        # Overlapped steps (engine/overlap.py): the step left running on the device, and how many were chained.
        self.max_chained_seqs = overlap.max_chained_seqs(runtime.overlap_steps, device.backend())
        self._inflight: overlap.InFlight | None = None
        self.overlapped_steps = 0
        self.feeds = overlap.FeedPrograms()
        if self.speculation.enabled:
            self.scheduler.proposer = self.speculation
        if runtime.warmup:
            self.runner.warmup(background=runtime.warmup_background)
            if self.speculation.enabled:  # verify programs too: the first speculating step must not compile
                self.speculation.verifier.warmup(config.speculative.num_speculative_tokens)
            self.feeds.warmup(self.runner, min(self.max_chained_seqs, runtime.max_num_seqs))

    # --- requests ---

    def validate(self, request: Request) -> None:
        """Raise `SamplingParamsError` for a request that cannot run; reads no mutable state."""
        runtime = self.config.runtime
        if request.kind == "embed":
            if request.pooling not in POOLINGS:
                raise SamplingParamsError(f"pooling must be 'mean' or 'last', got {request.pooling!r}")
            if request.params.n != 1:
                raise SamplingParamsError("an embedding request has one output (n=1)")
        elif request.kind == "generate":
            request.params.validate(self.model.config.vocab_size, runtime.max_logprobs, runtime.max_logit_bias)
            if request.params.n > runtime.max_num_seqs:  # its samples could never all run, and n is a client's int
                raise SamplingParamsError(f"n must be at most {runtime.max_num_seqs} (runtime.max_num_seqs)")
            if request.params.constraint is not None:  # compiled (and cached) here: a bad one is a GrammarError
                self.grammars.compile(request.params.constraint)
        else:
            raise SamplingParamsError(f"request kind must be 'generate' or 'embed', got {request.kind!r}")
        if not request.prompt_ids:
            raise SamplingParamsError("the prompt is empty")
        if len(request.prompt_ids) >= self.max_model_len:
            raise SamplingParamsError(
                f"the prompt has {len(request.prompt_ids)} tokens, but this model's context holds "
                f"{self.max_model_len}; shorten the prompt")
        vocab = self.model.config.vocab_size
        if any(not 0 <= int(t) < vocab for t in request.prompt_ids):
            raise SamplingParamsError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1})")
        self._adapters(request)

    def _adapters(self, request: Request) -> AdapterSet:
        """The request's LoRA adapters: `params.lora`, or `adapter` (a name) at scale 1."""
        lora = request.params.lora or ([(request.adapter, 1.0)] if request.adapter else None)
        return self.loras.resolve(lora)

    def add_request(self, request: Request) -> None:
        """Validate and queue a request; a bad one raises here and is never scheduled."""
        self.validate(request)
        if request.request_id in self._live:
            raise SamplingParamsError(f"request id {request.request_id!r} is already in use")
        params = request.params
        prompt = [int(t) for t in request.prompt_ids]
        embed = request.kind == "embed"
        # An embedding draws no seed, so it does not shift the seeds unseeded generations get after it.
        if embed:
            base_seed = 0
        else:
            base_seed = params.seed if params.seed is not None else self._seeds.getrandbits(31)
        eos = frozenset(self.tokenizer.eos_ids)
        adapters = self._adapters(request)
        seqs: list[Sequence] = []
        for i in range(params.n):
            seqs.append(Sequence(prompt, params, seed=base_seed + i, max_model_len=self.max_model_len, eos_ids=eos,
                                 parent=seqs[0] if seqs else None, adapter=adapters.key, index=i,
                                 pooling=request.pooling if embed else None))
        detoks = [StreamDetokenizer(self.tokenizer, prompt, params.stop, params.skip_special_tokens)
                  for _ in seqs]
        live = self._live[request.request_id] = _Live(request, seqs, detoks)
        live.adapters = adapters
        self.loras.acquire(adapters)
        if params.constraint is not None and not embed:
            stops = eos | frozenset(params.stop_token_ids or ())
            live.matchers = [self.grammars.matcher(params.constraint, stops) for _ in seqs]
        for seq in seqs:
            self._by_seq[seq.seq_id] = live
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> list[StreamOutput]:
        """Drop a request now; its pages are free before the next step. Returns the final outputs."""
        live = self._live.pop(request_id, None)
        if live is None:
            return []
        self.loras.release(live.adapters)
        outputs = []
        for i, seq in enumerate(live.seqs):
            self._by_seq.pop(seq.seq_id, None)
            if not seq.finished:
                self.scheduler.remove(seq)
                self.speculation.forget(seq)
                seq.finish_reason = "abort"
                outputs.append(self._output(live, i, [], "", None))
        return outputs

    @property
    def has_unfinished(self) -> bool:
        return bool(self._live)

    # --- stepping ---

    def step(self) -> list[StreamOutput]:
        """Schedule and run one step; return every sample's new output (and finished embeddings).

        With overlapped steps (engine/overlap.py) a decode step is left running on the device and this call
        returns nothing for it: the next call dispatches the step after it first (or, when it cannot be chained,
        schedules one after fetching it), then returns its outputs."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            self._inflight = self._chain(prev)
            done = self._complete(prev)
            return done if self._inflight is not None else done + self._scheduled_step()
        return self._scheduled_step()

    def _scheduled_step(self) -> list[StreamOutput]:
        """The scheduler's next step, run (or left running when it can be chained)."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        start = time.perf_counter()
        for chunk in chunks:
            live = self._by_seq[chunk.seq.seq_id]
            if live.scheduled_time is None:
                live.scheduled_time = time.monotonic()
        generating = [c for c in chunks if not c.seq.is_embedding]
        embedding = [c for c in chunks if c.seq.is_embedding]
        step_chunks = [self._chunk(c) for c in generating]
        results: list
        if any(c.score for c in step_chunks):
            for c in generating:  # a scoring step verifies nothing (its extra pages stay for the next tokens)
                c.draft = []
            results, scores = self.runner.step_with_scores(step_chunks)
        elif any(c.draft for c in generating):
            results, scores = self.speculation.run(generating, step_chunks), [None] * len(step_chunks)
        elif not embedding and len(generating) <= self.max_chained_seqs and all(map(self._chainable, generating)):
            self._inflight = overlap.InFlight(generating, step_chunks, self.runner.step(step_chunks, wait=False),
                                              start)
            return []
        else:
            results, scores = self.runner.step(step_chunks), [None] * len(step_chunks)
        hidden = []
        if embedding:
            hidden = self.runner.hidden_states([Chunk(c.tokens, c.seq.num_computed, c.seq.pages,
                                                      lora=self._by_seq[c.seq.seq_id].adapters.coef)
                                                for c in embedding])
        return self._results(generating, results, scores, embedding, hidden, start)

    def _chainable(self, scheduled: ScheduledChunk) -> bool:
        """`overlap.chainable`, and not a sequence that speculates: its proposals come from the scheduler, and
        a verified step yields several tokens where a chained one yields one."""
        seq = scheduled.seq
        return (not self.speculation.eligible(seq)
                and overlap.chainable(scheduled, self._by_seq[seq.seq_id].matchers[seq.index] is not None))

    def _chain(self, prev: overlap.InFlight) -> overlap.InFlight | None:
        """Dispatch the step after `prev` before fetching it: the same sequences, one token each, fed on the
        device from prev's samples. None when it cannot be chained (the next call schedules as usual)."""
        if self.scheduler.waiting:  # let the scheduler admit them
            return None
        rows = [i for i, c in enumerate(prev.chunks) if not c.seq.finished and c.seq.seq_id in self._by_seq]
        # Every running sequence must be in the chain: one the step left out (its budget ran out first) would
        # wait for as long as the chain lasts.
        if not rows or len(rows) != len(self.scheduler.running) or len(rows) > self.max_chained_seqs:
            return None
        if not all(self._chainable(prev.chunks[i]) for i in rows):
            return None
        for i in rows:  # pages for the token after prev's (num_computed counts prev's tokens only once fetched)
            if not self.kv.allocate(prev.chunks[i].seq, len(prev.chunks[i].tokens) + 1):
                return None
        start = time.perf_counter()
        chunks = [ScheduledChunk(prev.chunks[i].seq, [overlap.PENDING_TOKEN]) for i in rows]
        run = [self._chunk(c, ahead=len(prev.chunks[i].tokens)) for c, i in zip(chunks, rows)]
        self.overlapped_steps += 1
        out = self.runner.step(run, feed=overlap.TokenFeed(self.feeds, prev.out.token_ids, rows), wait=False)
        return overlap.InFlight(chunks, run, out, start)

    def _complete(self, prev: overlap.InFlight) -> list[StreamOutput]:
        """Fetch a dispatched step's samples and take them, except for sequences that ended meanwhile."""
        results = sampled_results(prev.run, jax.device_get(prev.out))
        kept = [(c, r) for c, r in zip(prev.chunks, results) if not c.seq.finished and c.seq.seq_id in self._by_seq]
        return self._results([c for c, _ in kept], [r for _, r in kept], [None] * len(kept), [], [], prev.start)

    def _results(self, generating: list[ScheduledChunk], results: list, scores: list, embedding: list[ScheduledChunk],
                 hidden: list, start: float) -> list[StreamOutput]:
        """A step's results -> the samples' outputs (tokens taken, detokenized, stops decided) and the stats."""
        now = time.monotonic()
        outputs = []
        constrained: list[tuple[Sequence, StreamOutput, Matcher]] = []
        for scheduled, result, score in zip(generating, results, scores):
            seq = scheduled.seq
            if score is not None:
                _collect_prompt_logprobs(seq, score)
            if scheduled.draft:
                outputs.append(self.speculation.accept(self, scheduled, result, now))
                continue
            self._computed(scheduled)
            if result is not None:
                live = self._by_seq[seq.seq_id]
                matcher = live.matchers[seq.index]
                outputs.append(self._accept(seq, result, now))
                if matcher is not None and not seq.finished:
                    constrained.append((seq, outputs[-1], matcher))
        self._advance_grammars(constrained)
        for scheduled, rows in zip(embedding, hidden):
            live = self._by_seq[scheduled.seq.seq_id]
            if scheduled.seq.num_computed == 0:  # first chunk, or recomputing after a preemption
                live.hidden = []
            live.hidden.append(rows)
            self._computed(scheduled)
            if not scheduled.seq.in_prefill:
                outputs.append(self._pooled(scheduled.seq, now))
        if not generating and not embedding:  # a chained step whose sequences all ended: nothing ran for anyone
            return outputs
        elapsed = time.perf_counter() - start  # from dispatch: chained steps' times overlap (engine/overlap.py)
        self._stats.num_steps += 1
        self._stats.last_step_seconds = elapsed
        self._stats.total_step_seconds += elapsed
        return outputs

    def _advance_grammars(self, constrained: list[tuple[Sequence, StreamOutput, Matcher]]) -> None:
        """Advance each constrained sample on its new token, refill the next step's masks in one batched call,
        and end (`stop`) the samples whose grammar is complete: no token but a stop token could follow."""
        for seq, _, matcher in constrained:
            matcher.accept(seq.output_ids[-1])
        self.grammars.fill_masks([m for _, _, m in constrained if not m.failed])
        for seq, out, matcher in constrained:
            if matcher.done:
                live = self._by_seq[seq.seq_id]
                seq.finish_reason = out.finish_reason = "stop"
                out.new_text += live.detoks[seq.index].finish()
                self._finish(seq)

    def _computed(self, scheduled: ScheduledChunk) -> None:
        """The chunk's K/V is in the cache now: count it and offer its full pages to the prefix cache."""
        seq = scheduled.seq
        self._stats.prompt_tokens += max(0, min(len(seq.prompt_ids) - seq.num_computed, len(scheduled.tokens)))
        seq.num_computed += len(scheduled.tokens)
        self.kv.cache_computed(seq)

    def _chunk(self, scheduled: ScheduledChunk, ahead: int = 0) -> Chunk:
        """The runner's chunk; `ahead` > 0: a chained step's, after that many tokens of a step not fetched yet
        (engine/overlap.py), so its position and sampling row are one token further."""
        seq = scheduled.seq
        samples = scheduled.samples or ahead > 0
        matcher = self._by_seq[seq.seq_id].matchers[seq.index] if samples else None
        sampling = seq.row_params(ahead=1 if ahead else 0) if samples else None
        if sampling is not None and self.token_trace is not None:  # /debug shows alternatives for every request
            sampling.top_logprobs = max(sampling.top_logprobs, self.token_trace.top_n)
        return Chunk(tokens=scheduled.tokens, start_pos=seq.num_computed + ahead, pages=seq.pages, history=seq.all_ids,
                     num_prompt=len(seq.prompt_ids), sampling=sampling,
                     score=seq.wants_prompt_logprobs, allowed=None if matcher is None else matcher.mask,
                     lora=self._by_seq[seq.seq_id].adapters.coef)

    def _accept(self, seq: Sequence, result, now: float) -> StreamOutput:
        """A sampled token arrived: extend the sample, detokenize, decide whether it stops."""
        live = self._by_seq[seq.seq_id]
        detok = live.detoks[seq.index]
        if seq.params.max_tokens == 0:  # scoring only: the prompt ran, nothing is generated
            seq.finish_reason = "length"
            self._finish(seq)
            return self._output(live, seq.index, [], "", None, now)
        seq.append(result.token_id, result.logprob, result.top_ids, result.top_logprobs)
        self._stats.generation_tokens += 1
        if self.token_trace is not None:
            top = max(seq.params.logprobs or 0, self.token_trace.top_n)  # the response keeps only what it asked for
            self.token_trace.token(live.request.request_id, seq.index, result.token_id, result.logprob,
                                   result.top_ids[:top], result.top_logprobs[:top], now)
        if live.first_token_time[seq.index] is None:
            live.first_token_time[seq.index] = now
        text = detok.push(result.token_id)
        stop_reason = None
        if detok.stopped:
            seq.finish_reason, stop_reason = "stop", detok.stop_string
        elif seq.finished:
            text += detok.finish()
            if seq.finish_reason == "stop" and result.token_id not in seq.eos_ids:
                stop_reason = result.token_id
        new_logprobs = seq.logprobs[-1:] if seq.params.logprobs is not None else None
        out = self._output(live, seq.index, [result.token_id], text, new_logprobs, now, stop_reason)
        if seq.finished:
            self._finish(seq)
        return out

    def _pooled(self, seq: Sequence, now: float) -> StreamOutput:
        """An embedding's last chunk ran: pool its rows into the vector its one final output carries."""
        live = self._by_seq[seq.seq_id]
        rows = np.concatenate(live.hidden).astype(np.float32)
        live.hidden = []
        seq.finish_reason = "stop"
        self._finish(seq)
        out = self._output(live, seq.index, [], "", None, now)
        out.embedding = rows.mean(axis=0) if seq.pooling == "mean" else rows[-1]
        return out

    def _finish(self, seq: Sequence) -> None:
        """A finished sample leaves the scheduler (its pages are freed); the request goes with its last one."""
        live = self._by_seq.pop(seq.seq_id)
        self.scheduler.remove(seq)
        self.speculation.forget(seq)
        if self.token_trace is not None:
            self.token_trace.finish(live.request.request_id, seq.index, seq.finish_reason)
        if all(s.finished for s in live.seqs):
            del self._live[live.request.request_id]
            self.loras.release(live.adapters)

    def _output(self, live: _Live, index: int, new_ids: list[int], text: str, logprobs,
                now: float | None = None, stop_reason: str | int | None = None) -> StreamOutput:
        seq = live.seqs[index]
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and not live.sent_prompt_logprobs[index]:
            live.sent_prompt_logprobs[index] = True
            prompt_logprobs = [None, *live.seqs[0].prompt_logprobs]
        return StreamOutput(
            request_id=live.request.request_id, index=index, new_token_ids=new_ids, new_text=text,
            new_logprobs=logprobs, finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids), cached_tokens=seq.num_cached_tokens,
            arrival_time=live.request.arrival_time, first_token_time=live.first_token_time[index],
            last_token_time=now, stop_reason=stop_reason, prompt_logprobs=prompt_logprobs,
            scheduled_time=live.scheduled_time,
        )

    # --- statistics ---

    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_pages_used = self.allocator.num_used
        s.prefix_queries = self.allocator.stats.queries
        s.prefix_hits = self.allocator.stats.hits
        s.num_preemptions = self.scheduler.num_preemptions
        s.queued_prompt_tokens, s.kv_pages_wanted = self.scheduler.queued_demand()
        spec = self.speculation.stats
        s.spec_draft_tokens, s.spec_accepted_tokens, s.spec_num_drafts = (spec.draft_tokens, spec.accepted_tokens,
                                                                          spec.num_drafts)
        return dataclasses.replace(s)


def _collect_prompt_logprobs(seq: Sequence, scores: PromptScores) -> None:
    """Append the scores of prompt positions not yet collected (a recomputed chunk repeats some)."""
    n, start = seq.params.prompt_logprobs or 0, seq.num_computed
    for j in range(len(scores.logprob)):
        target = start + j + 1  # the prompt token this row scores
        if target == len(seq.prompt_logprobs) + 1 and target < len(seq.prompt_ids):
            top = {int(t): float(v) for t, v in zip(scores.top_ids[j][:n], scores.top_logprobs[j][:n])}
            seq.prompt_logprobs.append(TokenLogprobs(seq.prompt_ids[target], float(scores.logprob[j]), top))
