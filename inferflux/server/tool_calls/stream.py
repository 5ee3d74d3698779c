"""`ToolCallStream`: tool calls found in output text as it streams, with no markup shown as content.

The stream is a small state machine over the text not yet handed out:

- `start`: only whitespace so far; a `{` or `[` that may begin a bare JSON call waits here;
- `text`: everything before a marker is handed out at once, except a tail that may still become a
  marker (`<tool` may be `<tool_call>`), which waits until the next piece settles it;
- `tag`: inside `<tool_call>` (or Qwen3-coder's `<function=`), kept until the closing tag, then
  parsed as calls, or handed out as the text it was when it is not one;
- `rest`: after a marker that makes the rest of the output calls (`<|python_tag|>`, `[TOOL_CALLS]`)
  or at a bare JSON start: each call is handed out as soon as its JSON closes.

Whatever does not parse goes back as text (its marker included), so a malformed call is shown,
never lost; parsing the whole output at once or in any split gives the same text and calls.
`max_calls` (1 for OpenAI's `parallel_tool_calls: false`): calls past it are dropped, as the
client asked for at most that many; the first ones are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from inferflux.server.tool_calls.calls import (
    JsonScan,
    ParamTypes,
    ToolCall,
    json_calls,
    mistral_named_call,
    tag_calls,
    xml_calls,
)
from inferflux.server.tool_calls.formats import GENERIC, RestKind, Tag, ToolFormat

MISTRAL_MARKER = "[TOOL_CALLS]"


def _bare_start(text: str) -> bool | None:
    """Whether stripped text that begins with `{`/`[` can be a JSON call (`{"` or `[{"`); None: too short to say."""
    rest = text[1:].lstrip()
    if not rest:
        return None
    if text[0] == "[":
        return _bare_start(rest) if rest[0] == "{" else False
    return rest[0] == '"'


def _bare_named(text: str, names: set[str]) -> bool | None:
    """Whether stripped text starts `NAME{` / `NAME[ARGS]{` for one of `names`; None: too short to say."""
    found = re.match(r"[\w.\-]+", text)
    if found is None:
        return False
    ident, rest = found.group(0), text[found.end():]
    if not rest:
        return None if any(name.startswith(ident) for name in names) else False
    if ident not in names:
        return False
    if re.match(r"\s*(\[ARGS\]\s*)?\{", rest):
        return True
    return None if not rest.strip() or "[ARGS]".startswith(rest.lstrip()) else False


class ToolCallStream:
    """Feed output text as it arrives; get back the text to show now and the calls completed so far."""

    def __init__(self, names: Iterable[str] = (), fmt: ToolFormat = GENERIC, types: ParamTypes | None = None,
                 max_calls: int | None = None) -> None:
        self.names = set(names)
        self.max_calls = max_calls
        self.format = fmt
        self.types = types
        self._pending = ""  # text not yet handed out
        self._mode = "start"  # start | text | tag | rest (see the module docstring)
        self._tag: Tag | None = None
        self._kind: RestKind = "json"
        self._prefix = ""  # the marker that opened `rest`, given back if no call follows it
        self._bare = False  # `rest` began at a bare JSON start: names must be the request's tools
        self._made = 0  # calls found in the current `rest` region
        self._scan = JsonScan()  # the call at the front of `rest`, scanned as it grows
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._pending += delta
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: whatever was held back, as calls if it is calls, else as text."""
        text, calls = self._run(final=True)
        pending, self._pending = self._pending, ""
        if self._mode == "tag" and self._tag is not None:  # ended before the closing tag (a stop string, or EOS)
            found = self._parse_tag(pending)
            if found:
                found = self._take(found)
                calls += found
                self.calls += found
            else:
                text += pending if self._tag.keep else self._tag.open + pending
        elif self._mode == "rest":  # only spaces are left here: after calls they go, after a bare marker they stay
            text += "" if self._made else self._prefix + pending
        else:
            text += pending
        self._mode = "text"
        return text, calls

    def _parse_tag(self, body: str) -> list[ToolCall] | None:
        assert self._tag is not None
        return xml_calls(body, self.types) if self._tag.keep else tag_calls(body, self.types)

    def _run(self, final: bool) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._mode == "start":
                stripped = self._pending.lstrip()
                if not stripped:
                    break
                if self.format.bare_json and stripped[0] in "{[":
                    plausible = _bare_start(stripped)
                    if plausible is None and not final:
                        break
                    if plausible:
                        self._enter_rest("json", "", bare=True)
                        continue
                elif any(kind == "mistral" for _, kind in self.format.rest):
                    named = _bare_named(stripped, self.names)
                    if named is None and not final:
                        break
                    if named:  # Mistral's `NAME[ARGS]{...}` whose markers were special tokens, skipped
                        self._enter_rest("mistral", "", bare=True)
                        continue
                self._mode = "text"
            if self._mode == "rest":
                if not self._rest(out, calls, final):
                    break
                continue
            if self._mode == "tag":
                tag = self._tag
                assert tag is not None
                end = self._pending.find(tag.close, len(tag.open) if tag.keep else 0)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(tag.close):]
                found = self._parse_tag(body + tag.close if tag.keep else body)
                if found:
                    calls += found
                else:
                    out.append((body if tag.keep else tag.open + body) + tag.close)
                self._mode = "text"
                continue
            if not self._text(out):
                break
        calls = self._take(calls)
        self.calls += calls
        return "".join(out), calls

    def _take(self, found: list[ToolCall]) -> list[ToolCall]:
        """The calls of `found` still within `max_calls` (counting those handed out before)."""
        if self.max_calls is None:
            return found
        return found[:max(0, self.max_calls - len(self.calls))]

    def _text(self, out: list[str]) -> bool:
        """Hand out text up to the first marker (True: a region began) or up to a possible partial one."""
        pending = self._pending
        hits = [(pending.find(m), m) for m in self.format.markers if m in pending]
        if not hits:
            keep = _partial_marker_len(pending, self.format.markers)
            out.append(pending[:len(pending) - keep])
            self._pending = pending[len(pending) - keep:]
            return False
        at, marker = min(hits)
        out.append(pending[:at])
        tag = next((t for t in self.format.tags if t.open == marker), None)
        if tag is not None:
            self._mode, self._tag = "tag", tag
            self._pending = pending[at:] if tag.keep else pending[at + len(marker):]
        else:
            self._pending = pending[at + len(marker):]
            self._enter_rest(dict(self.format.rest)[marker], marker, bare=False)
        return True

    def _enter_rest(self, kind: RestKind, prefix: str, bare: bool) -> None:
        self._mode, self._kind, self._prefix, self._bare, self._made = "rest", kind, prefix, bare, 0

    def _rest(self, out: list[str], calls: list[ToolCall], final: bool) -> bool:
        """Take the calls at the front of a `rest` region; False when waiting for more text."""
        pending = self._pending
        pos = 0
        while True:
            while pos < len(pending) and (pending[pos].isspace() or pending[pos] in ";,"):
                pos += 1
            if self._kind == "mistral" and pending.startswith(MISTRAL_MARKER, pos):
                pos += len(MISTRAL_MARKER)  # each call of the newer format has its own marker
                continue
            break
        if pos == len(pending):
            return False
        head = pending[pos:]
        if self._kind == "mistral" and MISTRAL_MARKER.startswith(head) and not final:
            return False
        found: list[ToolCall] | None = None
        end: int | None
        if head[0] in "{[":
            end = self._scan.end(pending, pos)
            if end is not None and end >= 0:
                found = json_calls(pending[pos:end])
        elif self._kind == "mistral":
            named = mistral_named_call(head, self._scan)
            end = None if named is None else -1 if named is False else 0
            if isinstance(named, tuple):
                found, end = [named[0]], pos + named[1]
        else:
            end = -1
        if found and self._bare and not all(c.name in self.names for c in found):
            found = None  # a bare start is a call only to one of the request's tools
        if end is None and not final:
            return False  # the call is still being written
        if not found:  # not a call: hand it out as the text it is, and look for markers in what follows
            out.append((self._prefix if not self._made else "") + pending[:pos])
            self._pending, self._mode, self._scan = pending[pos:], "text", JsonScan()
            return True
        assert end is not None
        calls += found
        self._made += len(found)
        self._pending, self._scan = pending[end:], JsonScan()
        return True


def _partial_marker_len(text: str, markers: Iterable[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                best = max(best, n)
                break
    return best


def parse_tool_calls(text: str, names: Iterable[str] = (), fmt: ToolFormat = GENERIC,
                     types: ParamTypes | None = None, max_calls: int | None = None) -> tuple[str, list[ToolCall]]:
    """A complete output as (the text outside calls, the calls; at most `max_calls` of them)."""
    stream = ToolCallStream(names, fmt, types, max_calls)
    shown, calls = stream.feed(text)
    rest, more = stream.finish()
    return shown + rest, calls + more
