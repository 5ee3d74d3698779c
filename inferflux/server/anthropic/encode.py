"""A generation's events as Anthropic's stream events, and their fold into one `message` object.

The stream (https://docs.anthropic.com/en/api/messages-streaming): `message_start` (the message with
empty content and the prompt's token count), then per content block `content_block_start`, its
deltas (`thinking_delta`, `text_delta`, or one `input_json_delta` carrying a tool call's whole input,
since calls are parsed whole) and `content_block_stop`; a `ping` after the first block opens;
`message_delta` with `stop_reason`, `stop_sequence` and the final usage; `message_stop`. A block
opens when its first piece arrives and closes when another kind of content follows, so thinking,
text and tool calls interleave in the order the model wrote them. The non-streamed answer is a fold
over the same events, so both always agree.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from quart import Response

from inferflux.server.anthropic import ERROR_SHAPE
from inferflux.server.errors import to_api_error
from inferflux.server.generation import Finished, Generation, ReasoningDelta, TextDelta, ToolCallDelta

StreamEvent = tuple[str, dict[str, Any]]


def stop_reason(done: Finished, stop_sequences: list[str]) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for a finished choice."""
    if done.tool_calls:
        return "tool_use", None
    if done.reason == "length":
        return "max_tokens", None
    if done.reason == "content_filter":  # the policy stopped the output (server/policy/)
        return "refusal", None
    if isinstance(done.stop_reason, str) and done.stop_reason in stop_sequences:
        return "stop_sequence", done.stop_reason
    return "end_turn", None


def usage(done: Finished | None, prompt_tokens: int) -> dict[str, Any]:
    """Anthropic counts prompt tokens read from the (prefix) cache apart from the rest."""
    if done is None:
        return {"input_tokens": prompt_tokens, "output_tokens": 0}
    cached = min(done.cached_tokens, done.prompt_tokens)
    return {"input_tokens": done.prompt_tokens - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": done.completion_tokens}


async def message_events(gen: Generation, stop_sequences: list[str]) -> AsyncIterator[StreamEvent]:
    """The stream events of one generation (one choice: Anthropic has no `n`)."""
    message: dict[str, Any] = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
               "model": gen.model_name, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": usage(None, len(gen.prompt_ids[0]))}
    yield "message_start", {"type": "message_start", "message": message}
    index, kind, pinged = -1, "", False
    done: Finished | None = None

    def stop() -> StreamEvent:
        return "content_block_stop", {"type": "content_block_stop", "index": index}

    def start(block: dict[str, Any]) -> StreamEvent:
        return "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}

    def delta(body: dict[str, Any]) -> StreamEvent:
        return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": body}

    async for event in gen.events():
        if isinstance(event, TextDelta | ReasoningDelta) and event.text:
            wanted = "text" if isinstance(event, TextDelta) else "thinking"
            if kind != wanted:
                if kind:
                    yield stop()
                index, kind = index + 1, wanted
                yield start({"type": "text", "text": ""} if wanted == "text"
                            else {"type": "thinking", "thinking": "", "signature": ""})
                if not pinged:
                    pinged = True
                    yield "ping", {"type": "ping"}
            yield delta({"type": "text_delta", "text": event.text} if wanted == "text"
                        else {"type": "thinking_delta", "thinking": event.text})
        elif isinstance(event, ToolCallDelta):
            for call in event.calls:
                if kind:
                    yield stop()
                index, kind = index + 1, ""
                yield start({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
                             "input": {}})
                yield delta({"type": "input_json_delta",
                             "partial_json": json.dumps(call.arguments, ensure_ascii=False)})
                yield stop()
        elif isinstance(event, Finished):
            done = event
    if kind:
        yield stop()
    if not pinged:
        yield "ping", {"type": "ping"}
    reason, sequence = stop_reason(done, stop_sequences) if done is not None else ("end_turn", None)
    yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                            "usage": usage(done, len(gen.prompt_ids[0]))}
    yield "message_stop", {"type": "message_stop"}


async def fold_message(events: AsyncIterator[StreamEvent]) -> dict[str, Any]:
    """The non-streamed `message`: the stream's blocks assembled, as the anthropic client's stream helper does."""
    message: dict[str, Any] = {}
    inputs: dict[int, str] = {}
    async for name, data in events:
        if name == "message_start":
            message = dict(data["message"], content=[])
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, body = message["content"][data["index"]], data["delta"]
            if body["type"] == "text_delta":
                block["text"] += body["text"]
            elif body["type"] == "thinking_delta":
                block["thinking"] += body["thinking"]
            elif body["type"] == "input_json_delta":
                inputs[data["index"]] = inputs.get(data["index"], "") + body["partial_json"]
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = data["usage"]
    for i, text in inputs.items():
        message["content"][i]["input"] = json.loads(text)
    return message


def sse_response(events: AsyncIterator[StreamEvent]) -> Response:
    """Server-Sent Events with `event:` lines; an error after the status line went out is an `error` event."""
    async def body() -> AsyncIterator[str]:
        try:
            async for name, data in events:
                yield f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream
            error = to_api_error(exc)
            if error is None:
                raise
            yield f"event: error\ndata: {json.dumps(ERROR_SHAPE(error), ensure_ascii=False)}\n\n"

    response = Response(body(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None
    return response
