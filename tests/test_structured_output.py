"""Structured output through every dialect's fields (server/structured.py) against a real server and the real
`openai` and `ollama` clients: the random-weight tiny model still answers with documents that validate."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "n": {"type": "integer", "minimum": 0, "maximum": 20},
    "score": {"type": "number", "minimum": 0, "maximum": 1}},  # a bounded decimal: 0..1, not integers
    "required": ["name", "tags", "n", "score"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"]}}},
]
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def server(tiny_model):
    """The tiny model with its whole 512-token context: a chat prompt with two tools takes ~400 of it."""
    from tests.fixtures.server import Server

    srv = Server(tiny_model("llama"), "tiny", ["runtime.max_model_len=512"])
    yield srv
    assert srv.stop() == 0, srv.output()


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)
    name: str = Field(max_length=5)


def test_openai_parse_with_pydantic(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    done = parse(model="tiny", messages=MESSAGES, response_format=Pet, max_tokens=120, seed=3)
    pet = done.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.age <= 30


@pytest.mark.slow  # 20 samples of up to 150 tokens: ~60 s on 2 cores
def test_json_schema_n_samples_validate(client):
    choices = [c for seed in (11, 111) for c in client.chat.completions.create(  # 20 samples (max_num_seqs is 16)
        model="tiny", messages=MESSAGES, max_tokens=150, n=10, seed=seed, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    ).choices]
    assert len(choices) == 20
    for choice in choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object(client):
    # Any object: a random model's unbounded strings may run past max_tokens, so look at the samples that ended.
    done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=120, seed=5, n=4,
                                          response_format={"type": "json_object"})
    for c in done.choices:  # unconstrained, the random model's first token is almost never "{"
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)


def test_stream_concatenates_to_valid_document(client):
    """The streamed deltas join into a valid document, and into the very text of the same request unstreamed."""
    body = dict(model="tiny", messages=MESSAGES, max_tokens=150, seed=2,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    stream = client.chat.completions.create(**body, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert client.chat.completions.create(**body).choices[0].message.content == text


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"regex": r"[xy]{3}\d"}}, lambda t: re.fullmatch(r"[xy]{3}\d", t)),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ({"guided_regex": r"id-\d{2,3}"}, lambda t: re.fullmatch(r"id-\d{2,3}", t)),
    ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"structured_outputs": {"grammar": 'root ::= "(" [a-c]+ ")"'}}, lambda t: re.fullmatch(r"\([a-c]+\)", t)),
    ({"grammar": 'root ::= ("ab" | "cd")+ "!"'}, lambda t: re.fullmatch(r"(ab|cd)+!", t)),  # llama.cpp GBNF
    ({"json_schema": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),  # llama.cpp
])
def test_vllm_and_llamacpp_fields_on_completions(client, extra, check):
    done = client.completions.create(model="tiny", prompt="Say:", max_tokens=60, n=3, seed=9, extra_body=extra)
    for choice in done.choices:
        assert check(choice.text), (extra, choice.text)


@pytest.mark.slow  # a ~400-token prompt with two tools: ~50 s on 2 cores
def test_tool_choice_required_returns_a_valid_call(client):
    done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Use a tool"}],
                                          tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                          max_tokens=60, seed=1)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), params)


def test_named_tool_choice_streamed(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Add"}],
                                            tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                                            parallel_tool_calls=False, max_tokens=60, seed=8, stream=True)
    content, args, names, finish = "", "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            names += [call.function.name] if call.function and call.function.name else []
            args += (call.function.arguments or "") if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["add"] and finish == "tool_calls" and "name" not in content
    jsonschema.validate(json.loads(args), TOOLS[1]["function"]["parameters"])


def test_named_tool_choice(client):
    done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Add"}], tools=TOOLS,
                                          tool_choice={"type": "function", "function": {"name": "add"}},
                                          parallel_tool_calls=False, max_tokens=60, seed=4)
    (call,) = done.choices[0].message.tool_calls  # parallel_tool_calls false: exactly one
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])


ADD = TOOLS[1]["function"]


def test_responses_parallel_tool_calls_false_returns_one_call(client):
    done = client.responses.create(model="tiny", input="Add", max_output_tokens=80,
                                   tools=[{"type": "function", "name": "add", "parameters": ADD["parameters"]}],
                                   tool_choice={"type": "function", "name": "add"}, parallel_tool_calls=False)
    (call,) = [item for item in done.output if item.type == "function_call"]
    assert call.name == "add" and done.parallel_tool_calls is False
    jsonschema.validate(json.loads(call.arguments), ADD["parameters"])


def test_anthropic_disable_parallel_tool_use_returns_one_call(server):
    import anthropic

    ac = anthropic.Anthropic(base_url=server.url, api_key="unused")
    done = ac.messages.create(model="tiny", max_tokens=80, messages=[{"role": "user", "content": "Add"}],
                              tools=[{"name": "add", "input_schema": ADD["parameters"]}],
                              tool_choice={"type": "tool", "name": "add", "disable_parallel_tool_use": True})
    (block,) = [b for b in done.content if b.type == "tool_use"]
    assert block.name == "add" and done.stop_reason == "tool_use"
    jsonschema.validate(block.input, ADD["parameters"])


def test_parallel_tool_calls_reach_the_grammar():
    """Each dialect's switch lands on GenerationSpec.parallel_tool_calls (true unless the client says no)."""
    from inferflux.server.anthropic.bodies import MessagesRequest
    from inferflux.server.openai_compat.bodies import ChatCompletionRequest
    from inferflux.server.responses.bodies import ResponsesRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"}
    assert ChatCompletionRequest(**chat).spec().parallel_tool_calls is True
    assert ChatCompletionRequest(**chat, parallel_tool_calls=False).spec().parallel_tool_calls is False
    flat = [{"type": "function", "name": "add", "parameters": ADD["parameters"]}]
    assert ResponsesRequest(model="m", input="x", tools=flat).spec([]).parallel_tool_calls is True
    assert ResponsesRequest(model="m", input="x", tools=flat, parallel_tool_calls=False).spec([]).parallel_tool_calls \
        is False
    msg = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
           "tools": [{"name": "add", "input_schema": ADD["parameters"]}]}
    for disable in (False, True):
        req = MessagesRequest(**msg, tool_choice={"type": "any", "disable_parallel_tool_use": disable})
        assert req.spec().parallel_tool_calls is not disable


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "objectx"),
    ({"guided_regex": "a(b"}, "regex"),
    ({"grammar": 'root ::= "a" undefined_rule'}, "undefined_rule"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "one structured-output field"),
])
def test_invalid_constraint_is_400(client, extra, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, extra_body=extra)
    assert words in str(info.value)


def test_ollama_format(server):
    oc = ollama.Client(host=server.url)
    reply = oc.chat(model="tiny", messages=MESSAGES, format=Pet.model_json_schema(), options={"num_predict": 120,
                                                                                               "seed": 3})
    Pet.model_validate_json(reply.message.content)
    gen = oc.generate(model="tiny", prompt="JSON please", format="json", options={"num_predict": 60, "seed": 1})
    assert gen.response.startswith("{") and (gen.done_reason != "stop" or isinstance(json.loads(gen.response), dict))
    with pytest.raises(ollama.ResponseError) as info:
        oc.chat(model="tiny", messages=MESSAGES, format={"type": "objectx"})
    assert info.value.status_code == 400 and "objectx" in str(info.value)


def test_lmstudio_response_format(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 150, "seed": 6,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}
    reply = httpx.post(server.url + "/api/v0/chat/completions", json=body, timeout=120).json()
    jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), SCHEMA)
