"""What a caller asks of one generation: length limits, stopping rules and sampling knobs.

Field names and meanings follow vLLM's `SamplingParams` (and so the OpenAI
API), so server code maps request fields one to one. `validate()` turns bad
values into one clear `SamplingParamsError` before anything is scheduled.

The per-token knobs (temperature, top-k/p, min-p, penalties, logit bias,
seed) are declared once, in `SamplingKnobs`, with their one range check.
`SamplingParams` extends it with what the engine needs around sampling
(lengths, stop rules, logprobs, n); the sampler's device-side row view,
`RowParams`, extends it with the row's position. So a knob added here reaches
both, and is checked in one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from inferflux.errors import InferFluxError

if TYPE_CHECKING:
    from inferflux.engine.grammar import Constraint

# While min_tokens is unmet, stop ids are banned through logit-bias slots reserved for them.
MAX_STOP_TOKEN_IDS = 32
RESERVED_BIAS_SLOTS = MAX_STOP_TOKEN_IDS + 16  # + the model's EOS ids


class SamplingParamsError(InferFluxError, ValueError):
    """A sampling parameter is out of range."""


def bias_token_id(tok: object) -> int | None:
    """A logit-bias key as an int (JSON gives string keys), None if it is not one."""
    try:
        tid = int(tok)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return tid if isinstance(tok, str) or tid == tok else None


@dataclasses.dataclass(kw_only=True)
class SamplingKnobs:
    """How one next token is drawn; every default is a no-op. Keyword-only, so subclasses add fields freely.

    ``temperature`` 0 means greedy. ``top_k`` 0 or -1 is off (as is any ``k >= V``), ``top_p`` 1 is off,
    ``min_p`` 0 is off. ``logit_bias`` maps token id -> value added to its logit (``-inf`` bans it).
    ``seed`` None: the engine draws one at admission (`SamplingParams`), the sampler a fresh one each time
    the row is packed (`RowParams`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None

    def check_knobs(self, vocab_size: int | None = None) -> None:
        """Raise `SamplingParamsError` naming the first knob out of range (the only place they are checked)."""

        def bad(name: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"sampling parameter {name}={getattr(self, name)!r}: {why}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "must be a finite number >= 0")
        if int(self.top_k) != self.top_k or self.top_k < -1:
            raise bad("top_k", "must be an integer >= -1 (0 or -1 = off)")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", "must be in (0, 1]")
        if not (0 <= self.min_p <= 1):
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be finite")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "must be a finite number > 0")
        if self.seed is not None and int(self.seed) != self.seed:
            raise bad("seed", "must be an integer")
        for tok, val in (self.logit_bias or {}).items():
            tid = bias_token_id(tok)
            if tid is None or tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise bad("logit_bias", f"token id {tok!r} is not in the vocabulary")
            if math.isnan(val):
                raise bad("logit_bias", f"value for token {tok} is NaN")


@dataclasses.dataclass
class SamplingParams(SamplingKnobs):
    """A generation request's parameters: the sampling knobs (`SamplingKnobs`, keyword-only) plus these."""

    max_tokens: int | None = 16  # None: until the context is full; 0: only run (and score) the prompt
    min_tokens: int = 0  # EOS and stop tokens are ignored until this many tokens exist
    stop: Sequence[str] | None = None  # stop strings; the text returned ends before them
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per token (None = none; 0 = sampled token only)
    # Logprobs of the prompt's own tokens (vLLM's name), top-N alternatives each; what scoring and
    # lm-evaluation-harness loglikelihood tasks need. The prompt is then computed whole (no prefix-cache hit).
    prompt_logprobs: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    # Structured output: the text must match this (engine/grammar.py `Constraint`: JSON schema, regex, choice,
    # GBNF grammar or a tool call); compiled and checked by the engine at submission.
    constraint: Constraint | None = None
    # LoRA adapters by name with their scales, e.g. [("a1", 1.0), ("a2", 0.5)]: the scaled deltas are summed
    # in the step (engine/lora.py). Names are resolved (and unknown ones refused) by the engine at submission.
    lora: Sequence[tuple[str, float]] | None = None
    # Speculative decoding for this request (docs/speculative.md): None follows the server's
    # `speculative.method`, False opts out. Output is the same either way; only the speed differs.
    speculative: bool | None = None

    def validate(self, vocab_size: int | None = None, max_logprobs: int = 20,
                 max_logit_bias: int | None = None) -> SamplingParams:
        """Check every field (the knobs through `check_knobs`); returns self, or raises `SamplingParamsError`."""
        checks = [
            # 0: run the prompt and generate nothing (echo / prompt_logprobs scoring).
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be at least 0"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens"),
            (self.n >= 1, "n must be at least 1"),
            (self.logprobs is None or 0 <= self.logprobs <= max_logprobs,
             f"logprobs must be between 0 and {max_logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= max_logprobs,
             f"prompt_logprobs must be between 0 and {max_logprobs}"),
            (max_logit_bias is None or len(self.logit_bias or {}) <= max_logit_bias,
             f"logit_bias may have at most {max_logit_bias} entries"),
            (len(self.stop_token_ids or ()) <= MAX_STOP_TOKEN_IDS,
             f"stop_token_ids may have at most {MAX_STOP_TOKEN_IDS} entries"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)
        self.check_knobs(vocab_size)
        for token in self.stop_token_ids or ():
            if vocab_size is not None and not 0 <= int(token) < vocab_size:
                raise SamplingParamsError(f"stop token id {token} is outside the vocabulary (0..{vocab_size - 1})")
        return self
