"""A tool call, its wire shapes, and the parsers of one call's body in each format.

The body parsers turn the text of one call region into `ToolCall`s, or None when the text is not a
call (the stream then gives it back as text, never drops it):

- JSON objects `{"name": ..., "arguments" | "parameters": {...}}` (Hermes, Llama, Mistral's old list);
- Qwen3-coder's XML-style `<function=NAME><parameter=KEY>value</parameter>...</function>`, whose
  values are text: a parameter the tool declares as a string stays one, others are read as JSON
  when they parse (numbers, booleans, objects), as the Qwen3-coder parser in vLLM does;
- Mistral's newer `NAME[ARGS]{...}` (optionally `NAME[CALL_ID]id[ARGS]{...}`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

ParamTypes = Mapping[str, Mapping[str, str]]  # tool name -> parameter name -> JSON Schema type


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


def _functions(tools: Iterable[Any] | None) -> Iterable[dict[str, Any]]:
    for tool in tools or []:
        if isinstance(tool, dict):
            inner = tool.get("function")
            function = inner if isinstance(inner, dict) else tool
            if isinstance(function.get("name"), str):
                yield function


def tool_names(tools: Iterable[Any] | None) -> set[str]:
    """Function names of OpenAI/Ollama `tools` entries ({"type": "function", "function": {"name": ...}})."""
    return {function["name"] for function in _functions(tools)}


def param_types(tools: Iterable[Any] | None) -> dict[str, dict[str, str]]:
    """Each tool's declared parameter types, for formats whose values arrive as text (Qwen3-coder)."""
    types: dict[str, dict[str, str]] = {}
    for function in _functions(tools):
        params = function.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict):
            types[function["name"]] = {k: v["type"] for k, v in props.items()
                                       if isinstance(v, dict) and isinstance(v.get("type"), str)}
    return types


def call_from(obj: Any) -> ToolCall | None:
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


def json_values(text: str) -> list[Any] | None:
    """JSON values in `text` separated by whitespace, `,` or `;` (Llama writes several so); None unless all JSON."""
    decoder, values, pos = json.JSONDecoder(), list[Any](), 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in ";,"):
            pos += 1
        if pos == len(text):
            return values or None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        values.append(value)


def json_calls(text: str) -> list[ToolCall] | None:
    """The calls `text` consists of (objects, or lists of objects), or None if it is anything else."""
    values = json_values(text)
    if values is None:
        return None
    calls = []
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            call = call_from(item)
            if call is None:
                return None
            calls.append(call)
    return calls or None


_FUNCTION = re.compile(r"\s*<function=([^>\s]+)>(.*?)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"\s*<parameter=([^>\s]+)>(.*?)</parameter>\s*", re.DOTALL)


def _xml_value(raw: str, declared: str | None) -> Any:
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    if declared == "string":
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def xml_calls(text: str, types: ParamTypes | None = None) -> list[ToolCall] | None:
    """Qwen3-coder's `<function=NAME><parameter=KEY>value</parameter></function>` (one or more), or None."""
    calls, pos = [], 0
    while pos < len(text) and (found := _FUNCTION.match(text, pos)):
        name, body = found.group(1), found.group(2)
        declared = (types or {}).get(name, {})
        args, at = {}, 0
        while at < len(body) and (param := _PARAMETER.match(body, at)):
            args[param.group(1)] = _xml_value(param.group(2), declared.get(param.group(1)))
            at = param.end()
        if body[at:].strip():
            return None
        calls.append(ToolCall(name, args))
        pos = found.end()
    return calls if calls and not text[pos:].strip() else None


def tag_calls(body: str, types: ParamTypes | None = None) -> list[ToolCall] | None:
    """The body of a `<tool_call>` tag: JSON (Hermes/Qwen2.5) or XML-style (Qwen3-coder)."""
    if body.lstrip().startswith("<function="):
        return xml_calls(body, types)
    return json_calls(body)


# `[ARGS]` (and `[CALL_ID]`) are special tokens: with skip_special_tokens they are gone, leaving `NAME{...}`
_MISTRAL_NAME = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\])?(?=\s*\{)")


def mistral_named_call(text: str, scan: JsonScan | None = None) -> tuple[ToolCall, int] | None | bool:
    """Mistral's `NAME[ARGS]{...}` (or `NAME{...}`) at the start of `text`: (call, end), False: no, None: not yet."""
    found = _MISTRAL_NAME.match(text)
    if found is None:
        # still possibly "name[CALL_ID]id[ARGS]" being written: a name and bracketed markers so far
        return None if re.fullmatch(r"[\w.\-\[\]]*", text.lstrip()) else False
    end = (scan or JsonScan()).end(text, found.end())
    if end is None:
        return None
    if end < 0:
        return False
    try:
        args = json.loads(text[found.end():end])
    except ValueError:
        return False
    return (ToolCall(found.group(1), args), end) if isinstance(args, dict) else False


class JsonScan:
    """Where a JSON object or array ends, found incrementally: a streamed call is scanned once, not per piece.

    `end(text, start)` is the index past the value that begins at `start` (after spaces), None while it is
    still open, -1 if it never can be one (not `{`/`[`, or a mismatched bracket). Text only grows between
    calls with the same `start`; any other start begins a new scan.
    """

    def __init__(self) -> None:
        self._start = -1
        self._pos = 0
        self._stack: list[str] = []
        self._in_string = self._escape = False

    def end(self, text: str, start: int = 0) -> int | None:
        if start != self._start:
            self._start, self._stack, self._in_string, self._escape = start, [], False, False
            self._pos = start
            while self._pos < len(text) and text[self._pos].isspace():
                self._pos += 1
            if self._pos == len(text):
                self._start = -1  # nothing but spaces yet: start again next time
                return None
            if text[self._pos] not in "{[":
                return -1
        stack = self._stack
        for i in range(self._pos, len(text)):
            ch = text[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                stack.append("}" if ch == "{" else "]")
            elif ch in "}]":
                if not stack or stack.pop() != ch:
                    self._start = -1
                    return -1
                if not stack:
                    self._start = -1
                    return i + 1
        self._pos = len(text)
        return None


def json_end(text: str, start: int = 0) -> int | None:
    """`JsonScan().end(text, start)`, for a whole text."""
    return JsonScan().end(text, start)
