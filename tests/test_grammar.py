"""Constrained decoding in the engine (engine/grammar.py): a random-weight model's sampled output matches
the schema, regex or choice it was given; constrained and free rows share a batch without changing the free
rows' greedy output; bad constraints are refused at submission."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from inferflux import LLM, Constraint, SamplingParams
from inferflux.engine.grammar import GrammarError
from inferflux.engine.sampler import sample
from inferflux.engine.sampling_rows import RowParams, SamplingTensors

RUNTIME = dict(page_size=16, max_num_seqs=32, max_num_batched_tokens=128, max_model_len=512, num_pages=400)

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                                  "ok": {"type": "boolean"}}, "required": ["id", "ok"]}},
        "required": ["user"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
               "minItems": 2, "maxItems": 4}}, "required": ["xs"]},
    "enum_number_optional": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "level": {"type": "integer", "minimum": -5, "maximum": 5},
        "note": {"type": "string", "maxLength": 6}},
        "required": ["color", "level"]},
    "ref": {"type": "object", "$defs": {"pt": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 50}, "y": {"type": "integer", "minimum": 0, "maximum": 50}},
        "required": ["x", "y"], "additionalProperties": False}},
        "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"],
        "additionalProperties": False},
    "bounded_decimals": {"type": "object", "properties": {  # non-integer bounds: 0..1 and -2.5..0.75
        "p": {"type": "number", "minimum": 0, "maximum": 1},
        "t": {"type": "number", "minimum": -2.5, "maximum": 0.75}}, "required": ["p", "t"],
        "additionalProperties": False},
}


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama"), **RUNTIME)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_json_validates(llm, name):
    schema = SCHEMAS[name]
    params = SamplingParams(n=20, temperature=1.0, seed=7, max_tokens=200, constraint=Constraint.json_schema(schema))
    out = llm.generate("Give me JSON:", params)[0]
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_regex_and_choice(llm):
    regex = r"[a-c]{2,5}-\d\d"
    outs = llm.generate(["a", "b"], [SamplingParams(n=8, seed=1, max_tokens=30, constraint=Constraint.regex(regex)),
                                     SamplingParams(n=8, seed=2, max_tokens=30,
                                                    constraint=Constraint.choice(["yes", "no", "maybe so"]))])
    assert all(re.fullmatch(regex, c.text) and c.finish_reason == "stop" for c in outs[0].outputs)
    assert {c.text for c in outs[1].outputs} <= {"yes", "no", "maybe so"}


def test_gbnf_grammar(llm):
    gbnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]?'
    out = llm.generate("g", SamplingParams(n=6, seed=3, max_tokens=60, constraint=Constraint.grammar(gbnf)))[0]
    assert all(re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)*\)", c.text) for c in out.outputs)


def test_mixed_batch_leaves_free_rows_unchanged(llm):
    prompts = ["The quick brown fox", "Once upon a time", "Numbers: 1 2 3"]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    solo = [llm.generate(p, greedy)[0].outputs[0].token_ids for p in prompts]
    constrained = SamplingParams(temperature=0, max_tokens=60, constraint=Constraint.json_schema(SCHEMAS["nested"]))
    mixed = llm.generate(prompts + ["JSON:"], [greedy] * 3 + [constrained])
    assert [o.outputs[0].token_ids for o in mixed[:3]] == solo
    jsonschema.validate(json.loads(mixed[3].outputs[0].text), SCHEMAS["nested"])


TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["city"]}},
         {"name": "add", "parameters": {"type": "object", "properties": {
             "a": {"type": "number", "minimum": 0, "maximum": 1},
             "b": {"type": "integer", "minimum": -50, "maximum": 50}}, "required": ["a", "b"]}}]
PARAMS = {t["name"]: t["parameters"] for t in TOOLS}
WEATHER, ADD = ("get_weather", {"city": "Paris"}), ("add", {"a": 0.25, "b": 2})
_XML = {"hermes": None, "llama3_json": None, "mistral": None,
        "qwen3_coder": lambda name, args: f"<tool_call>\n<function={name}>\n" + "".join(
            f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items()) + "</function>\n</tool_call>"}


def _written(fmt: str, calls: list[tuple[str, dict]]) -> str:
    """`calls` as the format's parser reads them (and as the chat templates teach the model to write them)."""
    if fmt == "qwen3_coder":
        return "\n".join(_XML["qwen3_coder"](name, args) for name, args in calls)
    key = "parameters" if fmt == "llama3_json" else "arguments"
    objs = [json.dumps({"name": name, key: args}) for name, args in calls]
    if fmt == "hermes":
        return "\n".join(f"<tool_call>\n{o}\n</tool_call>" for o in objs)
    return "; ".join(objs) if fmt == "llama3_json" else "[TOOL_CALLS][" + ", ".join(objs) + "]"


