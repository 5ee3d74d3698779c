"""`POST /api/v1/chat`: LM Studio's native chat, one input turn in, `output` items and `stats` out (or its SSE events).

The streamed events follow LM Studio 0.4's order: `chat.start`, `model_load.start`/`.end` when the request
waited for a load, `prompt_processing.start`/`.end` (ended by the first output), then per output item
`reasoning.start/delta/end` or `message.start/delta/end`, and `chat.end` with the same `result` a
non-streamed request gets. An error after the stream began is an `error` event followed by `chat.end`
with what was generated, as LM Studio does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import Response

from inferflux.engine.sampling_params import SamplingParams
from inferflux.server.errors import bad_request, to_api_error
from inferflux.server.generation import Finished, Generation, GenerationSpec, Limits, Prompt, ReasoningDelta, TextDelta
from inferflux.server.http import read_body
from inferflux.server.lmstudio.v1 import ERROR_SHAPE, bp
from inferflux.server.openapi import documented
from inferflux.server.reasoning import thinking_kwargs


class InputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "message"  # "message" / "text"; images are refused
    content: str | None = None
    text: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[InputItem]
    system_prompt: str | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, ge=1)
    reasoning: Literal["off", "low", "medium", "high", "on"] | None = None
    context_length: int | None = Field(default=None, ge=1)
    store: bool = True
    previous_response_id: str | None = None
    thread_id: str | None = None
    integrations: list[Any] | None = None

    def text(self) -> str:
        if isinstance(self.input, str):
            return self.input
        parts = []
        for i, item in enumerate(self.input):
            if item.type not in ("message", "text"):
                raise bad_request(f"input item {i} has type {item.type!r}; only text is served", param="input")
            parts.append(item.content if item.content is not None else item.text or "")
        return "\n".join(parts)

    def to_spec(self) -> GenerationSpec:
        if self.integrations:
            raise bad_request("integrations (MCP servers, plugins) are not supported by this server",
                              param="integrations", code="not_implemented")
        if self.previous_response_id or self.thread_id:
            raise bad_request("stateful chats are not supported: send the conversation in `input`",
                              param="previous_response_id" if self.previous_response_id else "thread_id",
                              code="not_implemented")
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": self.text()})
        params = SamplingParams(max_tokens=None, temperature=1.0 if self.temperature is None else self.temperature,
                                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                                min_p=self.min_p or 0.0,
                                repetition_penalty=1.0 if self.repeat_penalty is None else self.repeat_penalty)
        think = None if self.reasoning is None else self.reasoning
        return GenerationSpec(model=self.model, prompts=[Prompt(messages=messages,
                                                                template_kwargs=thinking_kwargs(think))],
                              params=params, think=think,
                              limits=Limits(max_tokens=self.max_output_tokens, context=self.context_length,
                                            overflow="cap"))


@bp.post("/api/v1/chat")
@documented(ChatRequest, "Chat (LM Studio REST v1)", streams=True)
async def chat() -> Any:
    body = await read_body(ChatRequest)
    gen = await Generation.start(body.to_spec())
    if body.stream:
        return _sse(_events(gen))
    fold = _Fold(gen)
    async for event in gen.events():
        fold.add(event)
    return fold.result()


class _Fold:
    """The output items and stats of one generation, built from its events."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.items: list[dict[str, Any]] = []
        self.done: Finished | None = None

    def add(self, event: Any) -> tuple[str | None, str | None]:
        """Fold one event; returns (kind of the item it opened or extended, the text it added)."""
        if isinstance(event, ReasoningDelta | TextDelta) and event.text:
            kind = "reasoning" if isinstance(event, ReasoningDelta) else "message"
            if not self.items or self.items[-1]["type"] != kind:
                self.items.append({"type": kind, "content": ""})
            self.items[-1]["content"] += event.text
            return kind, event.text
        if isinstance(event, Finished):
            self.done = event
        return None, None

    def result(self) -> dict[str, Any]:
        done, handle = self.done, self.gen.handle
        reasoning = "".join(i["content"] for i in self.items if i["type"] == "reasoning")
        stats: dict[str, Any] = {"input_tokens": 0, "total_output_tokens": 0, "reasoning_output_tokens": 0,
                                 "tokens_per_second": 0.0, "time_to_first_token_seconds": 0.0}
        if done is not None:
            t = done.timings
            span = (t.last_token - t.first_token) if t.last_token and t.first_token else 0.0
            stats.update(input_tokens=done.prompt_tokens, total_output_tokens=done.completion_tokens,
                         reasoning_output_tokens=len(handle.tokenizer.encode(reasoning, add_special_tokens=False))
                         if reasoning else 0,
                         tokens_per_second=(done.completion_tokens - 1) / span if span > 0 else 0.0,
                         time_to_first_token_seconds=round(t.ttft or 0.0, 4))
        if handle.load_seconds:
            stats["model_load_time_seconds"] = round(handle.load_seconds, 3)
        return {"model_instance_id": handle.name, "output": self.items, "stats": stats}


async def _events(gen: Generation) -> AsyncIterator[dict[str, Any]]:
    name = gen.handle.name
    yield {"type": "chat.start", "model_instance_id": name}
    if gen.handle.load_seconds:
        yield {"type": "model_load.start", "model_instance_id": name}
        yield {"type": "model_load.end", "model_instance_id": name,
               "load_time_seconds": round(gen.handle.load_seconds, 3)}
    yield {"type": "prompt_processing.start"}
    fold, processing, open_kind = _Fold(gen), True, None
    try:
        async for event in gen.events():
            kind, text = fold.add(event)
            if kind is None and not isinstance(event, Finished):
                continue
            if processing:
                processing = False
                yield {"type": "prompt_processing.end"}
            if kind != open_kind and open_kind is not None:
                yield {"type": f"{open_kind}.end"}
                open_kind = None
            if kind is not None:
                if open_kind is None:
                    open_kind = kind
                    yield {"type": f"{kind}.start"}
                yield {"type": f"{kind}.delta", "content": text}
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream, then the result
        error = to_api_error(exc)
        if error is None:
            raise
        if open_kind is not None:
            yield {"type": f"{open_kind}.end"}
            open_kind = None
        yield {"type": "error", **ERROR_SHAPE(error)}
    if open_kind is not None:
        yield {"type": f"{open_kind}.end"}
    yield {"type": "chat.end", "result": fold.result()}


def _sse(events: AsyncIterator[dict[str, Any]]) -> Response:
    """Named SSE events (`event: <type>` then its JSON), LM Studio's framing."""
    async def frames() -> AsyncIterator[str]:
        async for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    response = Response(frames(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None
    return response

