"""Overlapped steps (`runtime.overlap_steps`): the next decode step is dispatched before this one's tokens
reach the host.

Without it the host and the device take turns: the device runs step N, then the host fetches N's tokens,
detokenizes and streams them, schedules and packs step N+1 and dispatches it, while the device waits. At a
large batch that host work is milliseconds per step (benchmarks/RESULTS.md, GPU). With it, the engine core
dispatches step N+1 as soon as step N is dispatched (JAX dispatch is asynchronous), its tokens taken on the
device from N's sampled ids (`TokenFeed`), and only then fetches N's results and does N's host work while
the device runs N+1.

Only a step whose every sequence can run its next token blind is chained (`chainable`): a plain decode, or
a prompt's last chunk, with no grammar (its mask depends on the token), no speculative proposals, no prompt
scores, no penalties (they count the output tokens on the host), and a next token that cannot be its last by
length. Chaining also waits for admissions: a request queued for the scheduler ends the chain for one step.
A sequence that stops on a token of step N (EOS, a stop string) has run one more token in N+1, on pages it
owns: that result is dropped and the pages are freed with the sequence. Every step consumes the previous
step's KV cache, so the device runs them in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from inferflux.engine.model_runner import Chunk
from inferflux.engine.scheduler import ScheduledChunk

# The token a chained chunk carries on the host: the real one is fed on the device (`TokenFeed`).
PENDING_TOKEN = -1


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose results the host has not fetched yet."""

    chunks: list[ScheduledChunk]
    run: list[Chunk]  # the runner's chunks of the step, in the same order
    out: Any  # the step program's SampleOutput, still on the device
    start: float  # perf_counter at dispatch (the step's time counts from it)


# "auto" on CPU chains steps of at most this many sequences. Measured on the 2-core development machine
# (benchmarks/RESULTS.md, "Overlapped steps"): one sequence decodes ~7% faster chained (its kernels wait on
# memory, and the host's work fits in that wait), 8 sequences ~2% slower (their kernels keep both cores busy,
# so the host thread only takes cycles from them).
CPU_AUTO_MAX_SEQS = 1


def max_chained_seqs(setting: str, backend: str) -> int:
    """The most sequences a step may have to be chained, for `runtime.overlap_steps` on this backend: "auto"
    is every step where the host and the device are apart (GPU, TPU), single-sequence steps on CPU."""
    if setting == "off":
        return 0
    if setting == "on" or backend != "cpu":
        return 1 << 30
    return CPU_AUTO_MAX_SEQS


def chainable(scheduled: ScheduledChunk, constrained: bool) -> bool:
    """Whether the next token of this chunk's sequence can run before the host sees this one's sample."""
    seq, p = scheduled.seq, scheduled.seq.params
    return (not seq.is_embedding and not scheduled.draft and scheduled.samples and not constrained
            and not seq.wants_prompt_logprobs and p.max_tokens != 0
            and p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1
            and (p.max_tokens is None or len(seq.output_ids) + 1 < p.max_tokens)
            and len(seq.all_ids) + 1 < seq.max_model_len)


def _splice(host: jax.Array, rows: jax.Array, sampled: jax.Array) -> jax.Array:
    return jnp.where(rows >= 0, sampled[jnp.maximum(rows, 0)], host)


class FeedPrograms:
    """The compiled token gathers of chained steps, one per (chained step's token rows, previous step's sampled
    rows). `warmup` builds all of them, so a server that warmed up compiles nothing when steps chain."""

    def __init__(self) -> None:
        self._exes: dict[tuple[int, int], Any] = {}

    def get(self, tokens: int, sampled: int) -> Any:
        exe = self._exes.get((tokens, sampled))
        if exe is None:
            i32 = jax.ShapeDtypeStruct
            exe = self._exes[tokens, sampled] = jax.jit(_splice).lower(
                i32((tokens,), np.int32), i32((tokens,), np.int32), i32((sampled,), np.int32)).compile()
        return exe

    def warmup(self, runner: Any, max_seqs: int) -> int:
        """Build every gather a chained step of at most `max_seqs` sequences can need; returns how many."""
        tokens = {runner.bucket_for(n, n, 1)[0] for n in range(1, max_seqs + 1)}
        sampled = {runner.seqs_for(t) for t in runner.token_buckets}
        if runner.decode_buckets:
            sampled |= set(runner.seq_buckets)
        for t in tokens:
            for s in sampled:
                self.get(t, s)
        return len(tokens) * len(sampled)


class TokenFeed:
    """The token ids of a chained step: row i runs the token that row `rows[i]` of the step still on the
    device sampled (-1: the packed host token), gathered on the device: nothing is fetched."""

    def __init__(self, programs: FeedPrograms, sampled: jax.Array, rows: Seq[int]) -> None:
        self.programs = programs
        self.sampled = sampled
        self.rows = rows

    def __call__(self, host_tokens: np.ndarray) -> jax.Array:
        rows = np.full(host_tokens.shape, -1, np.int32)
        rows[:len(self.rows)] = self.rows
        return self.programs.get(len(host_tokens), self.sampled.shape[0])(host_tokens, rows, self.sampled)
