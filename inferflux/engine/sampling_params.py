"""What a caller asks of one generation: length limits, stopping rules and sampling knobs.

Field names and meanings follow vLLM's `SamplingParams` (and so the OpenAI
API), so server code maps request fields one to one. `validate()` turns bad
values into one clear `SamplingParamsError` before anything is scheduled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from inferflux.engine.sampler import RowParams
from inferflux.errors import InferFluxError

# While min_tokens is unmet, stop ids are banned through logit-bias slots reserved for them.
MAX_STOP_TOKEN_IDS = 32
RESERVED_BIAS_SLOTS = MAX_STOP_TOKEN_IDS + 16  # + the model's EOS ids


class SamplingParamsError(InferFluxError, ValueError):
    """A sampling parameter is out of range."""


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: until the context is full; 0: only run (and score) the prompt
    min_tokens: int = 0  # EOS and stop tokens are ignored until this many tokens exist
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: Sequence[str] | None = None  # stop strings; the text returned ends before them
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per token (None = none; 0 = sampled token only)
    # Logprobs of the prompt's own tokens (vLLM's name), top-N alternatives each; what scoring and
    # lm-evaluation-harness loglikelihood tasks need. The prompt is then computed whole (no prefix-cache hit).
    prompt_logprobs: int | None = None
    n: int = 1
    skip_special_tokens: bool = True

    def validate(self, vocab_size: int | None = None, max_logprobs: int = 20,
                 max_logit_bias: int | None = None) -> SamplingParams:
        """Check every field; the sampling knobs through the sampler's own `RowParams.validate`."""
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
        try:
            RowParams.from_sampling_params(self, step=0).validate(vocab_size)
        except ValueError as exc:
            raise SamplingParamsError(str(exc)) from None
        for token in self.stop_token_ids or ():
            if vocab_size is not None and not 0 <= int(token) < vocab_size:
                raise SamplingParamsError(f"stop token id {token} is outside the vocabulary (0..{vocab_size - 1})")
        return self
