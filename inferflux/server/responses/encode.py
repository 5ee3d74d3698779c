"""The generation layer's events as the Responses API's typed stream, and the response object they build.

One encoder for both forms: a streamed response is these events as SSE (`event: <type>`, each with
its `sequence_number`); a non-streamed one is the `response` of the last event. The sequence is
OpenAI's:

    response.created, response.in_progress,
    per output item: response.output_item.added,
        message:   response.content_part.added, response.output_text.delta*, response.output_text.done,
                   response.content_part.done
        reasoning: response.content_part.added, response.reasoning_text.delta*, response.reasoning_text.done,
                   response.content_part.done
        function_call: response.function_call_arguments.delta, response.function_call_arguments.done
    response.output_item.done,
    response.completed (or response.incomplete with incomplete_details {reason: max_output_tokens})

Items open when their first text arrives, so thinking, answer text and tool calls become separate
output items in the order the model wrote them. Stored responses (`store: true`) are written just
before the final event, so a client that retrieves the id it was given finds it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from inferflux.server.generation import Finished, Generation, ReasoningDelta, TextDelta, ToolCallDelta
from inferflux.server.responses.bodies import ResponsesRequest, function_call_arguments

OnDone = Callable[[dict[str, Any]], None]


def response_object(req: ResponsesRequest, response_id: str, created: float, model: str) -> dict[str, Any]:
    """The response object before any output: the request's settings echoed, as OpenAI returns them."""
    fmt = req.text.format.model_dump(exclude_none=True, by_alias=True) if req.text and req.text.format else None
    tool_choice: Any = req.tool_choice or "auto"
    if not isinstance(tool_choice, str):
        tool_choice = tool_choice.model_dump()
    return {
        "id": response_id, "object": "response", "created_at": int(created), "status": "in_progress",
        "background": False, "completed_at": None, "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": model,
        "output": [], "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                      "summary": req.reasoning.summary if req.reasoning else None},
        "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": fmt or {"type": "text"}}, "tool_choice": tool_choice,
        "tools": [tool.model_dump(exclude_none=True) for tool in req.tools or []],
        "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": None,
        "user": req.user, "metadata": req.metadata or {},
    }


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class _Encoder:
    """Turns events into typed stream events; holds the output items and the open one."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the message or reasoning item receiving text

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return obj

    def snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": [dict(item) for item in self.response["output"]]}

    def text(self, kind: str, delta: str) -> list[dict[str, Any]]:
        """`delta` for the open item of `kind` ("message" or "reasoning"), opening one if needed."""
        events: list[dict[str, Any]] = []
        if self.open is None or self.open["type"] != kind:
            events += self.close("completed")
            item: dict[str, Any]
            part: dict[str, Any]
            if kind == "message":
                item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress",
                        "role": "assistant", "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "status": "in_progress",
                        "summary": [], "content": []}
                part = {"type": "reasoning_text", "text": ""}
            self.response["output"].append(item)
            self.open = item
            events.append(self.event("response.output_item.added", output_index=self._index(),
                                     item={**item, "content": []}))
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=self._index(),
                                     content_index=0, part=dict(part)))
            item["content"].append(part)
        item = self.open
        item["content"][0]["text"] += delta
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        events.append(self.event(name, item_id=item["id"], output_index=self._index(), content_index=0,
                                 delta=delta, **extra))
        return events

    def close(self, status: str) -> list[dict[str, Any]]:
        """End the open item: its text's done event, its part's, then the item's."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.response["output"].index(item)
        part = item["content"][0]
        item["status"] = status
        if item["type"] == "message":
            done = self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=part["text"], logprobs=[])
        else:
            done = self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                              content_index=0, text=part["text"])
        return [done,
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=dict(part)),
                self.event("response.output_item.done", output_index=index, item=dict(item))]

    def function_call(self, name: str, arguments: str) -> list[dict[str, Any]]:
        events = self.close("completed")
        item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                "arguments": "", "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": name}
        self.response["output"].append(item)
        index = self._index()
        events.append(self.event("response.output_item.added", output_index=index, item=dict(item)))
        events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=arguments))
        item["arguments"], item["status"] = arguments, "completed"
        events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=name, arguments=arguments))
        events.append(self.event("response.output_item.done", output_index=index, item=dict(item)))
        return events

    def _index(self) -> int:
        return len(self.response["output"]) - 1


async def response_events(req: ResponsesRequest, gen: Generation, response_id: str,
                          on_done: OnDone | None = None) -> AsyncIterator[dict[str, Any]]:
    """The typed events of one response; `on_done(response)` runs before the final one (the store)."""
    enc = _Encoder(response_object(req, response_id, time.time(), gen.model_name))
    yield enc.event("response.created", response=enc.snapshot())
    yield enc.event("response.in_progress", response=enc.snapshot())
    try:
        async for obj in _body(req, gen, enc, on_done):
            yield obj
    finally:  # also when the client left before the first token: the model handle is released
        gen.close()


async def _body(req: ResponsesRequest, gen: Generation, enc: _Encoder, on_done: OnDone | None
                ) -> AsyncIterator[dict[str, Any]]:
    finished: Finished | None = None
    async for event in gen.events():
        if isinstance(event, TextDelta) and event.text:
            for obj in enc.text("message", event.text):
                yield obj
        elif isinstance(event, ReasoningDelta) and event.text:
            for obj in enc.text("reasoning", event.text):
                yield obj
        elif isinstance(event, ToolCallDelta):
            for call in event.calls:
                for obj in enc.function_call(call.name, function_call_arguments(call.arguments)):
                    yield obj
        elif isinstance(event, Finished):
            finished = event
    incomplete = finished is not None and finished.reason in ("length", "content_filter")
    for obj in enc.close("incomplete" if incomplete else "completed"):
        yield obj
    response = enc.response
    response["status"] = "incomplete" if incomplete else "completed"
    response["completed_at"] = None if incomplete else int(time.time())
    if incomplete:
        response["incomplete_details"] = {"reason": "content_filter" if finished and finished.reason == "content_filter"
                                          else "max_output_tokens"}
    if finished is not None:
        response["usage"] = {
            # cache_write_tokens: OpenAI's explicit prompt caching, which this server does not have (0).
            "input_tokens": finished.prompt_tokens,
            "input_tokens_details": {"cached_tokens": finished.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": finished.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}
    if on_done is not None:
        on_done(response)
    yield enc.event("response.incomplete" if incomplete else "response.completed", response=enc.snapshot())
