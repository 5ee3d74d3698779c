"""The target model's side of speculative decoding: one step that samples at every verified position.

A speculating sequence's chunk is its last sampled token followed by the k proposed tokens. The step
runs those k + 1 tokens like any ragged chunk (causal attention over the paged cache, K/V written into
the sequence's pages), and samples a token after *each* of them, where an ordinary step samples once
per sequence. It is the same step function as the model runner's mixed step, lowered with more rows:
`logits_index`, the sampling rows, the penalty history and the grammar masks have R entries (one per
sampled position, padded to a power of two) instead of one per sequence. The model gathers the rows
`logits_index` names before its head, so the head costs R rows, not the whole chunk.

Row j of a speculating sequence is packed as its next token would be if proposals 1..j had been
generated: its `step` (hence its sampling key, `fold_in(seed, step)`), its `min_tokens` ban and its
penalty history all include them. So the token sampled at row j is exactly the token ordinary decoding
would sample there after those proposals, and verification (engine/speculative.py) compares the
proposals with these tokens. Other chunks of the same step (prompt chunks, decodes that propose
nothing) get their one row, packed as the runner packs them: they share the step and change nothing.

Programs are keyed (tokens, sequences, pages, rows) in the runner's program cache ("verify") and kept on
disk with the step programs (`runtime.cache_executables`). With `runtime.warmup` the ones steps of
speculating decodes land in are built before the engine is ready (`warmup`): in such a step every token is
a sampled row, so the rows bucket is the tokens' count rounded up to a power of two (`decode_keys`); a step
that mixes in a prompt chunk has fewer rows than tokens and compiles its program on first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from inferflux.engine.model_runner import Chunk, ModelRunner, Sampled, pick_bucket, power_of_two_buckets
from inferflux.engine.sampling_rows import RowParams, SamplingTensors


class Verifier:
    """Runs steps in which some chunks carry proposals; one list of `Sampled` per row a chunk asked for."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._programs = runner.programs.view("verify")

    def step(self, chunks: Sequence[Chunk], rows: Sequence[Sequence[RowParams]]) -> list[list[Sampled]]:
        """Run `chunks` (each chunk's tokens end with its proposals); `rows[i]` are the sampling rows of chunk
        i's last `len(rows[i])` tokens (empty: the chunk samples nothing). Returns each chunk's samples."""
        runner = self.runner
        bucket = runner._mixed_bucket(chunks)
        inputs = runner._pack(chunks, bucket)[0]
        num_tokens, _, num_pages, _ = bucket
        history_len = num_pages * runner.page_size
        need = max(1, sum(len(r) for r in rows))
        num_rows = pick_bucket(power_of_two_buckets(1, max(num_tokens, need)), need)
        logits_index = np.zeros(num_rows, np.int32)
        history = np.full((num_rows, history_len), -1, np.int32)
        is_output = np.zeros((num_rows, history_len), bool)
        packed: list[RowParams | None] = []
        masks: list[tuple[int, np.ndarray]] = []
        offset = 0
        for chunk, chunk_rows in zip(chunks, rows):
            n = len(chunk.tokens)
            first = n - len(chunk_rows)  # the chunk's token whose logits row 0 samples after
            for j, row in enumerate(chunk_rows):
                r = len(packed)
                logits_index[r] = offset + first + j
                # Row j sees the history plus the proposals before it (tokens first+1 .. first+j).
                hist = np.concatenate([np.asarray(chunk.history, np.int32),
                                       np.asarray(chunk.tokens[first + 1:first + 1 + j], np.int32)])[:history_len]
                history[r, :len(hist)] = hist
                is_output[r, chunk.num_prompt:len(hist)] = True
                packed.append(row)
                if chunk.allowed is not None:  # only chunks that propose nothing carry a grammar mask
                    masks.append((r, chunk.allowed))
            offset += n
        words = -(-runner.config.vocab_size // 32)
        allowed: Any = runner._free_masks.get(num_rows)
        if allowed is None or masks:
            allowed = np.full((num_rows, words), -1, np.int32)
            for r, mask in masks:
                allowed[r] = mask
            if not masks:
                allowed = runner._free_masks[num_rows] = jax.device_put(allowed)
        sampling = SamplingTensors.from_params(packed, num_rows, num_bias_slots=runner.num_bias_slots,
                                               validate=False, allowed=allowed)
        inputs = dataclasses.replace(inputs, logits_index=logits_index)
        exe = self.program((*bucket[:3], num_rows))
        out, runner.kv_cache = exe(runner.weights, runner.kv_cache, inputs, sampling, history, is_output)
        out = jax.device_get(out)
        results, r = [], 0
        for chunk_rows in rows:
            results.append([Sampled(int(out.token_ids[i]), float(out.logprob[i]), out.top_ids[i],
                                    out.top_logprobs[i]) for i in range(r, r + len(chunk_rows))])
            r += len(chunk_rows)
        return results

    def program(self, key: tuple[int, int, int, int]) -> Any:
        """The verify program of (tokens, sequences, pages, rows): built now (loaded, or compiled) unless it is."""
        exe = self._programs.get(key)
        if exe is None:
            runner = self.runner
            exe = runner._stored.get(("verify", key), lambda: runner._step_fns[False].lower(
                runner.weights, runner.kv_cache, *self._abstract(key)))
            self._programs[key] = exe
        return exe

    def _abstract(self, key: tuple[int, int, int, int]) -> tuple[Any, ...]:
        """Shape-only arguments of a verify program: a mixed step's inputs with `rows` sampling rows."""
        num_tokens, num_seqs, num_pages, num_rows = key
        runner = self.runner
        inputs = runner._pack([], (num_tokens, num_seqs, num_pages, False))[0]
        inputs = dataclasses.replace(inputs, logits_index=np.zeros(num_rows, np.int32))
        history = np.full((num_rows, num_pages * runner.page_size), -1, np.int32)
        allowed = np.full((num_rows, -(-runner.config.vocab_size // 32)), -1, np.int32)
        sampling = SamplingTensors.from_params([], num_rows, num_bias_slots=runner.num_bias_slots, validate=False,
                                               allowed=allowed)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                            (inputs, sampling, history, history >= 0))

    def decode_keys(self, num_speculative_tokens: int) -> list[tuple[int, int, int, int]]:
        """The programs of steps in which decoding sequences verify up to `num_speculative_tokens` proposals
        each: every token bucket up to that of `max_num_seqs` such sequences, with the row bucket of each
        token count from 2 that lands in it (rows = tokens, padded to a power of two; several row buckets
        share the smallest token bucket when it is larger than 2, as on GPU)."""
        runner = self.runner
        most = min(runner.runtime.max_num_seqs * (num_speculative_tokens + 1), runner.runtime.max_num_batched_tokens)
        top = pick_bucket(runner.token_buckets, most)
        keys = {(pick_bucket(runner.token_buckets, r), r) for r in power_of_two_buckets(2, top)}
        return [(t, runner.seqs_for(t), p, r) for t, r in sorted(keys) for p in runner.page_buckets]

    def warmup(self, num_speculative_tokens: int) -> int:
        """Build the `decode_keys` programs now, as many as the program cache has room for; how many built."""
        todo = [key for key in self.decode_keys(num_speculative_tokens) if key not in self._programs]
        todo = todo[:self.runner.programs.room()]
        with ThreadPoolExecutor(max_workers=max(1, self.runner.runtime.warmup_threads)) as pool:
            return len(list(pool.map(self.program, todo)))

    @property
    def compiled(self) -> list[Any]:
        """The verify programs compiled so far (their keys)."""
        return list(self._programs)
