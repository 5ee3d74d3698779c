"""Text completions in the OpenAI format: `text_completion` streams (with `echo` and prompt logprobs) and their fold."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from inferflux.server.errors import APIError
from inferflux.server.generation import Finished, Generation, Started, TextDelta
from inferflux.server.openai_compat.bodies import CompletionRequest
from inferflux.server.openai_compat.chat import Extras
from inferflux.server.openai_compat.encode import legacy_logprobs, sse_response, usage, vllm_prompt_logprobs


async def completion_response(req: CompletionRequest, extras: Extras | None = None) -> Any:
    gen = await Generation.start(req.spec())
    if req.stream:
        return sse_response(completion_chunks(req, gen), APIError.body)
    result = await fold_completion(req, gen)
    return {**result, **(extras(gen) if extras else {})}


def echo_texts(req: CompletionRequest, gen: Generation) -> list[str]:
    """The prompts as the model saw them (text verbatim, after any policy rewrite: `[EMAIL]` where an
    address was), never with the BOS the server added."""
    given: list[Any] = [req.prompt] if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) \
        else list(req.prompt)
    if len(gen.spec.prompts) == len(given):  # the policy's pre-hooks rewrite the spec's text in place
        given = [p.text if isinstance(g, str) and p.text is not None else g for g, p in zip(given, gen.spec.prompts)]
    tokenizer = gen.handle.tokenizer
    return [given[i] if isinstance(given[i], str) else tokenizer.decode(ids, skip_special_tokens=True)
            for i, ids in enumerate(gen.prompt_ids)]


async def completion_chunks(req: CompletionRequest, gen: Generation) -> AsyncIterator[dict[str, Any]]:
    cmpl_id, created, handle = f"cmpl-{uuid.uuid4().hex}", int(time.time()), gen.handle
    gen.response_id = cmpl_id  # gen_ai.response.id on the request's span
    echo = echo_texts(req, gen) if req.echo else None
    completion, cached = 0, 0

    def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None,
              **extra: Any) -> dict[str, Any]:
        return {"id": cmpl_id, "object": "text_completion", "created": created, "model": gen.model_name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, **extra}]}

    async for event in gen.events():
        if isinstance(event, Started) and (echo is not None or req.prompt_logprobs is not None):
            # Each choice's first output: the prompt, scored when asked.
            scored = event.prompt_logprobs if req.logprobs is not None and echo is not None else None
            extra = {} if req.prompt_logprobs is None else {
                "prompt_logprobs": vllm_prompt_logprobs(handle, event.prompt_logprobs or [])}
            yield chunk(event.choice, echo[event.prompt_index] if echo is not None else "",
                        None if scored is None else legacy_logprobs(handle, scored, gen.prompt_ids[event.prompt_index]),
                        None, **extra)
        elif isinstance(event, TextDelta):
            yield chunk(event.choice, event.text,
                        legacy_logprobs(handle, list(event.logprobs)) if event.logprobs is not None else None, None)
        elif isinstance(event, Finished):
            completion += event.completion_tokens
            cached += event.cached_tokens
            yield chunk(event.choice, "", None, event.reason)
    if req.include_usage or not req.stream:
        prompt_tokens = sum(len(p) for p in gen.prompt_ids)
        yield {"id": cmpl_id, "object": "text_completion", "created": created, "model": gen.model_name,
               "choices": [], "usage": usage(prompt_tokens, completion, cached // max(gen.n, 1))}


async def fold_completion(req: CompletionRequest, gen: Generation) -> dict[str, Any]:
    total = gen.num_choices
    texts, finish = [""] * total, ["stop"] * total
    logprobs: list[dict[str, list]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                                       for _ in range(total)]
    prompt_scores: list[list | None] = [None] * total
    totals: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    async for obj in completion_chunks(req, gen):
        first = first or obj
        if "usage" in obj and not obj["choices"]:
            totals = obj["usage"]
        for choice in obj["choices"]:
            i = choice["index"]
            if choice["logprobs"]:
                offset = len(texts[i])
                for key in ("tokens", "token_logprobs", "top_logprobs"):
                    logprobs[i][key] += choice["logprobs"][key]
                logprobs[i]["text_offset"] += [offset + o for o in choice["logprobs"]["text_offset"]]
            texts[i] += choice["text"]
            if "prompt_logprobs" in choice:
                prompt_scores[i] = choice["prompt_logprobs"]
            if choice["finish_reason"]:
                finish[i] = choice["finish_reason"]
    assert first is not None  # the usage object always comes
    extra = (lambda i: {"prompt_logprobs": prompt_scores[i]}) if req.prompt_logprobs is not None else (lambda i: {})
    return {"id": first["id"], "object": "text_completion", "created": first["created"], "model": gen.model_name,
            "choices": [{"index": i, "text": texts[i], "logprobs": logprobs[i] if req.logprobs is not None else None,
                         "finish_reason": finish[i], **extra(i)} for i in range(total)],
            "usage": totals}
