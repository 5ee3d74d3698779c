"""Pieces of OpenAI-format responses: SSE framing, usage, logprobs objects, error objects."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from quart import Response

from inferflux.engine.sequence import TokenLogprobs
from inferflux.server.errors import APIError, to_api_error
from inferflux.server.handle import ModelHandle


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_response(objects: AsyncIterator[dict[str, Any]], on_error: Callable[[APIError], dict[str, Any]]) -> Response:
    """Server-Sent Events of `objects`, then `[DONE]`; an error after the headers went out is a last event."""
    async def events() -> AsyncIterator[str]:
        try:
            async for obj in objects:
                yield sse(obj)
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream
            error = to_api_error(exc)
            if error is None:
                raise
            yield sse(on_error(error))
        yield sse("[DONE]")

    response = Response(events(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None
    return response


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def token_text(handle: ModelHandle, token_id: int) -> str:
    return handle.tokenizer.token_to_piece(token_id).decode("utf-8", errors="replace")


def chat_logprobs(handle: ModelHandle, entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
    """Chat's `logprobs` object: per token its text, logprob, bytes and top alternatives."""
    if entries is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        piece = handle.tokenizer.token_to_piece(token_id)
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
                        for lp in entries]}


def legacy_logprobs(handle: ModelHandle, entries: list[TokenLogprobs | None],
                    token_ids: list[int] | None = None) -> dict[str, Any]:
    """Completions' `logprobs` object; `token_ids` names the tokens of entries that are None (a prompt's first)."""
    ids = [lp.token_id if lp is not None else token_ids[i] for i, lp in enumerate(entries)]  # type: ignore[index]
    bos = handle.tokenizer.bos_id
    tokens = [token_text(handle, t) for t in ids]
    offsets, position = [], 0
    for token_id, token in zip(ids, tokens):
        offsets.append(position)
        position += 0 if token_id == bos else len(token)  # BOS is not part of the echoed text
    return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for lp in entries],
            "top_logprobs": [None if lp is None else {token_text(handle, t): v for t, v in lp.top.items()}
                             for lp in entries],
            "text_offset": offsets}


def vllm_prompt_logprobs(handle: ModelHandle, entries: list[TokenLogprobs | None]) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, {token id: {logprob, rank, decoded_token}} (None first)."""
    out: list[dict[str, Any] | None] = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        ranked = sorted(lp.top.items(), key=lambda kv: -kv[1])
        row = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": token_text(handle, t)}
               for r, (t, v) in enumerate(ranked)}
        if str(lp.token_id) not in row:
            row[str(lp.token_id)] = {"logprob": lp.logprob, "rank": None,
                                     "decoded_token": token_text(handle, lp.token_id)}
        out.append(row)
    return out
