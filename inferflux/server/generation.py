"""The one generation path: every generating route of every dialect goes through `Generation`.

A dialect turns its body into a `GenerationSpec` (prompts, sampling knobs, limits: nothing of its
wire format) and turns the `Event`s that come back into its wire format. In between, this module,
and only this module:

- acquires the model from the pool (unknown -> 404, draining -> 503) and refuses encoder-only models;
- renders chat messages with the model's template, or encodes text;
- resolves `max_tokens` against the context window and `server.default_max_tokens`;
- submits every prompt of the request, all or nothing (the engine validates each once);
- parses tool calls out of the text when the request gave tools;
- yields `TextDelta` / `ToolCallDelta` / `Finished` events per choice, and when the stream ends
  (finished, failed or abandoned) releases the model handle and reports latencies to Prometheus.

A non-streamed response is a fold over the same events. Choices are numbered
`prompt_index * n + sample_index`, as OpenAI numbers them for multi-prompt completions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal

from inferflux.engine.engine import Engine, EngineDeadError
from inferflux.engine.request import Request, StreamOutput
from inferflux.engine.sampling_params import SamplingParams
from inferflux.engine.sequence import TokenLogprobs
from inferflux.formats.chat_template import ChatTemplate
from inferflux.formats.loader import LoadedModel
from inferflux.server import record
from inferflux.server.access import limits_http
from inferflux.server.adapters import with_adapters
from inferflux.server.errors import ContextLengthError, bad_request, unavailable
from inferflux.server.handle import ModelHandle
from inferflux.server.http import server_state
from inferflux.server.output_split import splitters
from inferflux.server.policy import guard as policy
from inferflux.server.reasoning import template_reasons
from inferflux.server.structured import tool_constraint
from inferflux.server.tool_calls import ToolCall
from inferflux.server.ui import traces as debug_traces


@dataclasses.dataclass
class Prompt:
    """One prompt: chat `messages` (rendered with the model's template), `text`, or `token_ids`."""

    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    add_generation_prompt: bool = True
    template: str | None = None  # a Jinja chat template to use instead of the model's (Ollama's /api/create)
    text: str | None = None
    add_special_tokens: bool = True  # for `text`: BOS as the model wants it
    token_ids: list[int] | None = None
    prefix_ids: list[int] = dataclasses.field(default_factory=list)  # Ollama's `context`, before the prompt


@dataclasses.dataclass
class Limits:
    """How many tokens a request may generate.

    `max_tokens` None: `server.default_max_tokens`, else up to the context window. `context`: a smaller
    window for this request (Ollama's num_ctx). `overflow`: OpenAI refuses a request that does not fit
    ("error"); Ollama generates what fits ("cap").
    """

    max_tokens: int | None = None
    context: int | None = None
    overflow: Literal["error", "cap"] = "error"


@dataclasses.dataclass
class GenerationSpec:
    model: str | None
    prompts: list[Prompt]
    params: SamplingParams  # max_tokens is set from `limits` per prompt
    limits: Limits = dataclasses.field(default_factory=Limits)
    keep_alive: float | None = None  # seconds the model stays loaded once idle (None: its default)
    tool_names: set[str] | None = None  # parse tool calls out of the text (the request gave these tools)
    think: bool | str | None = None  # Ollama's `think`: truthy on a model that does not reason is a 400
    forced_tools: list[dict[str, Any]] | None = None  # tool_choice required/named: the output is a call to one
    parallel_tool_calls: bool = True  # false: at most one call (grammar and parser); OpenAI's default is true


@dataclasses.dataclass(frozen=True)
class Timings:
    """A choice's clock (monotonic seconds): when it arrived, its first and last token, and model load time."""

    arrival: float
    first_token: float | None
    last_token: float | None
    load_seconds: float = 0.0
    scheduled: float | None = None  # when its first chunk ran: arrival..scheduled is its time queued

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclasses.dataclass(frozen=True)
class Started:
    """A choice's first output: which prompt it answers, and that prompt scored (with prompt_logprobs)."""

    choice: int
    prompt_index: int
    prompt_logprobs: list[TokenLogprobs | None] | None


@dataclasses.dataclass(frozen=True)
class TextDelta:
    choice: int
    text: str
    logprobs: list[TokenLogprobs] | None  # of the tokens this delta adds, when the request asked


@dataclasses.dataclass(frozen=True)
class ReasoningDelta:
    """Text the model wrote inside `<think>...</think>` (server/reasoning.py splits it out of the answer).

    Dialects show it apart from the answer: OpenAI `reasoning_content`/`reasoning`, Ollama `thinking`,
    Anthropic `thinking` blocks, Responses `reasoning` items. It never appears in a `TextDelta`.
    """

    choice: int
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    choice: int
    calls: list[ToolCall]
    first: int  # index of calls[0] among this choice's calls


@dataclasses.dataclass(frozen=True)
class Finished:
    choice: int
    reason: str  # "stop" or "length" (an engine abort is raised as a 503 instead)
    stop_reason: str | int | None  # the stop string or stop token id, if one ended it
    tool_calls: int  # how many tool calls the choice made
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    output_ids: list[int]
    timings: Timings


Event = Started | TextDelta | ReasoningDelta | ToolCallDelta | Finished


class Generation:
    """One request's life from submission to the last event; see the module docstring."""

    def __init__(self, spec: GenerationSpec, handle: ModelHandle, prompt_ids: list[list[int]],
                 streams: list[AsyncIterator[StreamOutput]], rendered: list[str | None] | None = None) -> None:
        self.spec = spec
        self.rendered = rendered or [None] * len(prompt_ids)  # each chat prompt's text (reasoning may start in it)
        self.handle = handle
        self.prompt_ids = prompt_ids
        self._streams = streams
        self._released = False
        self._stopped: set[int] = set()  # choices a post-hook stopped (`stop_choice`)
        # Taken now, in the request's context: a streamed body runs after that context is gone.
        self._metrics = server_state().metrics
        self._times: dict[int, list[float]] = {}
        self.finished: list[Finished] = []
        self.response_id: str | None = None  # the dialect's id of the answer (gen_ai.response.id), once it has one
        # The request's record (server/record.py) stays open until this generation closes: a streamed
        # body's token counts are known only then.
        self._record = record.current()
        if self._record is not None:
            self._record.model = handle.name
            self._record.extras["generation"] = self  # read by the finish hooks (server/tracing.py)
            self._record.hold()

    @property
    def n(self) -> int:
        return self.spec.params.n

    @property
    def num_choices(self) -> int:
        return len(self.prompt_ids) * self.n

    @property
    def model_name(self) -> str:
        return self.handle.name

    @classmethod
    async def start(cls, spec: GenerationSpec) -> Generation:
        """Acquire the model, build and submit every prompt's request; the handle is held until the end."""
        state = server_state()
        handle = await state.acquire(spec.model, spec.keep_alive)
        spec.params = with_adapters(spec.params, spec.model, handle)  # `model: "<LoRA adapter>"` (server/adapters.py)
        submitted: list[Request] = []
        try:
            if not handle.generative:
                raise bad_request(f"the model `{handle.name}` is an embedding model; use /v1/embeddings",
                                  param="model")
            if spec.think and spec.think not in ("none", "off") and not template_reasons(_source(spec, handle)):
                raise bad_request(f'"{handle.name}" does not support thinking', param="think")
            if spec.forced_tools:  # constrained to a call in the template's tool format (server/structured.py)
                spec.params = dataclasses.replace(spec.params, constraint=tool_constraint(
                    spec.forced_tools, _source(spec, handle), parallel=spec.parallel_tool_calls))
            guard = policy.before(spec, handle)  # pre-hooks: may rewrite the prompts or deny (server/policy/)
            rendered: list[str | None] = []
            prompt_ids = [encode(prompt, handle, rendered) for prompt in spec.prompts]
            requests = [Request(ids, dataclasses.replace(spec.params, max_tokens=max_tokens_for(
                spec.limits, len(ids), handle.max_model_len, state.config.server.default_max_tokens)))
                for ids in prompt_ids]
            requests = limits_http.admit_generation(requests, spec.params.n)  # tenant limits: cap, reserve or 429
            await guard.admit(requests)  # the OPA decision, when policy.opa is set: 403 on a deny
            state.check_capacity(handle)
            debug_traces.follow(handle, requests)  # the /debug token trace, when the server serves /debug
            streams = []
            for request in requests:  # all or nothing: a later refusal aborts the earlier ones
                streams.append(await _llm(handle)[1].submit(request))
                submitted.append(request)
        except EngineDeadError as exc:
            _abort(handle, submitted)
            handle.release()
            raise unavailable(str(exc)) from None
        except BaseException:
            _abort(handle, submitted)
            handle.release()
            raise
        generation = cls(spec, handle, prompt_ids, streams, rendered)
        generation.guard = guard
        generation.request_ids = [r.request_id for r in requests]
        return generation

    guard: policy.Guard = policy.NO_GUARD
    request_ids: list[str] = []  # the engine request of each prompt (its n samples are one request)

    def stop_choice(self, choice: int) -> None:
        """A post-hook stopped this choice (content filter): once every sample of its prompt is stopped,
        abort that engine request, the path a client disconnect takes (`Engine._stream`'s abort), so it
        stops generating and frees its pages now instead of running on to max_tokens unseen. Its final
        output then comes back as an abort, which `_events` turns into the choice's end."""
        self._stopped.add(choice)
        prompt = choice // self.n
        if prompt < len(self.request_ids) and all(prompt * self.n + i in self._stopped for i in range(self.n)):
            _llm(self.handle)[1].abort(self.request_ids[prompt])

    async def events(self) -> AsyncIterator[Event]:
        """Every choice's events, through the policy's post-hooks (which may rewrite or stop the text)."""
        stream = self.guard.after(self._events(), self.stop_choice)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()  # an abandoned stream still releases the model now

    async def _events(self) -> AsyncGenerator[Event, None]:
        """Every choice's events as they come; the handle is released when this ends, however it ends."""
        parsers = splitters(_source(self.spec, self.handle), self.rendered, self.n, self.spec.tool_names,
                            self.spec.prompts[0].tools if self.spec.prompts else None,
                            constrained=self.spec.params.constraint is not None,
                            max_calls=None if self.spec.parallel_tool_calls else 1)
        calls = [0] * self.num_choices
        outputs: dict[int, list[int]] = {}  # each choice's token ids so far (Ollama's `context` returns them)
        started: set[int] = set()
        try:
            async for pi, out in merged(self._streams):
                choice = pi * self.n + out.index
                if out.finish_reason == "abort" and choice not in self._stopped:
                    # the engine stopped under us (shutdown past the drain deadline); a choice the policy
                    # stopped (`stop_choice`) ends here normally, with the tokens generated so far
                    raise unavailable("the server shut down before this request finished")
                if choice not in started:
                    started.add(choice)
                    yield Started(choice, pi, out.prompt_logprobs)
                outputs.setdefault(choice, []).extend(out.new_token_ids)
                if out.new_token_ids and out.last_token_time is not None:
                    self._times.setdefault(choice, []).append(out.last_token_time)
                thought, text, new_calls = "", out.new_text, list[ToolCall]()
                parser = parsers.get(choice)
                if parser is not None:
                    thought, text, new_calls = parser.feed(out.new_text, out.finished)
                if thought:
                    yield ReasoningDelta(choice, thought)
                if text or out.new_logprobs:
                    yield TextDelta(choice, text, out.new_logprobs)
                if new_calls:
                    yield ToolCallDelta(choice, new_calls, calls[choice])
                    calls[choice] += len(new_calls)
                if out.finished:
                    done = self._finished(choice, out, calls[choice], outputs.get(choice, []))
                    self.finished.append(done)
                    yield done
        finally:
            self.close()

    def close(self) -> None:
        """Report latencies and release the model (idempotent; `events()` calls it when it ends)."""
        if self._released:
            return
        self._released = True
        metrics = self._metrics
        for done in self.finished:
            times = self._times.get(done.choice, [])
            e2e = (times[-1] if times else time.monotonic()) - done.timings.arrival
            metrics.observe_finished(done.timings.ttft, [b - a for a, b in zip(times, times[1:])], e2e, done.reason)
        self.handle.release()
        if self._record is not None:
            # Prompt tokens count once per prompt (the n choices of one prompt share it).
            prompts = {done.choice // self.n: done.prompt_tokens for done in self.finished}
            self._record.add_usage(sum(prompts.values()), sum(done.completion_tokens for done in self.finished))
            self._record.release()

    def _finished(self, choice: int, out: StreamOutput, num_calls: int, output_ids: list[int]) -> Finished:
        return Finished(choice, "length" if out.finish_reason == "length" else "stop", out.stop_reason, num_calls,
                        out.prompt_tokens, out.completion_tokens, out.cached_tokens, output_ids,
                        Timings(out.arrival_time, out.first_token_time, out.last_token_time,
                                self.handle.load_seconds, out.scheduled_time))


def _llm(handle: ModelHandle) -> tuple[LoadedModel, Engine]:
    """The generative model and its engine; a 400 for an embedding-only model."""
    if handle.model is None or handle.engine is None:
        raise bad_request(f"the model `{handle.name}` is an embedding model; use /v1/embeddings", param="model")
    return handle.model, handle.engine


def _abort(handle: ModelHandle, requests: list[Request]) -> None:
    for request in requests:
        _llm(handle)[1].abort(request.request_id)


def _source(spec: GenerationSpec, handle: ModelHandle) -> str | None:
    """The chat template the prompts render with (a created model's own, else the model's)."""
    if handle.model is None:
        return None
    override = next((p.template for p in spec.prompts if p.template), None)
    return override or getattr(handle.model.chat_template, "source", None)


def encode(prompt: Prompt, handle: ModelHandle, rendered: list[str | None] | None = None) -> list[int]:
    """The token ids a prompt means for this model (templates write BOS and other special tokens as text).

    `rendered` gets the prompt's text when it came from chat messages (else None): the reasoning
    splitter reads whether the template opened `<think>`.
    """
    text: str | None = None
    model = _llm(handle)[0]
    tokenizer = model.tokenizer
    if prompt.messages is not None:
        template = model.chat_template
        if prompt.template:  # with the model's special tokens (bos_token, ...)
            template = ChatTemplate(prompt.template, template.special_tokens)
        text = template.render(prompt.messages, add_generation_prompt=prompt.add_generation_prompt,
                               tools=prompt.tools, **prompt.template_kwargs)
        ids = tokenizer.encode(text, add_special_tokens=False)
    elif prompt.text is not None:
        ids = tokenizer.encode(prompt.text, add_special_tokens=prompt.add_special_tokens) if prompt.text else []
    else:
        ids = list(prompt.token_ids or [])
    if rendered is not None:
        rendered.append(text if prompt.messages is not None else None)
    ids = list(prompt.prefix_ids) + ids
    if not ids:
        raise bad_request("the prompt is empty", param="prompt")
    return ids


def max_tokens_for(limits: Limits, prompt_len: int, context: int, default: int) -> int:
    """The request's max_tokens, checked against (OpenAI) or capped to (Ollama) the context window."""
    window = limits.context if limits.context and prompt_len < limits.context < context else context
    room = window - prompt_len
    requested = limits.max_tokens
    if requested is None:
        if room < 1:
            raise ContextLengthError(f"the prompt has {prompt_len} tokens, but this model's context holds {context}; "
                                     "shorten the prompt")
        return min(default, room) if default else room
    if limits.overflow == "cap":
        if room < 1:
            raise ContextLengthError(f"the prompt is {prompt_len} tokens; this model's context is {context} tokens")
        return min(requested, room)
    if prompt_len + max(requested, 1) > context:
        raise ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            "Please reduce the prompt or the completion length.")
    return requested


async def merged(streams: list[AsyncIterator[StreamOutput]]) -> AsyncIterator[tuple[int, StreamOutput]]:
    """Interleave several request streams as their outputs arrive: (prompt index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(key: int, stream: AsyncIterator[StreamOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((key, out))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


__all__ = ["Event", "Finished", "Generation", "GenerationSpec", "Limits", "Prompt", "ReasoningDelta",
           "Started", "TextDelta", "Timings", "ToolCallDelta", "encode", "max_tokens_for", "merged"]
