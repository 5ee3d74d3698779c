"""What the sampler reads, built on the host: per-row knobs (`RowParams`), the step's `SamplingTensors`,
the penalty history, and what leaves the device (`SampleOutput`).

`engine/sampler.py` is the device side (the stages inside the compiled step); this module is
everything numpy builds before the step, once per step, and the output pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import struct

from inferflux.engine.sampling_params import SamplingKnobs, SamplingParamsError, bias_token_id

# A step input: built as numpy on the host, a traced jax.Array inside the compiled step.
HostOrDevice = jax.Array | np.ndarray

# Rows with a temperature below this are greedy (vLLM uses the same epsilon).
GREEDY_EPS = 1e-5
# Smallest static width of the sparse logit-bias arrays.
MIN_BIAS_SLOTS = 16

_SEED_MASK = 0xFFFFFFFF


@dataclasses.dataclass(kw_only=True)
class RowParams(SamplingKnobs):
    """One row's sampling settings: the request's knobs (declared and checked once, in
    `SamplingKnobs`) plus ``step``, the row's position (tokens generated so far).

    ``seed`` None draws a fresh random seed each time the row is packed; an engine that
    wants a reproducible stream per request fixes one at admission. Seeds outside
    ``[0, 2**32)`` are folded to 32 bits (the low half of the 64-bit value xor a
    multiplicative hash of the high half, so seeds in ``[0, 2**32)`` map to themselves
    and -1 does not collide with 0). ``step`` is folded into the key, so each step draws
    fresh noise.
    """

    step: int = 0
    # Top logprobs the request wants per token (its `logprobs`; 0/None: none): the step skips the top-N work
    # when no row in it wants any.
    top_logprobs: int = 0

    @classmethod
    def from_sampling_params(cls, params: SamplingKnobs, *, step: int, seed: int | None = None) -> RowParams:
        """The row view of a request's knobs; ``seed`` is used when ``params.seed`` is None."""
        knobs = {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingKnobs)}
        if knobs["seed"] is None:
            knobs["seed"] = seed
        return cls(**knobs, step=step, top_logprobs=int(getattr(params, "logprobs", None) or 0))

    @property
    def needs_history(self) -> bool:
        """True when a penalty needs the row's token history."""
        default = _DEFAULTS
        return (
            self.presence_penalty != default.presence_penalty
            or self.frequency_penalty != default.frequency_penalty
            or self.repetition_penalty != default.repetition_penalty
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` (a `SamplingParamsError`) naming the first field that is out of range."""
        self.check_knobs(vocab_size)
        if int(self.step) != self.step or not (0 <= self.step < 2**31):
            raise SamplingParamsError(f"sampling parameter step={self.step!r}: must be an integer in [0, 2**31)")


_DEFAULTS = RowParams()
# What a padding row samples with: greedy (so it never triggers the filter or
# random branches), fixed seed, no penalties.
PADDING_ROW = RowParams(temperature=0.0, seed=0)

_seed_rng = np.random.default_rng()


def _fold_seed(seed: int | None) -> int:
    if seed is None:
        return int(_seed_rng.integers(0, 2**32))
    s = int(seed) % 2**64
    return ((s & _SEED_MASK) ^ ((s >> 32) * 0x9E3779B1)) & _SEED_MASK


@struct.dataclass
class SamplingTensors:
    """Per-row sampling settings as arrays (a pytree; every leaf is ``[B]``
    except the sparse bias, ``[B, NB]``). Build with :meth:`from_params`: numpy on the host, traced
    `jax.Array`s inside the step (hence `HostOrDevice`)."""

    temperature: HostOrDevice  # f32 [B]; < GREEDY_EPS -> greedy
    top_k: HostOrDevice  # i32 [B]; <= 0 -> off
    top_p: HostOrDevice  # f32 [B]; 1 -> off
    min_p: HostOrDevice  # f32 [B]; 0 -> off
    presence_penalty: HostOrDevice  # f32 [B]
    frequency_penalty: HostOrDevice  # f32 [B]
    repetition_penalty: HostOrDevice  # f32 [B]; 1 -> off
    bias_ids: HostOrDevice  # i32 [B, NB]; -1 -> unused slot
    bias_values: HostOrDevice  # f32 [B, NB]
    seed: HostOrDevice  # u32 [B]
    step: HostOrDevice  # i32 [B]
    top_logprobs: HostOrDevice  # i32 [B]; 0 -> the row needs no top-N logprobs
    # Grammar masks (engine/grammar.py): packed bits i32 [B, ceil(V/32)], bit t % 32 of word t // 32 set when
    # token t is allowed; all ones for free rows. None (tests, callers without constraints): no mask stage.
    allowed: HostOrDevice | None = None

    @classmethod
    def from_params(
        cls,
        rows: Sequence[RowParams | None],
        batch_size: int,
        *,
        vocab_size: int | None = None,
        num_bias_slots: int | None = None,
        validate: bool = True,
        allowed: np.ndarray | None = None,
    ) -> SamplingTensors:
        """Pack ``rows`` (``None`` = padding) into numpy arrays of ``batch_size`` rows.

        ``num_bias_slots`` fixes the bias width NB; by default it is
        ``max(MIN_BIAS_SLOTS, next power of two >= the largest bias)`` so few
        shapes get compiled; a runner with precompiled executables passes a
        fixed width. ``vocab_size``, when given, is used to reject bias ids
        outside the vocabulary. Raises ``ValueError`` on bad values
        (``validate=False`` skips the checks, ~half the ~3 us/row packing cost,
        for callers that validated at admission).
        """
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit in a batch of {batch_size}")
        filled = [PADDING_ROW if r is None else r for r in rows]
        for r in filled:
            if validate and r is not PADDING_ROW:
                r.validate(vocab_size)
        rows = filled + [PADDING_ROW] * (batch_size - len(filled))
        widest = max((len(r.logit_bias or {}) for r in rows), default=0)
        if num_bias_slots is None:
            num_bias_slots = max(MIN_BIAS_SLOTS, 1 << max(widest - 1, 0).bit_length())
        elif widest > num_bias_slots:
            raise ValueError(f"a row has {widest} logit-bias entries, more than num_bias_slots={num_bias_slots}")

        def col(name: str, dtype) -> np.ndarray:
            return np.array([getattr(r, name) for r in rows], dtype=dtype)

        bias_ids = np.full((batch_size, num_bias_slots), -1, np.int32)
        bias_values = np.zeros((batch_size, num_bias_slots), np.float32)
        for i, r in enumerate(rows):
            items = list((r.logit_bias or {}).items())
            if items:
                ids = [bias_token_id(t) for t, _ in items]  # valid ids (checked at admission): None never stays
                bias_ids[i, : len(items)] = [-1 if t is None else t for t in ids]
                bias_values[i, : len(items)] = [v for _, v in items]
        return cls(
            temperature=col("temperature", np.float32),
            top_k=col("top_k", np.int32),
            top_p=col("top_p", np.float32),
            min_p=col("min_p", np.float32),
            presence_penalty=col("presence_penalty", np.float32),
            frequency_penalty=col("frequency_penalty", np.float32),
            repetition_penalty=col("repetition_penalty", np.float32),
            bias_ids=bias_ids,
            bias_values=bias_values,
            seed=np.array([_fold_seed(r.seed) for r in rows], np.uint32),
            step=col("step", np.int32),
            top_logprobs=col("top_logprobs", np.int32),
            allowed=allowed,
        )


@struct.dataclass
class SampleOutput:
    """What leaves the device per step: one sampled token per row, its logprob
    and the row's top-N logprobs (all of the raw model logits)."""

    token_ids: jax.Array  # i32 [B]
    logprob: jax.Array  # f32 [B]; raw-logit logprob of token_ids
    top_ids: jax.Array  # i32 [B, num_logprobs]; highest first, ties -> lowest id
    top_logprobs: jax.Array  # f32 [B, num_logprobs]


def build_history(
    rows: Sequence[tuple[Sequence[int], Sequence[int]] | None],
    batch_size: int,
    history_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(history i32 [B, H], history_is_output bool [B, H])`` from
    ``(prompt_ids, output_ids)`` per row (``None`` = padding, all -1).

    Raises ``ValueError`` when a row's tokens do not fit in ``history_len``
    (truncating would silently weaken its penalties).
    """
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit in a batch of {batch_size}")
    history = np.full((batch_size, history_len), -1, np.int32)
    is_output = np.zeros((batch_size, history_len), bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        prompt, output = row
        n_p, n = len(prompt), len(prompt) + len(output)
        if n > history_len:
            raise ValueError(f"row {i} has {n} tokens of history, more than history_len={history_len}")
        history[i, :n_p] = prompt
        history[i, n_p:n] = output
        is_output[i, n_p:n] = True
    return history, is_output
