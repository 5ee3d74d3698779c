"""What goes into the engine (a Request) and what comes out (StreamOutput deltas, EngineStats)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Literal

import numpy as np

from inferflux.engine.sampling_params import SamplingParams
from inferflux.engine.sequence import TokenLogprobs

RequestKind = Literal["generate", "embed"]
Pooling = Literal["mean", "last"]
POOLINGS: tuple[str, ...] = ("mean", "last")


@dataclasses.dataclass
class Request:
    """One request to the engine.

    kind="embed": the prompt runs like a prefill-only request (chunked, batched with generations) and the
    one final output carries `embedding`, its final hidden states pooled by `pooling` ("mean" over every
    token, or the "last" token's). `params` are not used then.
    """

    prompt_ids: list[int]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    tenant: str | None = None  # for per-tenant fairness and accounting
    adapter: str | None = None  # LoRA adapter name (later)
    kind: RequestKind = "generate"
    pooling: Pooling = "mean"  # kind="embed" only


@dataclasses.dataclass
class StreamOutput:
    """One sample's progress since its previous output: the increments, plus running totals."""

    request_id: str
    index: int  # which of the request's n samples
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    arrival_time: float
    first_token_time: float | None
    last_token_time: float | None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any
    # With params.prompt_logprobs, on a sample's first output: one entry per prompt token (the first is None).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # kind="embed", on its final output: the pooled final hidden state, float32 [hidden], not normalized.
    embedding: np.ndarray | None = None
    scheduled_time: float | None = None  # when the request's first chunk ran (monotonic): queueing ended

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class EngineStats:
    """Counters for /metrics: queue lengths, KV usage, prefix cache, preemptions, tokens, step time."""

    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (excludes cache hits)
    generation_tokens: int = 0
    num_steps: int = 0
    last_step_seconds: float = 0.0
    total_step_seconds: float = 0.0
    # Autoscaling hints: prompt tokens not yet computed (waiting requests and prompts still in prefill), and
    # the pages the waiting requests would need on top of the pages in use.
    queued_prompt_tokens: int = 0
    kv_pages_wanted: int = 0
    # Speculative decoding (engine/speculative.py): tokens proposed and verified, those accepted, verifications.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_num_drafts: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0

    @property
    def kv_page_pressure(self) -> float:
        """(pages in use + pages the queue would need) / pages: above 1, the queue cannot fit in this replica."""
        return (self.kv_pages_used + self.kv_pages_wanted) / self.kv_pages_total if self.kv_pages_total else 0.0
