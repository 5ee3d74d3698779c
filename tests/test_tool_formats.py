"""Tool-call formats (`inferflux/server/tool_calls/`): each syntax, whole and in any split, no markup leaked."""

from __future__ import annotations

import json
import random

import pytest

from inferflux.server.tool_calls import (
    FORMATS,
    GENERIC,
    ToolCall,
    ToolCallStream,
    detect_format,
    param_types,
    parse_tool_calls,
    tool_names,
)
from inferflux.server.tool_calls.formats import HERMES, LLAMA3, MISTRAL, QWEN3_CODER
from tests.fixtures.tool_stream import stream_in_pieces

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                              "zip": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]
NAMES = tool_names(TOOLS)
TYPES = param_types(TOOLS)
WEATHER = ToolCall("get_weather", {"city": "Paris", "days": 3})
ADD = ToolCall("add", {"a": 1, "b": 2})

QWEN3_XML = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
             "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")

# (format, output, expected text, expected calls)
CASES = [
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
     "", [WEATHER]),
    (HERMES, 'Checking.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call>',
     "Checking.", [ADD, WEATHER]),
    (QWEN3_CODER, QWEN3_XML, "", [WEATHER]),
    (QWEN3_CODER, "Sure.\n" + QWEN3_XML + "\n" + QWEN3_XML.replace("get_weather", "add").replace(
        "city>\nParis", "a>\n1").replace("days>\n3", "b>\n2"), "Sure.\n\n", [WEATHER, ADD]),
    # Qwen3-coder without the <tool_call> wrapper, and cut off before </tool_call>
    (QWEN3_CODER, QWEN3_XML[len("<tool_call>\n"):-len("\n</tool_call>")], "", [WEATHER]),
    (QWEN3_CODER, QWEN3_XML[:-len("\n</tool_call>")], "", [WEATHER]),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', "", [WEATHER]),
    (LLAMA3, '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
     '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', "", [ADD, WEATHER]),
    (LLAMA3, 'I will call it. <|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "I will call it. ",
     [ADD]),
    (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
     '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]', "", [ADD, WEATHER]),
    (MISTRAL, '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}',
     "", [ADD, WEATHER]),
    (MISTRAL, 'Let me see. [TOOL_CALLS]add[CALL_ID]a1b2c3d4e[ARGS]{"a": 1, "b": 2}', "Let me see. ", [ADD]),
    (MISTRAL, '[{"name": "add", "arguments": {"a": 1, "b": 2}}]', "", [ADD]),  # [TOOL_CALLS] stripped as special
    (MISTRAL, 'add{"a": 1, "b": 2}get_weather{"city": "Paris", "days": 3}', "", [ADD, WEATHER]),  # [ARGS] too
    (MISTRAL, "added it up", "added it up", []),  # starts like a tool's name, is not a call
    (MISTRAL, 'unknown{"a": 1}', 'unknown{"a": 1}', []),
    # brackets and escaped quotes inside strings do not close a call
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "P}a]r\\"is{", "days": 3}}', "",
     [ToolCall("get_weather", {"city": 'P}a]r"is{', "days": 3})]),
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "[x]}", "days": [1, {"d": 2}]}', "",
     [ToolCall("get_weather", {"city": "[x]}", "days": [1, {"d": 2}]})]),
    # malformed or not calls: the text as it was, markers included
    (HERMES, "Use <tool_call>not json</tool_call> here", "Use <tool_call>not json</tool_call> here", []),
    (HERMES, '<tool_call>{"name": "add", "arguments": {"a": 1,', '<tool_call>{"name": "add", "arguments": {"a": 1,',
     []),
    (QWEN3_CODER, "<tool_call><function=add><oops></function></tool_call>",
     "<tool_call><function=add><oops></function></tool_call>", []),
    (LLAMA3, '<|python_tag|>print("hi")', '<|python_tag|>print("hi")', []),
    (LLAMA3, '{"name": "Paris", "population": 2100000}', '{"name": "Paris", "population": 2100000}', []),
    (MISTRAL, "[TOOL_CALLS]add[ARGS]{oops}", "[TOOL_CALLS]add[ARGS]{oops}", []),
    (MISTRAL, "[TOOL_CALLS] sorry, no", "[TOOL_CALLS] sorry, no", []),
    (MISTRAL, "[TOOL_CALLS]  ", "[TOOL_CALLS]  ", []),
    (LLAMA3, "ok <|python_tag|>", "ok <|python_tag|>", []),
    (MISTRAL, "[1, 2] is a list", "[1, 2] is a list", []),
    # a format's markers only: other families' markup is plain text to it
    (LLAMA3, "a <tool_call> b", "a <tool_call> b", []),
    (HERMES, "[TOOL_CALLS] x", "[TOOL_CALLS] x", []),
    # plain text
    (GENERIC, "The weather in Paris is mild < 20 C [ok].", "The weather in Paris is mild < 20 C [ok].", []),
]
IDS = [f"{i}-{fmt.name}" for i, (fmt, *_rest) in enumerate(CASES)]


