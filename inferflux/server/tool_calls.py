"""Tool calls in model output: found, parsed, and shaped for OpenAI and Ollama clients (one parser for both).

Chat templates teach models one of a few ways to write a call; these are recognised:

- Hermes / Qwen2 / Qwen2.5: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one tag per
  call, text may surround the tags;
- Mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` objects;
- Llama 3.1+: `<|python_tag|>` (often stripped as a special token) then one or more JSON objects
  `{"name": ..., "parameters": {...}}` separated by `;`;
- bare JSON: the whole output is such an object, or a list of them.

Bare JSON counts as a call only when every name is one of the request's tools, so an answer
that merely is JSON stays an answer. Text that looks like a call but does not parse is returned
as text, never dropped. `ToolCallStream` does the same incrementally: it holds back only what
may still become a call (a possible start tag, an open `<tool_call>`, or an output that began
with `{` or `[`), so plain answers stream as before.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterable
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
REST_MARKERS = ("[TOOL_CALLS]", "<|python_tag|>")  # everything after these is calls
_MARKERS = (OPEN, *REST_MARKERS)


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def openai(self, index: int) -> dict[str, Any]:
        """OpenAI's shape: arguments as a JSON string, an id the client echoes back in the tool message."""
        return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def ollama(self) -> dict[str, Any]:
        """Ollama's shape: arguments as an object."""
        return {"function": {"name": self.name, "arguments": self.arguments}}


def tool_names(tools: Iterable[Any] | None) -> set[str]:
    """Function names of OpenAI/Ollama `tools` entries ({"type": "function", "function": {"name": ...}})."""
    names: set[str] = set()
    for tool in tools or []:
        if isinstance(tool, dict):
            inner = tool.get("function")
            function = inner if isinstance(inner, dict) else tool
            if isinstance(function.get("name"), str):
                names.add(function["name"])
    return names


def _call(obj: Any) -> ToolCall | None:
    """One call object: {"name", "arguments" | "parameters"} (arguments may be a JSON string)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return ToolCall(name, args)


def _json_values(text: str) -> list[Any] | None:
    """JSON values in `text` separated by whitespace or `;` (Llama writes several that way); None if not all JSON."""
    decoder, values, pos = json.JSONDecoder(), list[Any](), 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
        if pos == len(text):
            return values or None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)


def _calls_in(text: str) -> list[ToolCall] | None:
    """The calls `text` consists of (objects, or lists of objects), or None if it is anything else."""
    values = _json_values(text)
    if values is None:
        return None
    calls = []
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            call = _call(item)
            if call is None:
                return None
            calls.append(call)
    return calls or None


class ToolCallStream:
    """Feed output text as it arrives; get back the text to show now and the calls completed so far."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = set(names)
        self._pending = ""  # text not yet handed out
        self._mode = "start"  # start (only whitespace so far) | text | tag (inside <tool_call>) | rest
        self._prefix = ""  # the marker that opened `rest`, given back if what follows is not calls
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._pending += delta
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._mode == "start":
                stripped = self._pending.lstrip()
                if not stripped or (len(stripped) < len(REST_MARKERS[0]) and REST_MARKERS[0].startswith(stripped)):
                    return "", calls  # whitespace, or the start of "[TOOL_CALLS]": it may still be a call
                if stripped[0] in "{[" and not stripped.startswith(REST_MARKERS[0]):
                    self._mode, self._prefix = "rest", ""
                    continue
                self._mode = "text"
            if self._mode == "rest":
                break  # everything is kept until finish()
            if self._mode == "tag":
                end = self._pending.find(CLOSE)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                found = _calls_in(body)
                if found:
                    calls += found
                else:
                    out.append(OPEN + body + CLOSE)
                self._mode = "text"
                continue
            # text: hand out everything before a marker, or before a tail that may become one
            hits = [(self._pending.find(m), m) for m in _MARKERS if m in self._pending]
            if hits:
                at, marker = min(hits)
                out.append(self._pending[:at])
                self._pending = self._pending[at + len(marker):]
                if marker == OPEN:
                    self._mode = "tag"
                else:
                    self._mode, self._prefix = "rest", marker
                continue
            keep = _partial_marker_len(self._pending)
            out.append(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            break
        self.calls += calls
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: whatever was held back, as calls if it is calls, else as text."""
        pending, self._pending = self._pending, ""
        calls: list[ToolCall] = []
        text = ""
        if self._mode == "rest":
            found = _calls_in(pending)
            explicit = bool(self._prefix)
            if found and (explicit or all(c.name in self.names for c in found)):
                calls = found
            else:
                text = self._prefix + pending
        elif self._mode == "tag":
            found = _calls_in(pending)  # the output ended before </tool_call> (a stop string, or EOS)
            if found:
                calls = found
            else:
                text = OPEN + pending
        else:
            text = pending
        self._mode = "text"
        self.calls += calls
        return text, calls


def _partial_marker_len(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in _MARKERS:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                best = max(best, n)
                break
    return best


def parse_tool_calls(text: str, names: Iterable[str] = ()) -> tuple[str, list[ToolCall]]:
    """A complete output as (the text outside calls, the calls)."""
    stream = ToolCallStream(names)
    shown, calls = stream.feed(text)
    rest, more = stream.finish()
    return shown + rest, calls + more
