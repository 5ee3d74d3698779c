"""The model runner: one compiled forward pass plus sampling per step, one program per shape bucket.

It owns all device state: parameters, KV pages and compiled executables. A
step is described on the host by a list of `Chunk`s (which tokens of which
sequence to run, and whether to sample after them); the runner packs them
into bucket-shaped numpy arrays, runs the executable for that bucket with the
KV pages donated (updated in place), and returns only the sampled ids and
logprobs.

Buckets are (tokens per step, sequences per step, pages per sequence): tokens
double, sequences follow the token bucket, pages grow by
`runtime.page_bucket_growth`, so a server compiles a small, known set of
programs (tokens x pages; docs/runtime.md has the count); `warmup()` compiles
them up front. On GPU, steps made only of decode tokens get their own programs
(a fourth bucket field), which run the Pallas decode-attention kernel;
elsewhere that field is always False. Compiled programs live in a bounded LRU
(`program_cache.ProgramCache`) so a long-running server's memory maps stay bounded.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inferflux.config import RuntimeConfig
from inferflux.engine import device, tensor_parallel
from inferflux.engine.executable_cache import ExecutableCache, tree_fingerprint
from inferflux.engine.program_cache import FreshJit, ProgramCache
from inferflux.engine.sampler import sample, token_logprobs
from inferflux.engine.sampling_params import RESERVED_BIAS_SLOTS
from inferflux.engine.sampling_rows import RowParams, SampleOutput, SamplingTensors
from inferflux.engine.warmup import warm_up
from inferflux.engine.weight_prep import prepare_weights
from inferflux.formats.loader import LoadedModel
from inferflux.kernels.cpu.qmatmul import real_rows
from inferflux.kernels.paged_attention import _select_impl as _select_attention
from inferflux.models.llama import KVCache, LlamaModel, StepInputs, init_kv_cache, kv_bytes_per_page

log = logging.getLogger(__name__)

Bucket = tuple[int, int, int, bool]  # (tokens, sequences, pages per sequence, decode-only)


@dataclasses.dataclass
class Chunk:
    """One sequence's share of a step."""

    tokens: Sequence[int]  # token ids whose K/V this step computes
    start_pos: int  # position of tokens[0]
    pages: Sequence[int]  # the sequence's block table; must cover start_pos + len(tokens)
    history: Sequence[int] = ()  # prompt + generated ids so far, for penalties
    num_prompt: int = 0  # how many of `history` are prompt tokens
    sampling: RowParams | None = None  # None: run the tokens, sample nothing (mid-prompt chunk)
    score: bool = False  # also return the logprob of the prompt token after each token (prompt_logprobs)
    allowed: np.ndarray | None = None  # the row's grammar mask, packed i32 [ceil(V/32)] (engine/grammar.py)
    lora: np.ndarray | None = None  # f32 [runtime.max_loras] adapter coefficients (engine/lora.py); None: none


@dataclasses.dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float
    top_ids: Any  # int32 [N] (host numpy, from the device)
    top_logprobs: Any  # float32 [N]


@dataclasses.dataclass(frozen=True)
class PromptScores:
    """For each token of a scored chunk: the logprob of the prompt token after it, and the top-N there.

    Rows whose next token is not a prompt token (the prompt's last token) hold no meaningful value.
    """

    logprob: np.ndarray  # f32 [n]
    top_ids: np.ndarray  # i32 [n, N]
    top_logprobs: np.ndarray  # f32 [n, N]


def power_of_two_buckets(low: int, high: int) -> list[int]:
    """low, 2*low, ... up to `high` (always included, even if not a power of two)."""
    buckets, size = [], max(1, low)
    while size < high:
        buckets.append(size)
        size *= 2
    buckets.append(high)
    return buckets


def geometric_buckets(low: int, high: int, growth: int) -> list[int]:
    """low, growth*low, growth^2*low, ... up to `high` (always included): fewer buckets than powers of two."""
    buckets, size = [], max(1, low)
    while size < high:
        buckets.append(size)
        size *= max(2, growth)
    buckets.append(high)
    return buckets