def _streamed(fmt, output: str, sizes) -> tuple[str, list[ToolCall], list[str]]:
    stream = ToolCallStream(NAMES, fmt, TYPES)
    shown, found, pos = [], [], 0
    for size in sizes:
        if pos >= len(output):
            break
        piece, new = stream.feed(output[pos:pos + size])
        pos += size
        shown.append(piece)
        found += new
    rest, new = stream.finish()
    shown.append(rest)
    return "".join(shown), found + new, shown


@pytest.mark.parametrize(("fmt", "output", "text", "calls"), CASES, ids=IDS)
def test_whole_output(fmt, output: str, text: str, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(output, NAMES, fmt, TYPES) == (text, calls)


@pytest.mark.parametrize(("fmt", "output", "text", "calls"), CASES, ids=IDS)
def test_char_by_char_and_random_chunks_equal_the_whole(fmt, output: str, text: str, calls: list[ToolCall]) -> None:
    rng = random.Random(len(output))
    whole = parse_tool_calls(output, NAMES, fmt, TYPES)
    splits = [[1] * len(output)] + [[rng.randint(1, 9) for _ in range(len(output))] for _ in range(20)]
    for sizes in splits:
        joined, found, _ = _streamed(fmt, output, sizes)
        assert (joined, found) == whole


@pytest.mark.parametrize(("fmt", "output", "text", "calls"), [c for c in CASES if c[3]],
                         ids=[i for i, c in zip(IDS, CASES) if c[3]])
def test_no_markup_reaches_the_text(fmt, output: str, text: str, calls: list[ToolCall]) -> None:
    """Not one streamed piece of a parsed call's markup is handed out as text, in any split."""
    for sizes in ([1] * len(output), [3] * len(output)):
        _, _, pieces = _streamed(fmt, output, sizes)
        for marker in ("<tool_call", "</tool_call", "<function", "<parameter", "[TOOL_CALLS", "[ARGS",
                       "<|python_tag", '"name"', "{"):
            assert marker not in "".join(pieces), marker


def test_each_call_is_handed_out_when_it_closes() -> None:
    """Calls stream: the first call comes out before the second is written, in every format."""
    first_done = {  # (the first call, the start of the second)
        HERMES: ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', '<tool_call>{"na'),
        QWEN3_CODER: ("<tool_call><function=add><parameter=a>1</parameter><parameter=b>2</parameter></function>"
                      "</tool_call>", "<tool_call><function=get_"),
        LLAMA3: ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', ' ; {"na'),
        MISTRAL: ('[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}', "[TOOL_CALLS]get_w"),
    }
    for fmt, (text, more) in first_done.items():
        stream = ToolCallStream(NAMES, fmt, TYPES)
        assert stream.feed(text) == ("", [ADD]), fmt.name
        assert stream.feed(more) == ("", []), fmt.name


def test_plain_text_streams_at_once_and_a_partial_marker_waits() -> None:
    stream = ToolCallStream(NAMES, HERMES)
    assert stream.feed("Hello <tool") == ("Hello ", [])
    assert stream.feed("s>") == ("<tools>", [])
    stream = ToolCallStream(NAMES, MISTRAL)
    assert stream.feed("[TOOL_") == ("", [])  # the start of [TOOL_CALLS]
    assert stream.feed("CHEST] open") == ("[TOOL_CHEST] open", [])


def test_qwen3_coder_values_follow_the_declared_types() -> None:
    output = ("<tool_call><function=get_weather><parameter=zip>\n02134\n</parameter><parameter=days>\n4\n"
              "</parameter><parameter=extra>\n{\"a\": [1]}\n</parameter></function></tool_call>")
    _, (call,) = parse_tool_calls(output, NAMES, QWEN3_CODER, TYPES)
    assert call.arguments == {"zip": "02134", "days": 4, "extra": {"a": [1]}}  # a string stays one
    # OpenAI's shape: the arguments as a JSON string
    assert json.loads(call.openai(0)["function"]["arguments"]) == call.arguments


TEMPLATES = {
    "hermes": '{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>\n{"name": <function-name>, '
              '"arguments": <args-json-object>}\n</tool_call>',
    "qwen3_coder": "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
                   "</parameter>\n</function>\n</tool_call>",
    "mistral": "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{{ '[TOOL_CALLS]' }}",
    "llama3_json": '<|start_header_id|>user<|end_header_id|>Respond in the format {"name": function name, '
                   '"parameters": dictionary of argument name and its value}<|eot_id|>',
    "generic": "{% for m in messages %}{{ m.content }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_format_detected_from_the_chat_template(name: str) -> None:
    assert detect_format(TEMPLATES[name]) is FORMATS[name]
    assert detect_format("<|python_tag|>") is LLAMA3 and detect_format(None) is GENERIC


FRAGMENTS = ["<tool_call>", "</tool_call>", "<function=add>", "</function>", "<parameter=a>", "1", "</parameter>",
             "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", '{"name": "add", "arguments": {"a": 1}}', '{"name": "add", ',
             '"parameters": {"b": "}"}}', "add", "get_weather", "{", "}", "[", "]", '"', "\\", " ", "\n", ";", ",",
             "hi", "<", "<tool", "[TOOL", "x{"]


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_random_mixtures_split_the_same_and_lose_no_text(fmt) -> None:
    """Random mixes of markers, JSON pieces and text: any split parses as the whole; without calls the text is kept."""
    rng = random.Random(fmt.name)
    for _ in range(400):
        output = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 10)))
        whole = parse_tool_calls(output, NAMES, fmt, TYPES)
        joined, found, _ = _streamed(fmt, output, [rng.randint(1, 6) for _ in range(len(output))])
        assert (joined, found) == whole, output
        if not whole[1]:
            assert whole[0] == output


MULTI = [(fmt, output, text, calls) for fmt, output, text, calls in CASES if len(calls) > 1]


@pytest.mark.parametrize(("fmt", "output", "text", "calls"), MULTI,
                         ids=[f"{i}-{c[0].name}" for i, c in enumerate(MULTI)])
def test_max_calls_keeps_the_first_call_whole_and_streamed(fmt, output: str, text: str,
                                                           calls: list[ToolCall]) -> None:
    """`parallel_tool_calls: false` (max_calls=1): only the first call comes back, the others' markup not as text."""
    assert parse_tool_calls(output, NAMES, fmt, TYPES, max_calls=1) == (text, calls[:1])
    for size in (1, 4):
        assert stream_in_pieces(ToolCallStream(NAMES, fmt, TYPES, max_calls=1), output, size) == (text, calls[:1])


@pytest.mark.parametrize(("name", "grammar"), [("hermes", "hermes"), ("qwen3_coder", "qwen3_coder"),
                                                ("mistral", "mistral"), ("llama3_json", "llama3_json"),
                                                ("generic", "hermes")])
def test_forced_call_grammar_follows_the_template(name: str, grammar: str) -> None:
    """A forced call is constrained in the syntax the template teaches (the parser's format, engine grammar)."""
    from inferflux.server.structured import tool_constraint

    tools = [{"name": "add", "parameters": TOOLS[1]["function"]["parameters"]}]
    for parallel in (True, False):
        spec = json.loads(tool_constraint(tools, TEMPLATES[name], parallel=parallel).value)
        assert (spec["format"], spec["parallel"]) == (grammar, parallel)
    # parameters keep the schema's order (Qwen3-coder writes them in it), not sorted
    backwards = [{"name": "f", "parameters": {"type": "object", "properties": {"z": {}, "a": {}}}}]
    assert list(json.loads(tool_constraint(backwards, TEMPLATES[name]).value)["tools"][0]["parameters"][
        "properties"]) == ["z", "a"]
