"""Which tool-call syntax a model writes, chosen from its chat template.

A chat template that describes tools also shows the model how to call them, so the template's
text names the format. The markers looked for:

- `<function=` / `<parameter=` inside `<tool_call>`: Qwen3-coder's XML style;
- `<tool_call>`: Hermes, Qwen2/2.5/3 (`{"name", "arguments"}` JSON in the tag);
- `[TOOL_CALLS]`: Mistral, the JSON list or (v11+ tokenizers, `[ARGS]`) `name[ARGS]{...}`;
- `<|python_tag|>`, or Llama 3's header tokens with `"parameters"`: Llama 3.1+ JSON.

A template with none of them (or no template) gets `GENERIC`, which accepts all of the above.
Every format also takes a bare JSON call as the whole output, when the name is one of the
request's tools (Llama 3.2 and small models of every family write calls that way).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

RestKind = Literal["json", "mistral"]


@dataclasses.dataclass(frozen=True)
class Tag:
    """A region `open ... close` holding calls; `keep` when the markers are part of the call's text."""

    open: str
    close: str
    keep: bool = False


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    name: str
    tags: tuple[Tag, ...] = ()
    rest: tuple[tuple[str, RestKind], ...] = ()  # after this marker, the rest of the output is calls
    bare_json: bool = True

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(t.open for t in self.tags) + tuple(m for m, _ in self.rest)


TOOL_CALL = Tag("<tool_call>", "</tool_call>")
HERMES = ToolFormat("hermes", tags=(TOOL_CALL,))
QWEN3_CODER = ToolFormat("qwen3_coder", tags=(TOOL_CALL, Tag("<function=", "</function>", keep=True)))
LLAMA3 = ToolFormat("llama3_json", rest=(("<|python_tag|>", "json"),))
MISTRAL = ToolFormat("mistral", rest=(("[TOOL_CALLS]", "mistral"),))
GENERIC = ToolFormat("generic", tags=QWEN3_CODER.tags, rest=LLAMA3.rest + MISTRAL.rest)
FORMATS = {f.name: f for f in (HERMES, QWEN3_CODER, LLAMA3, MISTRAL, GENERIC)}


def detect_format(template: str | None) -> ToolFormat:
    """The tool-call format a chat template teaches (see the module docstring)."""
    source = template or ""
    if "<tool_call>" in source:
        return QWEN3_CODER if "<function=" in source or "<parameter=" in source else HERMES
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<|python_tag|>" in source or ("<|start_header_id|>" in source and '"parameters"' in source):
        return LLAMA3
    return GENERIC
