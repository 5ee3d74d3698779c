"""The research API: `LLM(path).generate(prompts, SamplingParams(...))`, in-process, no server.

It drives the same `EngineCore` the server uses (continuous batching, chunked
prefill, prefix caching, preemption), stepping it on the caller's thread
until every request is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

from inferflux.config import Config, load_config
from inferflux.engine.compile_cache import enable_persistent_cache
from inferflux.engine.core import EngineCore
from inferflux.engine.kv_cache import PageAllocator
from inferflux.engine.model_runner import ModelRunner
from inferflux.engine.request import Request
from inferflux.engine.sampling_params import SamplingParams, SamplingParamsError
from inferflux.engine.sequence import TokenLogprobs
from inferflux.formats.loader import LoadedModel, load_model


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None


@dataclasses.dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (vLLM's shape).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


Prompt = str | Seq[int]


class LLM:
    """A model loaded in this process, ready to generate."""

    def __init__(self, model: str | Path, config: Config | None = None, **runtime: Any) -> None:
        self.config = config or load_config(overrides={f"runtime.{k}": v for k, v in runtime.items()})
        enable_persistent_cache(self.config.home_path / "xla-cache")
        self.model: LoadedModel = load_model(model)
        self.tokenizer = self.model.tokenizer
        self.engine = EngineCore(self.model, self.config)

    @property
    def runner(self) -> ModelRunner:
        return self.engine.runner

    @property
    def allocator(self) -> PageAllocator:
        return self.engine.allocator

    def generate(
        self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, or token ids); one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise SamplingParamsError("one SamplingParams per prompt, or one for all")
        requests = [Request(self._encode(p), sp) for p, sp in zip(prompts, params_list)]
        for request in requests:  # all valid before any is queued
            self.engine.validate(request)
        collected: dict[tuple[str, int], CompletionOutput] = {}
        prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        try:
            for request in requests:
                self.engine.add_request(request)
                for i in range(request.params.n):
                    collected[request.request_id, i] = CompletionOutput(i, "", [], "length",
                                                                        [] if request.params.logprobs is not None
                                                                        else None)
            while self.engine.has_unfinished:
                for out in self.engine.step():
                    completion = collected[out.request_id, out.index]
                    if out.prompt_logprobs is not None:
                        prompt_logprobs.setdefault(out.request_id, out.prompt_logprobs)
                    completion.text += out.new_text
                    completion.token_ids += out.new_token_ids
                    if out.new_logprobs and completion.logprobs is not None:
                        completion.logprobs += out.new_logprobs
                    if out.finish_reason:
                        completion.finish_reason = out.finish_reason
        finally:
            for request in requests:  # an error mid-way must not leave requests holding pages
                self.engine.abort(request.request_id)
        return [
            RequestOutput(prompt if isinstance(prompt, str) else None, request.prompt_ids,
                          [collected[request.request_id, i] for i in range(request.params.n)],
                          prompt_logprobs.get(request.request_id))
            for prompt, request in zip(prompts, requests)
        ]

    def chat(
        self,
        messages: Seq[Mapping[str, Any]] | Seq[Seq[Mapping[str, Any]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render conversation(s) with the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts = [self.model.chat_template.render(c, add_generation_prompt=add_generation_prompt,
                                                   **(chat_template_kwargs or {})) for c in conversations]
        # Templates put BOS in the text themselves; encoding must not add another.
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(ids, sampling_params)

    def embed(self, inputs: Prompt | Seq[Prompt], pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        """Embeddings `[N, hidden]` from the model's final hidden states, pooled per input (mean or last)."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # type: ignore[list-item]
        vectors = self.engine.embed([self._encode(p) for p in inputs], pooling)
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
