"""The research API: `LLM(path).generate(prompts, SamplingParams(...))`, in-process, no server.

It drives the same `EngineCore` the server uses (continuous batching, chunked
prefill, prefix caching, preemption), stepping it on the caller's thread.
`stream` yields one request's outputs as the core steps; `generate`, `chat`
and `embed` fold the same stepping loop (`_run`) over their requests.
Several `stream`s may be iterated in turns: a step's outputs for a request
whose iterator is not the one stepping wait in that request's outbox.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections import deque
from collections.abc import Generator, Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any, cast

import numpy as np

from inferflux.config import Config, load_config
from inferflux.engine.compile_cache import enable_home_caches
from inferflux.engine.core import EngineCore
from inferflux.engine.kv_cache import PageAllocator
from inferflux.engine.model_runner import ModelRunner
from inferflux.engine.request import Pooling, Request, StreamOutput
from inferflux.engine.sampling_params import SamplingParams, SamplingParamsError
from inferflux.engine.sequence import TokenLogprobs
from inferflux.formats.loader import LoadedModel, load_model
from inferflux.store.signing import check_model


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
        enable_home_caches(self.config.home_path, self.config.runtime.cache_executables)
        check_model(Path(model), self.config, self.config.home_path)  # security.require_signed_models
        self.model: LoadedModel = load_model(model)
        self.tokenizer = self.model.tokenizer
        self.engine = EngineCore(self.model, self.config)
        self._outbox: dict[str, deque[StreamOutput]] = {}  # request id -> outputs its iterator has not taken

    @property
    def runner(self) -> ModelRunner:
        return self.engine.runner

    @property
    def allocator(self) -> PageAllocator:
        return self.engine.allocator

    def load_lora(self, name: str, path: str | Path) -> None:
        """Load the PEFT adapter folder or GGUF LoRA file at `path` as `name` (needs runtime.max_loras > 0);
        never recompiles.

        Requests then select it with `SamplingParams(lora=[(name, scale)])`, several to stack them.
        """
        from inferflux.store.adapters import open_adapter

        # A path or a stored adapter's name; signed when security.require_signed_models, decrypted in memory.
        self.engine.loras.load(name, open_adapter(path, self.config))

    def unload_lora(self, name: str) -> None:
        """Forget adapter `name`; its slot is emptied once no running request uses it."""
        self.engine.loras.unload(name)

    def list_loras(self) -> list[str]:
        return self.engine.loras.names()

    def generate(
        self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, or token ids); one RequestOutput per prompt, in order."""
        prompts = _prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise SamplingParamsError("one SamplingParams per prompt, or one for all")
        requests = [Request(self._encode(p), sp) for p, sp in zip(prompts, params_list)]
        for request in requests:  # all valid before any is queued
            self.engine.validate(request)
        collected = {(r.request_id, i): CompletionOutput(i, "", [], "length", [] if r.params.logprobs is not None
                                                         else None)
                     for r in requests for i in range(r.params.n)}
        prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        for out in self._run(requests):
            completion = collected[out.request_id, out.index]
            if out.prompt_logprobs is not None:
                prompt_logprobs.setdefault(out.request_id, out.prompt_logprobs)
            completion.text += out.new_text
            completion.token_ids += out.new_token_ids
            if out.new_logprobs and completion.logprobs is not None:
                completion.logprobs += out.new_logprobs
            if out.finish_reason:
                completion.finish_reason = out.finish_reason
        return [
            RequestOutput(prompt if isinstance(prompt, str) else None, request.prompt_ids,
                          [collected[request.request_id, i] for i in range(request.params.n)],
                          prompt_logprobs.get(request.request_id))
            for prompt, request in zip(prompts, requests)
        ]

    def stream(self, prompt: Prompt,
               sampling_params: SamplingParams | None = None) -> Generator[StreamOutput, None, None]:
        """One request's `StreamOutput` deltas as the engine steps (each sample's last one is finished).

        A bad request raises here, before anything is queued. The request is queued when iteration
        starts; closing the iterator early (`break`, `.close()`, Ctrl-C) aborts it and frees its pages.
        """
        request = Request(self._encode(prompt), sampling_params or SamplingParams())
        self.engine.validate(request)
        return self._run([request])

    def _run(self, requests: Seq[Request]) -> Generator[StreamOutput, None, None]:
        """Queue `requests`, step the engine until each sample of each has its final output, yield theirs.

        Outputs for other requests (another iterator's) go to their outboxes. Whatever way this ends
        (done, closed early, an error mid-step), none of these requests is left holding pages.
        """
        remaining = {r.request_id: r.params.n for r in requests}
        try:
            for request in requests:
                self.engine.add_request(request)
                self._outbox[request.request_id] = deque()
            while remaining:
                for request_id in list(remaining):
                    box = self._outbox[request_id]
                    while box:
                        out = box.popleft()
                        if out.finished:
                            remaining[request_id] -= 1
                            if not remaining[request_id]:
                                del remaining[request_id]
                        yield out
                if not remaining:
                    break
                if not self.engine.has_unfinished:
                    raise RuntimeError("the engine has nothing left to run, yet requests are not finished")
                for out in self._step():
                    if out.request_id in self._outbox:
                        self._outbox[out.request_id].append(out)
        finally:
            for request in requests:  # an error or an early close must not leave requests holding pages
                self.engine.abort(request.request_id)
                self._outbox.pop(request.request_id, None)

    def _step(self) -> list[StreamOutput]:
        """One engine step with Ctrl-C held back until it returns.

        A KeyboardInterrupt raised inside `step()` could land between the scheduler's and the page
        allocator's bookkeeping and leave the engine inconsistent for every later request. So on the
        main thread, with Python's default handler in place, SIGINT is deferred to the end of the step
        (one step is milliseconds, or one compilation) and re-raised where aborting is safe.
        """
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return self.engine.step()
        pending: list[int] = []
        signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
        try:
            outputs = self.engine.step()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if pending:
            raise KeyboardInterrupt
        return outputs

    def chat(
        self,
        messages: Seq[Mapping[str, Any]] | Seq[Seq[Mapping[str, Any]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render conversation(s) with the model's chat template, then generate."""
        conversations = cast(list[Seq[Mapping[str, Any]]], [messages] if messages and isinstance(messages[0], Mapping)
                             else list(messages))
        prompts = [self.model.chat_template.render(c, add_generation_prompt=add_generation_prompt,
                                                   **(chat_template_kwargs or {})) for c in conversations]
        # Templates put BOS in the text themselves; encoding must not add another.
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(ids, sampling_params)

    def embed(self, inputs: Prompt | Seq[Prompt], pooling: Pooling = "mean", normalize: bool = True) -> np.ndarray:
        """Embeddings `[N, hidden]` from the model's final hidden states, pooled per input (mean or last).

        Each input is one `Request(kind="embed")`, scheduled like a prompt that generates nothing.
        """
        requests = [Request(self._encode(p), kind="embed", pooling=pooling) for p in _prompt_list(inputs)]
        for request in requests:  # all valid before any is queued
            self.engine.validate(request)
        found = {out.request_id: out.embedding for out in self._run(requests) if out.embedding is not None}
        if not requests:
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        vectors = np.stack([found[r.request_id] for r in requests])
        if normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]


def _prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    """One prompt (text, or token ids) or several, as a list of prompts."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [cast(Prompt, prompts)]
    return list(cast(Seq[Prompt], prompts))
