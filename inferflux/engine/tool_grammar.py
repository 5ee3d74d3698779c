"""The grammar of a forced tool call, in the syntax the chat template teaches (one or, when parallel, several).

A forced call (`tool_choice` required / named) must come out in the syntax the model was trained on and
that server/tool_calls/ reads back, so the grammar follows each format exactly:

- hermes (Hermes, Qwen2/2.5/3): `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>`, several
  separated by a newline;
- llama3_json: a bare `{"name": N, "parameters": {...}}`, several separated by `; `;
- mistral: `[TOOL_CALLS][{"name": N, "arguments": {...}}, ...]`;
- qwen3_coder: `<tool_call>\\n<function=N>\\n<parameter=P>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>`,
  one `<parameter=P>` per property of the function's schema (in schema order, optional ones may be left out);
  a string property's value is raw text (xgrammar's `qwen_xml` style, which keeps the schema's string rules),
  any other value compact JSON valid against its property schema, as vLLM's Qwen3-coder parser reads them.

The JSON of the JSON formats is compact (`", "`, `": "`, no free whitespace), so a model cannot stall on
whitespace. Calls are combined with xgrammar's structural tags (`Sequence`, `Star`, `Or`), which is how
"one or more calls" is said: `parallel` gives `call (sep call)*`, otherwise exactly one call.
"""

from __future__ import annotations

import json
from typing import Any

# What ends a Qwen3-coder string value and what the parser splits calls on: never inside a value.
_XML_CLOSERS = ["</parameter>", "</function>"]
SEPARATORS = {"hermes": "\n", "qwen3_coder": "\n", "llama3_json": "; ", "mistral": ", "}  # between calls
TOOL_FORMATS = tuple(SEPARATORS)  # the chat-template syntaxes a forced call can be written in


def _json_call(xgr: Any, tools: list[dict[str, Any]], args_key: str) -> Any:
    """One `{"name": N, args_key: {...}}` object to any of `tools`, as a structural-tag grammar element."""
    from xgrammar.structural_tag import GrammarFormat

    one_of = [{"type": "object", "properties": {"name": {"const": t["name"]}, args_key: t["parameters"]},
               "required": ["name", args_key], "additionalProperties": False} for t in tools]
    schema = one_of[0] if len(one_of) == 1 else {"anyOf": one_of}
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    return GrammarFormat(grammar=str(grammar))


def _xml_value(xgr: Any, prop: Any) -> Any:
    """A Qwen3-coder parameter value: raw text for a string property, compact JSON otherwise."""
    from xgrammar.structural_tag import GrammarFormat, JSONSchemaFormat

    if isinstance(prop, dict) and prop.get("type") == "string":  # the parser's rule too (tool_calls.param_types)
        bounded = any(k in prop for k in ("minLength", "maxLength", "pattern", "format", "enum", "const"))
        # xgrammar drops length bounds when given excludes; a bounded string keeps its bounds instead
        return JSONSchemaFormat(json_schema=prop, style="qwen_xml", excludes=[] if bounded else _XML_CLOSERS)
    schema = prop if isinstance(prop, (dict, bool)) else {}
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    return GrammarFormat(grammar=str(grammar))


def _xml_call(xgr: Any, tool: dict[str, Any]) -> Any:
    """`<tool_call>\\n<function=N>\\n` then each `<parameter=P>\\nVALUE\\n</parameter>\\n`, then the closers."""
    from xgrammar.structural_tag import ConstStringFormat, OptionalFormat, SequenceFormat, TagFormat

    params = tool["parameters"] if isinstance(tool["parameters"], dict) else {}
    props = params.get("properties")
    props = props if isinstance(props, dict) else {}
    required = set(params.get("required") or [])
    elements: list[Any] = [ConstStringFormat(value=f"<tool_call>\n<function={tool['name']}>\n")]
    for name, prop in props.items():
        part = TagFormat(begin=f"<parameter={name}>\n", content=_xml_value(xgr, prop), end="\n</parameter>\n")
        elements.append(part if name in required else OptionalFormat(content=part))
    elements.append(ConstStringFormat(value="</function>\n</tool_call>"))
    return SequenceFormat(elements=elements)


def tool_call_grammar(xgr: Any, value: str) -> Any:
    """The xgrammar `Grammar` of a `Constraint.tool_call` value (`{"format", "tools", "parallel"}`)."""
    from xgrammar.structural_tag import (
        ConstStringFormat,
        OrFormat,
        SequenceFormat,
        StarFormat,
        StructuralTag,
    )

    spec = json.loads(value)
    fmt, tools = spec["format"], spec["tools"]
    if fmt == "qwen3_coder":
        calls = [_xml_call(xgr, t) for t in tools]
        call = calls[0] if len(calls) == 1 else OrFormat(elements=calls)
    elif fmt == "hermes":
        call = SequenceFormat(elements=[ConstStringFormat(value="<tool_call>\n"), _json_call(xgr, tools, "arguments"),
                                        ConstStringFormat(value="\n</tool_call>")])
    else:
        call = _json_call(xgr, tools, "parameters" if fmt == "llama3_json" else "arguments")
    body = call
    if spec.get("parallel"):
        body = SequenceFormat(elements=[call, StarFormat(content=SequenceFormat(
            elements=[ConstStringFormat(value=SEPARATORS[fmt]), call]))])
    if fmt == "mistral":
        body = SequenceFormat(elements=[ConstStringFormat(value="[TOOL_CALLS]["), body, ConstStringFormat(value="]")])
    return xgr.Grammar.from_structural_tag(StructuralTag(format=body))