def pick_bucket(buckets: Sequence[int], need: int) -> int:
    for size in buckets:
        if size >= need:
            return size
    raise ValueError(f"{need} exceeds the largest bucket {buckets[-1]}")


class ModelRunner:
    def __init__(self, model: LoadedModel, runtime: RuntimeConfig) -> None:
        self.config = model.config
        self.runtime = runtime
        self.backend = device.backend()
        self.dtype = device.compute_dtype(runtime.dtype)
        self.max_model_len = min(runtime.max_model_len or model.config.max_position, model.config.max_position)
        self.page_size = runtime.page_size
        self.pages_per_seq = -(-self.max_model_len // self.page_size)
        # Tensor parallel (engine/tensor_parallel.py): dense weights and reference attention, split by head.
        mesh = tensor_parallel.mesh_for(model.config, runtime.tensor_parallel)
        self.weight_layout = device.DENSE if mesh is not None else device.weight_layout(runtime.cpu_kernels)
        weights = prepare_weights(model.weights, self.dtype, self.weight_layout, exact=runtime.cpu_kernels == "exact")
        weights = tensor_parallel.shard_weights(weights, mesh)
        # LoRA adapter slots (models/lora.py): float32 on CPU, the compute dtype elsewhere; none when max_loras=0.
        self.max_loras, self.max_lora_rank = runtime.max_loras, runtime.max_lora_rank
        lora_spec = (self.max_loras, self.max_lora_rank, jnp.float32 if self.backend == "cpu" else self.dtype)
        graphdef, self.state = nnx.split(LlamaModel(model.config, weights, self.dtype, kernels=mesh is None,
                                                    lora_spec=lora_spec))
        # Programs take the state as its flat tuple of arrays (`weights`), flattened once, not per call: the
        # per-call flatten of ~200 nnx Variables cost ~0.45 ms of a 1.1B Q4_K_M batch-1 step's ~1.3 ms
        # dispatch, time the device sat idle (benchmarks/RESULTS.md).
        self._state_def = jax.tree_util.tree_structure(self.state)
        self._weights: tuple[jax.Array, ...] | None = None
        self.num_pages = self._num_pages()
        self.kv_cache: KVCache = tensor_parallel.shard_kv_cache(
            init_kv_cache(model.config, self.num_pages, self.page_size, self.dtype), mesh)
        self.token_buckets = power_of_two_buckets(self._min_token_bucket(), runtime.max_num_batched_tokens)
        # Mixed steps use min(token bucket, max_num_seqs) sequence rows (`seqs_for`), not a bucket dimension of
        # their own; decode-only programs (GPU) use these.
        self.seq_buckets = power_of_two_buckets(1, runtime.max_num_seqs)
        # The smallest page bucket is `growth` pages, not 1: attention reads a sequence's own positions (the
        # kernels stop at its length), so a wider block table costs nothing, and each bucket costs a program.
        growth = runtime.page_bucket_growth
        self.page_buckets = geometric_buckets(min(growth, self.pages_per_seq), self.pages_per_seq, growth)
        self.num_logprobs = runtime.max_logprobs
        self._free_masks: dict[int, jax.Array] = {}  # rows -> all-ones grammar mask on the device (`_pack`)
        self.num_bias_slots = runtime.max_logit_bias + RESERVED_BIAS_SLOTS
        # Decode-only steps (one token per sequence) get their own programs on GPU, token t in slot t, running
        # the Pallas decode kernel. CPU needs none: with the FFI attention its mixed buckets start at two tokens
        # (`_min_token_bucket`), and without it a program of fewer than 8 rows made XLA copy the whole KV cache
        # every step (time grew with runtime.num_pages; benchmarks/RESULTS.md).
        self.decode_buckets = self.backend == "gpu"
        self._step_fns = {
            decode: FreshJit(_make_step(graphdef, self._state_def, self.num_logprobs, decode), donate_argnums=(1,))
            for decode in (False, True)
        }
        # Step programs kept whole on disk, so a warm restart skips tracing and lowering (executable_cache.py).
        identity = (model.config, dataclasses.asdict(runtime), self.num_logprobs, self.num_bias_slots,
                    tree_fingerprint((self.state, self.kv_cache)))
        self._stored = ExecutableCache.for_home(repr(identity), runtime.cache_executables)
        # Every compiled program (all kinds) lives in one LRU bounded by runtime.max_compiled_programs and by
        # the process's memory-map budget; FreshJit makes an eviction free the program (program_cache.py).
        self.programs = ProgramCache(runtime.max_compiled_programs)
        self._executables = self.programs.view("step")
        self._building: dict[Bucket, threading.Lock] = {}  # per bucket: one thread builds it (`program`)
        # Steps that score prompt tokens (prompt_logprobs) need every token's logits: programs of their own,
        # compiled on first use, so ordinary steps never pay for the full [T, vocab] head.
        self._score_fn = FreshJit(_make_score_step(graphdef, self._state_def, self.num_logprobs), donate_argnums=(1,))
        self._score_executables = self.programs.view("score")
        # Embedding mode: the same forward pass, returning every token's final hidden state.
        self._hidden_fn = FreshJit(_make_hidden(graphdef, self._state_def), donate_argnums=(1,))
        self._hidden_executables = self.programs.view("hidden")

    @property
    def weights(self) -> tuple[jax.Array, ...]:
        """`state`'s arrays in flattening order: what every program of this runner takes first."""
        if self._weights is None:
            self._weights = tuple(jax.tree_util.tree_leaves(self.state))
        return self._weights

    def state_written(self) -> None:
        """Say that `state` was written in place (engine/lora.py), so `weights` is flattened again."""
        self._weights = None

    # --- sizing ---

    def _min_token_bucket(self) -> int:
        """`runtime.min_token_bucket`, or for 0 (the default) 2 where attention updates the KV cache in place at
        any step size, else 8.

        XLA:CPU's reference attention in a program of fewer than 8 token rows made XLA copy the whole cache each
        step (time grew with runtime.num_pages); the CPU FFI attention reads the pages in place, so there a
        batch-1 step runs in the 2-row program, whose kernels compute its one real row (`real_rows`). Not 1:
        XLA:CPU reduces a [1, K] row in another order than [M, K] for M >= 2 (RMSNorm's mean differed in the
        last bit), so a 1-row program's logits differed from the same token's in any larger step, which
        broke batch invariance and made speculative verify steps disagree with decode on near ties.
        """
        low = self.runtime.min_token_bucket
        if not low:
            impl = _select_attention(decode_only=False, head_dim=self.config.head_dim, page_size=self.page_size,
                                     dtype=self.dtype)
            low = 2 if impl == "cpu" else 8
        return min(low, self.runtime.max_num_batched_tokens)

    def _num_pages(self) -> int:
        if self.runtime.num_pages:
            return self.runtime.num_pages
        per_page = kv_bytes_per_page(self.config, self.page_size, self.dtype)
        budget = int(device.free_memory_bytes() * self.runtime.memory_fraction)
        pages = min(self.runtime.max_pages_from_memory, self.runtime.max_num_seqs * self.pages_per_seq + 1)
        if self.backend == "cpu":
            # Host RAM is shared with everything else (vLLM's CPU default is 4 GiB too), and no more pages than
            # max_num_seqs full-length sequences hold: every page is zero-filled at start (~1 GiB/s here, a
            # restart's largest cost after imports), and a 2-core host never runs more at once.
            budget = min(budget, int(self.runtime.kv_cache_cpu_gib * 2**30))
        else:
            pages = self.runtime.max_pages_from_memory  # the rest of the device's memory is prefix cache
        pages = min(device.coarse_count(budget // per_page), pages)  # stable shapes
        return max(int(pages), self.pages_per_seq + 1)

    def all_buckets(self) -> list[Bucket]:
        """Every bucket a step can land in: len(token_buckets) x len(page_buckets) mixed programs, plus
        len(seq_buckets) x len(page_buckets) decode-only ones on GPU (docs/runtime.md has the default count)."""
        mixed = [(t, self.seqs_for(t), p, False) for t, p in itertools.product(self.token_buckets, self.page_buckets)]
        decode = [(s, s, p, True) for s, p in itertools.product(self.seq_buckets, self.page_buckets)]
        return mixed + (decode if self.decode_buckets else [])

    def seqs_for(self, token_bucket: int) -> int:
        """Sequence rows of a mixed step: tied to its token bucket (a step has at most one sequence per token),
        so sequences are not a third bucket dimension; padded rows only cost sampling work."""
        return min(token_bucket, self.runtime.max_num_seqs)

    def bucket_for(self, num_tokens: int, num_seqs: int, max_pages: int) -> Bucket:
        pages = pick_bucket(self.page_buckets, max_pages)
        if self.decode_buckets and num_tokens == num_seqs:  # decode only: token t is slot t
            seqs = pick_bucket(self.seq_buckets, num_seqs)
            return seqs, seqs, pages, True
        tokens = pick_bucket(self.token_buckets, max(num_tokens, num_seqs))
        return tokens, self.seqs_for(tokens), pages, False

    # --- compilation ---

    def program(self, bucket: Bucket) -> Any:
        """The step program of `bucket`: built now (loaded from disk, or compiled) unless it already is."""
        exe = self._executables.get(bucket)
        if exe is None:
            with self._building.setdefault(bucket, threading.Lock()):  # a warm-up thread may be building it
                exe = self._executables.get(bucket)
                if exe is None:
                    exe = self._executables[bucket] = self._compile(bucket)
        return exe

    def warmup(self, buckets: Sequence[Bucket] | None = None, background: bool = False) -> int:
        """Build the step programs before requests need them (engine/warmup.py); returns how many now."""
        return warm_up(self, buckets, background)

    def is_stored(self, bucket: Bucket) -> bool:
        """Whether `bucket`'s executable is on disk (runtime.cache_executables), so building it only loads it."""
        return self._stored.has(("step", bucket))

    def _compile(self, bucket: Bucket) -> Any:
        step_fn = self._step_fns[bucket[3]]
        return self._stored.get(("step", bucket), lambda: step_fn.lower(self.weights, self.kv_cache,
                                                                         *_abstract_inputs(bucket, self)))

    @property
    def compiled_buckets(self) -> set[Bucket]:
        return {cast(Bucket, bucket) for bucket in self._executables}

    # --- running ---

    def step(self, chunks: Sequence[Chunk], feed: Callable[[np.ndarray], jax.Array] | None = None,
             wait: bool = True) -> Any:
        """Run one ragged step; one result per chunk (None where it does not sample). `feed`: the token ids to
        run, from the packed ones (engine/overlap.py); `wait=False`: return the device output unfetched."""
        if not chunks:
            return []
        bucket = self.bucket_for(sum(len(c.tokens) for c in chunks), len(chunks), max(len(c.pages) for c in chunks))
        inputs, sampling, history, history_is_output = self._pack(chunks, bucket)
        if feed is not None:
            inputs = dataclasses.replace(inputs, tokens=feed(inputs.tokens))
        out, self.kv_cache = self.program(bucket)(self.weights, self.kv_cache, inputs, sampling, history,
                                                  history_is_output)
        return sampled_results(chunks, jax.device_get(out)) if wait else out

    def step_with_scores(self, chunks: Sequence[Chunk]) -> tuple[list[Sampled | None], list[PromptScores | None]]:
        """`step`, plus `PromptScores` for each chunk with `score` set (None for the others)."""
        if not chunks:
            return [], []
        bucket = self._mixed_bucket(chunks)
        inputs, sampling, history, history_is_output = self._pack(chunks, bucket)
        targets = np.full(bucket[0], -1, np.int32)
        offset = 0
        for chunk in chunks:
            n = len(chunk.tokens)
            if chunk.score:  # the token after position p is history[p + 1], while that is still the prompt
                nxt = np.arange(chunk.start_pos + 1, chunk.start_pos + n + 1)
                inside = nxt < min(chunk.num_prompt, len(chunk.history))
                targets[offset:offset + n] = np.where(inside, np.asarray(chunk.history)[np.where(inside, nxt, 0)], -1)
            offset += n
        exe = self._score_executables.get(bucket)
        if exe is None:
            abstract = _abstract_inputs(bucket, self)
            target_shape = jax.ShapeDtypeStruct(targets.shape, targets.dtype)
            exe = self._score_executables[bucket] = self._score_fn.lower(
                self.weights, self.kv_cache, *abstract, target_shape).compile()
        out, scores, self.kv_cache = exe(self.weights, self.kv_cache, inputs, sampling, history, history_is_output,
                                         targets)
        out, scores = jax.device_get((out, scores))
        results, offset = [], 0
        for chunk in chunks:
            n = len(chunk.tokens)
            results.append(PromptScores(scores.logprob[offset:offset + n], scores.top_ids[offset:offset + n],
                                        scores.top_logprobs[offset:offset + n]) if chunk.score else None)
            offset += n
        return sampled_results(chunks, out), results

    def hidden_states(self, chunks: Sequence[Chunk]) -> list[np.ndarray]:
        """Final-norm hidden states `[len(chunk.tokens), hidden]` of each chunk (for embeddings).

        Same packing and buckets as `step`; compiled on first use per bucket.
        """
        bucket = self._mixed_bucket(chunks)
        inputs = self._pack(chunks, bucket)[0]
        exe = self._hidden_executables.get(bucket)
        if exe is None:
            abstract = _abstract_inputs(bucket, self)[0]
            exe = self._hidden_executables[bucket] = self._hidden_fn.lower(self.weights, self.kv_cache,
                                                                           abstract).compile()
        hidden, self.kv_cache = exe(self.weights, self.kv_cache, inputs)
        hidden = np.asarray(jax.device_get(hidden))
        out, offset = [], 0
        for chunk in chunks:
            out.append(hidden[offset:offset + len(chunk.tokens)])
            offset += len(chunk.tokens)
        return out

    def _mixed_bucket(self, chunks: Sequence[Chunk]) -> Bucket:
        """The bucket of a step that runs every token's head (scoring, embeddings): never decode-only."""
        tokens = pick_bucket(self.token_buckets, max(sum(len(c.tokens) for c in chunks), len(chunks)))
        return tokens, self.seqs_for(tokens), pick_bucket(self.page_buckets, max(len(c.pages) for c in chunks)), False

    def _pack(self, chunks: Sequence[Chunk], bucket: Bucket) -> tuple[StepInputs, SamplingTensors, np.ndarray,
                                                                        np.ndarray]:
        num_tokens, num_seqs, num_pages, _ = bucket
        history_len = num_pages * self.page_size
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.full(num_tokens, -1, np.int32)
        token_seq = np.zeros(num_tokens, np.int32)
        slots = np.zeros(num_tokens, np.int32)
        tables = np.zeros((num_seqs, num_pages), np.int32)
        logits_index = np.zeros(num_seqs, np.int32)
        history = np.full((num_seqs, history_len), -1, np.int32)
        is_output = np.zeros((num_seqs, history_len), bool)
        offset = 0
        for i, chunk in enumerate(chunks):
            n = len(chunk.tokens)
            pos = np.arange(chunk.start_pos, chunk.start_pos + n, dtype=np.int32)
            pages = np.asarray(chunk.pages, np.int32)
            if len(pages) * self.page_size < chunk.start_pos + n:
                raise ValueError("chunk's pages do not cover its positions")
            tokens[offset:offset + n] = chunk.tokens
            positions[offset:offset + n] = pos
            token_seq[offset:offset + n] = i
            slots[offset:offset + n] = pages[pos // self.page_size] * self.page_size + pos % self.page_size
            tables[i, :len(pages)] = pages
            logits_index[i] = offset + n - 1
            hist = np.asarray(chunk.history, np.int32)[:history_len]
            history[i, :len(hist)] = hist
            is_output[i, chunk.num_prompt:len(hist)] = True
            offset += n
        rows = [chunk.sampling for chunk in chunks] + [None] * (num_seqs - len(chunks))
        # Grammar masks are a fixed-shape input of every program (all ones for free and padding rows), so a
        # constrained request joins any batch without a recompile.
        # A step without constrained rows reuses one all-ones array already on the device (per row count), so
        # free serving neither builds nor copies [rows, V/32] words each step.
        allowed: Any = self._free_masks.get(num_seqs)
        if allowed is None or any(chunk.allowed is not None for chunk in chunks):
            allowed = np.full((num_seqs, -(-self.config.vocab_size // 32)), -1, np.int32)
            for i, chunk in enumerate(chunks):
                if chunk.allowed is not None:
                    allowed[i] = chunk.allowed
            if not any(chunk.allowed is not None for chunk in chunks):
                allowed = self._free_masks[num_seqs] = jax.device_put(allowed)
        lora_coef = None
        if self.max_loras:  # a fixed-shape input: any mix of adapters (or none) runs the same program
            lora_coef = np.zeros((num_seqs, self.max_loras), np.float32)
            for i, chunk in enumerate(chunks):
                if chunk.lora is not None:
                    lora_coef[i] = chunk.lora
        inputs = StepInputs(tokens=tokens, positions=positions, token_seq=token_seq, slot_mapping=slots,
                            block_tables=tables, logits_index=logits_index, lora_coef=lora_coef)
        # Parameters were validated at admission (SamplingParams.validate); skip re-checking per step.
        sampling = SamplingTensors.from_params(rows, num_seqs, num_bias_slots=self.num_bias_slots, validate=False,
                                               allowed=allowed)
        return inputs, sampling, history, is_output


def _model(graphdef: nnx.GraphDef, state_def: Any, weights: tuple[jax.Array, ...]) -> Any:
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(state_def, weights))


def _make_step(graphdef: nnx.GraphDef, state_def: Any, num_logprobs: int, decode_only: bool):
    def step(weights: tuple[jax.Array, ...], kv_cache: KVCache, inputs: StepInputs, sampling: SamplingTensors,
             history: jax.Array, history_is_output: jax.Array) -> tuple[SampleOutput, KVCache]:
        with real_rows(inputs.positions):
            logits, kv_cache = _model(graphdef, state_def, weights)(inputs, kv_cache, decode_only=decode_only)
        return sample(logits, sampling, history, history_is_output, num_logprobs=num_logprobs), kv_cache

    return step


def _make_score_step(graphdef: nnx.GraphDef, state_def: Any, num_logprobs: int):
    def step(weights: tuple[jax.Array, ...], kv_cache: KVCache, inputs: StepInputs, sampling: SamplingTensors,
             history: jax.Array, history_is_output: jax.Array,
             targets: jax.Array) -> tuple[SampleOutput, SampleOutput, KVCache]:
        with real_rows(inputs.positions):
            logits, kv_cache = _model(graphdef, state_def, weights).token_logits(inputs, kv_cache)
        sampled = sample(jnp.take(logits, inputs.logits_index, axis=0), sampling, history, history_is_output,
                         num_logprobs=num_logprobs)
        return sampled, token_logprobs(logits, targets, num_logprobs=num_logprobs), kv_cache

    return step


def sampled_results(chunks: Sequence[Chunk], out: SampleOutput) -> list[Sampled | None]:
    return [
        None if chunk.sampling is None else Sampled(
            int(out.token_ids[i]), float(out.logprob[i]), out.top_ids[i], out.top_logprobs[i])
        for i, chunk in enumerate(chunks)
    ]


def _make_hidden(graphdef: nnx.GraphDef, state_def: Any):
    def hidden(weights: tuple[jax.Array, ...], kv_cache: KVCache, inputs: StepInputs) -> tuple[jax.Array, KVCache]:
        return _model(graphdef, state_def, weights).hidden_states(inputs, kv_cache)

    return hidden


def _abstract_inputs(bucket: Bucket, runner: ModelRunner) -> tuple[Any, ...]:
    """Shape-only arguments for lowering a bucket without running it."""
    inputs, sampling, history, is_output = runner._pack([], bucket)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                        (inputs, sampling, history, is_output))