def _accepts(llm, constraint: Constraint, text: str) -> bool:
    m = llm.engine.grammars.matcher(constraint, llm.engine.tokenizer.eos_ids).raw
    return bool(m.accept_string(text)) and m.is_completed()


FORMAT_NAMES = ["hermes", "llama3_json", "mistral", "qwen3_coder"]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_tool_call_grammar_matches_the_formats_parser(llm, fmt):
    """What the format's parser reads back into valid arguments is accepted; wrong calls are not; two calls only
    with `parallel` (OpenAI's `parallel_tool_calls`)."""
    from inferflux.server.tool_calls import FORMATS, param_types, parse_tool_calls

    one, many = Constraint.tool_call(TOOLS, fmt), Constraint.tool_call(TOOLS, fmt, parallel=True)
    wrapped = [{"function": t} for t in TOOLS]
    for calls in ([WEATHER], [ADD], [ADD, WEATHER], [WEATHER, WEATHER, ADD]):
        text = _written(fmt, calls)
        assert _accepts(llm, many, text), text
        assert _accepts(llm, one, text) == (len(calls) == 1), text
        shown, parsed = parse_tool_calls(text, {"get_weather", "add"}, FORMATS[fmt], param_types(wrapped))
        assert not shown.strip() and [(c.name, c.arguments) for c in parsed] == calls  # a newline between tags
        for c in parsed:
            jsonschema.validate(c.arguments, PARAMS[c.name])
    wrong = [[("get_weather", {"city": "Copenhagen"})],  # maxLength 8
             [("add", {"a": 1.5, "b": 2})],  # maximum 1
             [("add", {"a": 0.5})],  # b is required
             [("nope", {"city": "Paris"})]]  # not a tool
    for calls in wrong:
        assert not _accepts(llm, many, _written(fmt, calls)), calls
    other = "llama3_json" if fmt != "llama3_json" else "hermes"
    assert not _accepts(llm, many, _written(other, [WEATHER]))  # another family's syntax


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_sampled_tool_calls_parse_and_validate(llm, fmt):
    """A random model forced by each format's grammar writes calls its parser reads, arguments valid."""
    from inferflux.server.tool_calls import FORMATS, param_types, parse_tool_calls

    constraint = Constraint.tool_call(TOOLS, fmt)
    out = llm.generate("t", SamplingParams(n=6, seed=4, max_tokens=160, constraint=constraint))[0]
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        shown, calls = parse_tool_calls(c.text, {"get_weather", "add"}, FORMATS[fmt],
                                        param_types([{"function": t} for t in TOOLS]))
        assert shown == "" and len(calls) == 1, c.text
        jsonschema.validate(calls[0].arguments, PARAMS[calls[0].name])


@pytest.mark.parametrize("constraint, words", [
    (lambda: Constraint.json_schema({"type": "objectx"}), "objectx"),
    (lambda: Constraint.json_schema({"properties": {"a": {"$ref": "#/nope"}}}), "nope"),
    (lambda: Constraint.regex("a(b"), "regex"),
    (lambda: Constraint.grammar('root ::= "a" b'), "b"),
])
def test_invalid_constraints_are_refused(llm, constraint, words):
    with pytest.raises(GrammarError, match=words):
        llm.generate("x", SamplingParams(max_tokens=4, constraint=constraint()))


def test_mask_stage_bans_cleared_bits():
    v = 70
    logits = np.zeros((2, v), np.float32)
    logits[:, 5] = 10.0  # the unconstrained favourite
    allowed = np.full((2, 3), -1, np.int32)
    allowed[0] = 0
    allowed[0, 66 // 32] = 1 << (66 % 32)  # only token 66 allowed in row 0
    st = SamplingTensors.from_params([RowParams(temperature=0), RowParams(temperature=0)], 2, allowed=allowed)
    hist = np.full((2, 1), -1, np.int32)
    out = sample(logits, st, hist, np.zeros((2, 1), bool), num_logprobs=0)
    assert list(np.asarray(out.token_ids)) == [66, 5]
