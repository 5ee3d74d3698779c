"""Chat completions in the OpenAI format: `chat.completion.chunk` streams and their fold into one object."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from inferflux.server.errors import APIError
from inferflux.server.generation import Finished, Generation, ReasoningDelta, TextDelta, ToolCallDelta
from inferflux.server.openai_compat.bodies import ChatCompletionRequest
from inferflux.server.openai_compat.encode import chat_logprobs, sse_response, usage

Extras = Callable[[Generation], dict[str, Any]]


async def chat_response(req: ChatCompletionRequest, extras: Extras | None = None) -> Any:
    """Start the generation; an SSE stream when `stream`, else one `chat.completion` (plus `extras`' fields)."""
    gen = await Generation.start(req.spec())
    if req.stream:
        return sse_response(chat_chunks(req, gen, req.include_usage), APIError.body)
    result = await fold_chat(req, gen)
    return {**result, **(extras(gen) if extras else {})}


async def chat_chunks(req: ChatCompletionRequest, gen: Generation, with_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """The chat.completion.chunk objects of one request: roles first, then text and tool calls, then usage."""
    chunk_id, created, handle = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), gen.handle
    gen.response_id = chunk_id  # gen_ai.response.id on the request's span
    completion, prompt_tokens, cached = 0, 0, 0

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": gen.model_name,
               "choices": choices, **extra}
        if with_usage and "usage" not in obj:
            obj["usage"] = None
        return obj

    for i in range(gen.num_choices):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for event in gen.events():
        if isinstance(event, TextDelta):
            yield chunk([{"index": event.choice, "delta": {"content": event.text},
                          "logprobs": chat_logprobs(handle, event.logprobs), "finish_reason": None}])
        elif isinstance(event, ReasoningDelta):  # both names: llama.cpp/DeepSeek read one, vLLM/OpenRouter the other
            yield chunk([{"index": event.choice, "delta": {"reasoning_content": event.text, "reasoning": event.text},
                          "logprobs": None, "finish_reason": None}])
        elif isinstance(event, ToolCallDelta):
            yield chunk([{"index": event.choice, "logprobs": None, "finish_reason": None, "delta": {
                "tool_calls": [call.openai(event.first + j) for j, call in enumerate(event.calls)]}}])
        elif isinstance(event, Finished):
            completion += event.completion_tokens
            prompt_tokens, cached = event.prompt_tokens, event.cached_tokens
            reason = "tool_calls" if event.tool_calls else event.reason
            yield chunk([{"index": event.choice, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if with_usage:
        yield chunk([], usage=usage(prompt_tokens, completion, cached))


async def fold_chat(req: ChatCompletionRequest, gen: Generation) -> dict[str, Any]:
    """The non-streamed response: the same chunks, folded per choice."""
    n = gen.num_choices
    texts, thoughts, finish = [""] * n, [""] * n, ["stop"] * n
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    async for obj in chat_chunks(req, gen, True):
        for choice in obj["choices"]:
            i, delta = choice["index"], choice["delta"]
            texts[i] += delta.get("content", "")
            thoughts[i] += delta.get("reasoning_content", "")
            calls[i] += [{k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls", [])]
            if choice["finish_reason"]:
                finish[i] = choice["finish_reason"]
            if choice["logprobs"]:
                logprobs[i] += choice["logprobs"]["content"]
        last = obj
    return {
        "id": last["id"], "object": "chat.completion", "created": last["created"], "model": gen.model_name,
        "choices": [{"index": i, "message": _message(texts[i], calls[i], thoughts[i]),
                     "logprobs": {"content": logprobs[i]} if req.logprobs else None, "finish_reason": finish[i]}
                    for i in range(n)],
        "usage": last["usage"],
    }


def _message(text: str, calls: list[dict[str, Any]], reasoning: str = "") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text or None if calls else text}
    if reasoning:
        message["reasoning_content"] = message["reasoning"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message
