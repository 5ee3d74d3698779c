"""Reasoning (`<think>...</think>`) split out of the answer, and the switches that turn it on or off.

Qwen3, DeepSeek-R1, QwQ and their kin write their reasoning between `<think>` and `</think>` before
the answer. Clients want it apart: OpenAI-style clients read `reasoning_content` (llama.cpp,
DeepSeek) or `reasoning` (vLLM, OpenRouter), Ollama's read `thinking`. A model reasons this way
when its chat template mentions `<think>`; its output then starts with `<think>`, or already
inside it when the template opened the tag in the prompt (DeepSeek-R1's newer templates, Qwen3's
thinking-only variants). Only a `<think>` at the very start opens reasoning: the same tag later
in an answer is the answer's text.

`ReasoningStream` splits streamed text, holding back only a tail that may be the start of a tag,
so no markup reaches the answer. The switch for templates that have one (Qwen3's
`enable_thinking`) comes from each dialect's field: Ollama `think`, OpenAI `reasoning_effort`,
LM Studio / OpenRouter `reasoning`, or `chat_template_kwargs` as given.
"""

from __future__ import annotations

from typing import Any

OPEN, CLOSE = "<think>", "</think>"


def template_reasons(source: str | None) -> bool:
    """Whether a chat template's model writes `<think>` reasoning."""
    return bool(source) and (OPEN in source or CLOSE in source)  # type: ignore[operator]


def opened_in_prompt(prompt_text: str) -> bool:
    """The rendered prompt ends inside `<think>`: the output starts as reasoning."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


class ReasoningStream:
    """Feed output text; get back (reasoning, answer) to show now. `inside`: the prompt opened `<think>`."""

    def __init__(self, inside: bool = False) -> None:
        self._mode = "reason" if inside else "start"  # start | reason | answer
        self._pending = ""
        self._trim = inside  # drop the whitespace right after a tag

    def feed(self, delta: str) -> tuple[str, str]:
        self._pending += delta
        reasoning: list[str] = []
        answer: list[str] = []
        while True:
            if self._trim:
                stripped = self._pending.lstrip()
                if not stripped:
                    break
                self._pending, self._trim = stripped, False
            if self._mode == "start":
                head = self._pending.lstrip()
                if head.startswith(OPEN):
                    self._pending, self._mode, self._trim = head[len(OPEN):], "reason", True
                    continue
                if not head or OPEN.startswith(head):
                    break  # may still be "<think>"
                self._mode = "answer"
            if self._mode == "answer":
                answer.append(self._pending)
                self._pending = ""
                break
            at = self._pending.find(CLOSE)
            if at >= 0:
                reasoning.append(self._pending[:at])
                self._pending, self._mode, self._trim = self._pending[at + len(CLOSE):], "answer", True
                continue
            keep = _partial_len(self._pending, CLOSE)
            reasoning.append(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            break
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """The end of the output: a held-back tail goes where it was (reasoning cut short stays reasoning)."""
        reasoning, answer = self.feed("")
        pending, self._pending = self._pending, ""
        if self._mode == "reason":
            return reasoning + pending, answer
        return reasoning, answer + pending


def _partial_len(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def split_reasoning(text: str, inside: bool = False) -> tuple[str, str]:
    """A whole output as (reasoning, answer)."""
    stream = ReasoningStream(inside)
    reasoning, answer = stream.feed(text)
    more_reasoning, more_answer = stream.finish()
    return reasoning + more_reasoning, answer + more_answer


EFFORTS = ("low", "medium", "high")


def thinking_kwargs(think: Any, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Template variables for a request's thinking switch: `enable_thinking`, and `reasoning_effort` for a level.

    `think` is False/"none"/"off" (off), True/"on" (on), a level ("minimal", "low", "medium", "high": on at
    that effort), or None (the template's default). Variables the client set in `chat_template_kwargs` win.
    """
    kwargs: dict[str, Any] = {}
    if think is None:
        pass
    elif think is False or think in ("none", "off"):
        kwargs["enable_thinking"] = False
    else:
        kwargs["enable_thinking"] = True
        if isinstance(think, str) and think not in ("on", "true"):
            kwargs["reasoning_effort"] = think
    return {**kwargs, **(given or {})}
