"""The research API: `LLM(path).generate(prompts, SamplingParams(...))`, in-process, no server.

It drives the model runner with a simple batch loop: each step runs every
active sequence's decode token first, then fills the rest of the token budget
with prompt chunks. The server's continuous-batching engine replaces this
loop, not the API.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Mapping, Sequence as Seq

from inferflux.config import Config, load_config
from inferflux.engine.compile_cache import enable_persistent_cache
from inferflux.engine.kv_cache import PageAllocator
from inferflux.engine.model_runner import Chunk, ModelRunner
from inferflux.engine.sampling_params import SamplingParams, SamplingParamsError
from inferflux.engine.sequence import Sequence, TokenLogprobs
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


Prompt = str | Seq[int]


class LLM:
    """A model loaded in this process, ready to generate."""

    def __init__(self, model: str | Path, config: Config | None = None, **runtime: Any) -> None:
        self.config = config or load_config(overrides={f"runtime.{k}": v for k, v in runtime.items()})
        enable_persistent_cache(self.config.home_path / "xla-cache")
        self.model: LoadedModel = load_model(model)
        self.tokenizer = self.model.tokenizer
        self.runner = ModelRunner(self.model, self.config.runtime)
        self.allocator = PageAllocator(self.runner.num_pages)
        self._seeds = random.Random(self.config.runtime.seed)
        if self.config.runtime.warmup:
            self.runner.warmup()

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
        requests = [self._make_sequences(p, sp) for p, sp in zip(prompts, params_list)]
        self._run([seq for _, seqs in requests for seq in seqs])
        return [self._output(prompt, request) for prompt, request in zip(prompts, requests)]

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

    # --- internals ---

    def _make_sequences(self, prompt: Prompt, params: SamplingParams) -> tuple[list[int], list[Sequence]]:
        runtime = self.config.runtime
        params.validate(self.model.config.vocab_size, runtime.max_logprobs, runtime.max_logit_bias)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise SamplingParamsError("the prompt is empty")
        if len(ids) >= self.runner.max_model_len:
            raise SamplingParamsError(
                f"prompt has {len(ids)} tokens; the model's context is {self.runner.max_model_len}")
        base_seed = params.seed if params.seed is not None else self._seeds.getrandbits(31)
        seqs = [Sequence(ids, params, seed=base_seed + i, max_model_len=self.runner.max_model_len,
                         eos_ids=frozenset(self.tokenizer.eos_ids)) for i in range(params.n)]
        return ids, seqs

    def _run(self, seqs: list[Sequence]) -> None:
        """The batch loop: decodes first, then prompt chunks, within the step's token and sequence caps."""
        runtime = self.config.runtime
        active = list(seqs)
        try:
            while active:
                budget, chunks, members = runtime.max_num_batched_tokens, [], []
                for seq in sorted(active, key=lambda s: s.in_prefill):
                    if len(chunks) == runtime.max_num_seqs or budget == 0:
                        break
                    tokens = seq.next_chunk(budget)
                    self._ensure_pages(seq, seq.num_computed + len(tokens))
                    samples = seq.num_computed + len(tokens) == len(seq.all_ids)
                    chunks.append(Chunk(tokens=tokens, start_pos=seq.num_computed, pages=seq.pages,
                                        history=seq.all_ids, num_prompt=len(seq.prompt_ids),
                                        sampling=seq.row_params() if samples else None))
                    members.append(seq)
                    budget -= len(tokens)
                for seq, chunk, result in zip(members, chunks, self.runner.step(chunks)):
                    seq.num_computed += len(chunk.tokens)
                    if result is not None:
                        seq.append(result.token_id, result.logprob, result.top_ids, result.top_logprobs)
                        self._check_stop_strings(seq)
                    if seq.finished:
                        self.allocator.release(seq.pages)
                        seq.pages = []
                        active.remove(seq)
        finally:
            for seq in active:  # an error mid-way must not leak pages
                self.allocator.release(seq.pages)
                seq.pages = []

    def _ensure_pages(self, seq: Sequence, num_tokens: int) -> None:
        needed = -(-num_tokens // self.runner.page_size) - len(seq.pages)
        if needed > 0:
            seq.pages = seq.pages + self.allocator.allocate(needed)

    def _check_stop_strings(self, seq: Sequence) -> None:
        if not seq.params.stop:
            return
        text = self._text(seq.output_ids, seq.params)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.stop_text_len = min(hits)
            seq.finish_reason = "stop"

    def _text(self, ids: list[int], params: SamplingParams) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    def _output(self, prompt: Prompt, request: tuple[list[int], list[Sequence]]) -> RequestOutput:
        ids, seqs = request
        outputs = []
        for index, seq in enumerate(seqs):
            text = self._text(seq.output_ids, seq.params)
            if seq.stop_text_len is not None:
                text = text[:seq.stop_text_len]
            outputs.append(CompletionOutput(index, text, list(seq.output_ids), seq.finish_reason or "length",
                                            seq.logprobs if seq.params.logprobs is not None else None))
        return RequestOutput(prompt if isinstance(prompt, str) else None, ids, outputs)
