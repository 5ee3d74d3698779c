"""Structured-output fields of every dialect -> one engine `Constraint` (engine/grammar.py).

The dialects name the same few things differently:

- OpenAI / LM Studio: `response_format` `{"type": "json_object"}` or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (`"text"` means none);
- vLLM: `structured_outputs` `{"json" | "regex" | "choice" | "grammar"}` and the older
  `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`;
- llama.cpp: `grammar` (GBNF) and `json_schema`;
- Ollama: `format` `"json"` or a JSON Schema object.

A request may give at most one of them; a malformed field is a 400 naming it. Whether the schema, regex or
grammar itself compiles is checked by the engine at submission (`GrammarError`, also a 400, in the dialect's
shape). `forced_tools` turns `tool_choice` `required` / a named function into the tools a call must use;
generation.py builds the tool-call constraint in the chat template's format.
"""

from __future__ import annotations

import json
from typing import Any

from inferflux.engine.grammar import Constraint, GrammarError
from inferflux.server.errors import APIError, bad_request


def _json_object(value: Any, param: str) -> Any:
    """A schema given as an object, or as JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise bad_request(f"`{param}` is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(f"`{param}` must be a JSON Schema object", param=param)
    return value


def _response_format(rf: Any) -> Constraint | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad_request("`response_format` must be an object with a `type`", param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_schema(None)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("`response_format.json_schema` must be an object with a `schema`",
                              param="response_format.json_schema")
        schema = spec.get("schema", {"type": "object"})  # OpenAI: a name with no schema means any object
        return Constraint.json_schema(_json_object(schema, "response_format.json_schema.schema"))
    raise bad_request(f"`response_format.type` must be text, json_object or json_schema, not {kind!r}",
                      param="response_format.type")


def _one(kind: str, value: Any, param: str) -> Constraint:
    if kind == "json":
        return Constraint.json_schema(_json_object(value, param))
    if kind == "regex":
        if not isinstance(value, str):
            raise bad_request(f"`{param}` must be a string", param=param)
        return Constraint.regex(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise bad_request(f"`{param}` must be a non-empty list of strings", param=param)
        return Constraint.choice(value)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"`{param}` must be a non-empty grammar (GBNF rules, `root ::= ...`)", param=param)
    return Constraint.grammar(value)


def openai_constraint(fields: dict[str, Any]) -> Constraint | None:
    """The constraint of an OpenAI-format body (OpenAI, vLLM, llama.cpp and LM Studio fields), or None."""
    found: list[tuple[str, Constraint | None]] = []
    try:
        if fields.get("response_format") is not None:
            found.append(("response_format", _response_format(fields["response_format"])))
        so = fields.get("structured_outputs")
        if so is not None:
            if not isinstance(so, dict):
                raise bad_request("`structured_outputs` must be an object", param="structured_outputs")
            for kind in ("json", "regex", "choice", "grammar"):
                if so.get(kind) is not None:
                    found.append((f"structured_outputs.{kind}", _one(kind, so[kind], f"structured_outputs.{kind}")))
            if so.get("json_object"):
                found.append(("structured_outputs.json_object", Constraint.json_schema(None)))
        for kind in ("json", "regex", "choice", "grammar"):
            if fields.get(f"guided_{kind}") is not None:
                found.append((f"guided_{kind}", _one(kind, fields[f"guided_{kind}"], f"guided_{kind}")))
        if fields.get("grammar") is not None:  # llama.cpp
            found.append(("grammar", _one("grammar", fields["grammar"], "grammar")))
        if fields.get("json_schema") is not None:  # llama.cpp
            found.append(("json_schema", _one("json", fields["json_schema"], "json_schema")))
    except GrammarError as exc:
        raise bad_request(str(exc)) from None
    given = [(name, c) for name, c in found if c is not None]
    if len(given) > 1:
        names = ", ".join(f"`{name}`" for name, _ in given)
        raise bad_request(f"give one structured-output field, not several ({names})", param=given[1][0])
    return given[0][1] if given else None


def ollama_constraint(fmt: Any) -> Constraint | None:
    """Ollama's `format`: "" / None (free), "json" (any JSON object) or a JSON Schema object."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return Constraint.json_schema(None)
    if isinstance(fmt, dict):
        return Constraint.json_schema(fmt)
    raise APIError(400, f'`format` must be "json" or a JSON Schema object, not {fmt!r}', param="format")


def forced_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> list[dict[str, Any]] | None:
    """The tools a call is forced to (`{"name", "parameters"}` each), or None when the model may answer in text.

    `required`: a call to one of `tools`; `{"type": "function", "function": {"name": N}}`: a call to N.
    `auto`, `none` and no choice force nothing.
    """
    if tool_choice in (None, "auto", "none"):
        return None
    specs = [t.get("function", t) for t in tools or [] if isinstance(t, dict)]
    specs = [{"name": s["name"], "parameters": s.get("parameters") or {"type": "object"}}
             for s in specs if isinstance(s, dict) and isinstance(s.get("name"), str)]
    if tool_choice == "required":
        if not specs:
            raise bad_request("`tool_choice: required` needs `tools`", param="tool_choice")
        return specs
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice.get("function"), dict) \
            else tool_choice.get("name")
        named = [s for s in specs if s["name"] == name]
        if not named:
            raise bad_request(f"`tool_choice` names the function {name!r}, which is not in `tools`",
                              param="tool_choice")
        return named
    raise bad_request('`tool_choice` must be "none", "auto", "required" or {"type": "function", "function": '
                      '{"name": ...}}', param="tool_choice")


def tool_constraint(tools: list[dict[str, Any]], template: str | None, parallel: bool = True) -> Constraint:
    """A call to one of `tools`, written the way the chat template teaches (Hermes/Qwen `<tool_call>` JSON,
    Qwen3-coder's `<function=...>` XML, Mistral's or Llama 3's; Hermes for a template that names none).
    `parallel` (OpenAI's `parallel_tool_calls`, default true): one or more calls, else exactly one."""
    from inferflux.server.tool_calls import detect_format

    name = detect_format(template).name
    fmt = name if name in ("mistral", "llama3_json", "qwen3_coder") else "hermes"
    return Constraint.tool_call(tools, fmt, parallel=parallel)
