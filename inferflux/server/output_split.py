"""One choice's output text split three ways: reasoning, the answer, and tool calls.

Reasoning comes first (`server/reasoning.py`): a tool call written while thinking is part of the
thought, not a call. What is left is the answer, in which `server/tool_calls` finds the calls in the
syntax of the model's chat template. `Generation.events` runs one `OutputSplitter` per choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from inferflux.server.reasoning import ReasoningStream, opened_in_prompt, template_reasons
from inferflux.server.tool_calls import ToolCall, ToolCallStream, detect_format, param_types


class OutputSplitter:
    """Feed a choice's new text; get (reasoning, answer text, completed calls) to hand out now."""

    def __init__(self, reasoning: ReasoningStream | None, tools: ToolCallStream | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def feed(self, text: str, finished: bool) -> tuple[str, str, list[ToolCall]]:
        thought = ""
        if self.reasoning is not None:
            thought, text = self.reasoning.feed(text)
            if finished:
                more_thought, more_text = self.reasoning.finish()
                thought, text = thought + more_thought, text + more_text
        calls: list[ToolCall] = []
        if self.tools is not None:
            text, calls = self.tools.feed(text)
            if finished:
                rest, more = self.tools.finish()
                text, calls = text + rest, calls + more
        return thought, text, calls


def splitters(template_source: str | None, rendered: Sequence[str | None], n: int,
              names: set[str] | None, tools: list[dict[str, Any]] | None,
              constrained: bool = False, max_calls: int | None = None) -> dict[int, OutputSplitter]:
    """A splitter per choice (`prompt_index * n + sample`) that needs one; choices without are passed as is.

    `rendered` is each prompt's text when it came from chat messages (None for raw text or token ids:
    a raw prompt's output is the client's to read, as in Ollama's `raw` mode). `constrained`: a grammar
    (response_format, a forced tool call) writes the answer from the first token, so the output does not
    start inside a `<think>` the prompt opened. `max_calls`: calls kept per choice (1 with
    `parallel_tool_calls: false`).
    """
    reasons = template_reasons(template_source)
    fmt = detect_format(template_source)
    types = param_types(tools)
    out: dict[int, OutputSplitter] = {}
    for pi, text in enumerate(rendered):
        for sample in range(n):
            inside = opened_in_prompt(text) and not constrained if text is not None else False
            thinking = ReasoningStream(inside) if reasons and text is not None else None
            calls = ToolCallStream(names, fmt, types, max_calls) if names is not None else None
            if thinking is not None or calls is not None:
                out[pi * n + sample] = OutputSplitter(thinking, calls)
    return out
