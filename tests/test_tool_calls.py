"""Tool calls in model output (`inferflux/server/tool_calls.py`), whole and streamed in any split."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from inferflux.server.tool_calls import ToolCall, ToolCallStream, parse_tool_calls, tool_names
from tests.fixtures.replay_engine import replay_app
from tests.fixtures.tool_stream import stream_in_pieces

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "add"}}]
NAMES = tool_names(TOOLS)
WEATHER = ToolCall("get_weather", {"city": "Paris", "unit": "c"})
ADD = ToolCall("add", {"a": 1, "b": 2})

CASES = [
    # Hermes / Qwen2: tags, with text around them
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>', "", [WEATHER]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
     '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
     "Let me check.\n\n", [WEATHER, ADD]),
    # arguments given as a JSON string (OpenAI-style) are decoded
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>', "", [ADD]),
    # a tag closed by the end of the output (stop string or EOS before </tool_call>)
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', "", [ADD]),
    # Llama 3.x: bare JSON with "parameters"; several separated by ";"
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', "", [WEATHER]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
     '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', "", [ADD, WEATHER]),
    # Mistral: a list after [TOOL_CALLS]
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]', "", [ADD]),
    ('  [{"name": "add", "arguments": {"a": 1, "b": 2}}]', "", [ADD]),
    # not calls: plain text, JSON that is not a call to a known tool, a broken tag
    ("The weather in Paris is mild.", "The weather in Paris is mild.", []),
    ('{"name": "Paris", "population": 2100000}', '{"name": "Paris", "population": 2100000}', []),
    ('{"name": "unknown_tool", "arguments": {}}', '{"name": "unknown_tool", "arguments": {}}', []),
    ("Use <tool_call>not json</tool_call> here", "Use <tool_call>not json</tool_call> here", []),
    ("a < b and [x] is a list", "a < b and [x] is a list", []),
    ("<tool_call>{oops", "<tool_call>{oops", []),
]


@pytest.mark.parametrize(("output", "text", "calls"), CASES)
def test_whole_output(output: str, text: str, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(output, NAMES) == (text, calls)


@pytest.mark.parametrize(("output", "text", "calls"), CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_in_pieces_gives_the_same(output: str, text: str, calls: list[ToolCall], size: int) -> None:
    assert stream_in_pieces(ToolCallStream(NAMES), output, size) == (text, calls)


def test_plain_text_is_not_held_back() -> None:
    """Only what may still become a call waits; ordinary text streams at once."""
    stream = ToolCallStream(NAMES)
    assert stream.feed("Hello") == ("Hello", [])
    assert stream.feed(" world <tool") == (" world ", [])  # "<tool" may start <tool_call>
    assert stream.feed("s are nice") == ("<tools are nice", [])
    assert stream.feed(' <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}') == (" ", [])
    assert stream.feed("</tool_call> done") == (" done", [ADD])
    assert stream.finish() == ("", [])


def test_shapes_for_clients() -> None:
    openai_call = WEATHER.openai(0)
    assert openai_call["type"] == "function" and openai_call["id"].startswith("call_")
    assert json.loads(openai_call["function"]["arguments"]) == WEATHER.arguments
    assert WEATHER.ollama() == {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}
    assert tool_names([{"function": {"name": "x"}}, {"name": "y"}, "junk", None]) == {"x", "y"}


# --- the wiring: OpenAI's and Ollama's chat routes on an engine that answers with a script ---


def _app(tmp_path, pieces: list[str], seen: list):
    """The real app over an engine that writes `pieces`; its chat template records the tools it is given."""
    def render(messages, add_generation_prompt=True, tools=None, **kwargs):
        seen.append(tools)
        return "prompt"

    return replay_app(tmp_path, pieces, SimpleNamespace(render=render, source="{{ tools }}"), prompt_tokens=3)


CALL_PIECES = ["Sure. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>']


def test_openai_chat_returns_tool_calls(tmp_path) -> None:
    seen: list = []
    app = _app(tmp_path, CALL_PIECES, seen)
    body = {"model": "fake", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS}

    async def main():
        client = app.test_client()
        whole = await (await client.post("/v1/chat/completions", json=body)).get_json()
        streamed = await (await client.post("/v1/chat/completions", json={**body, "stream": True})).get_data()
        plain = await (await client.post("/v1/chat/completions", json={**body, "tools": None})).get_json()
        off = await (await client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})).get_json()
        return whole, streamed.decode(), plain, off

    whole, streamed, plain, off = asyncio.run(main())
    assert seen[0] == TOOLS  # the tools reached the chat template
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure. "
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure. "
    (streamed_call,) = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert streamed_call["index"] == 0 and streamed_call["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    for untouched in (plain, off):  # without tools (or with tool_choice "none") the text is the answer
        assert untouched["choices"][0]["message"]["content"] == "".join(CALL_PIECES)
        assert untouched["choices"][0]["finish_reason"] == "stop"


def test_ollama_chat_returns_tool_calls(tmp_path) -> None:
    seen: list = []
    app = _app(tmp_path, CALL_PIECES, seen)
    body = {"model": "fake", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS}

    async def main():
        client = app.test_client()
        whole = await (await client.post("/api/chat", json={**body, "stream": False})).get_json()
        streamed = await (await client.post("/api/chat", json=body)).get_data()
        return whole, [json.loads(line) for line in streamed.decode().splitlines()]

    whole, lines = asyncio.run(main())
    assert seen[0] == TOOLS
    assert whole["message"]["content"] == "Sure. " and whole["done"] is True
    assert whole["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert "".join(line["message"]["content"] for line in lines) == "Sure. "
    assert [line["message"].get("tool_calls") for line in lines if line["message"].get("tool_calls")] == [
        whole["message"]["tool_calls"]]
    assert lines[-1]["done"] is True and whole["eval_count"] == len(CALL_PIECES)


# --- a forced call on a Qwen3-coder template: the real engine, its XML grammar, the real openai client ---

QWEN3_CODER_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}\n"
    "Call one as <tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n</function>\n</tool_call>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CODER_TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 10},
                                     "limit": {"type": "integer", "minimum": 1, "maximum": 5},
                                     "weight": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["query", "limit"]}}}]


@pytest.fixture(scope="module")
def coder_client(tiny_model, tmp_path_factory):
    import shutil

    import openai

    from tests.fixtures.server import Server

    model = tmp_path_factory.mktemp("qwen3-coder") / "m"
    shutil.copytree(tiny_model("qwen2"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN3_CODER_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    srv = Server(model, "coder", ["runtime.max_model_len=512"])
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    assert srv.stop() == 0, srv.output()


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_on_a_qwen3_coder_template(coder_client, stream: bool) -> None:
    """The XML-style grammar's output reads back (whole and streamed) as one call whose arguments validate."""
    import jsonschema

    body = dict(model="coder", messages=[{"role": "user", "content": "Find it"}], tools=CODER_TOOLS,
                tool_choice={"type": "function", "function": {"name": "lookup"}}, parallel_tool_calls=False,
                max_tokens=300, seed=5)
    if stream:
        names, args, content = [], "", ""
        for chunk in coder_client.chat.completions.create(**body, stream=True):
            for delta in [c.delta for c in chunk.choices]:
                content += delta.content or ""
                for call in delta.tool_calls or []:
                    names += [call.function.name] if call.function.name else []
                    args += call.function.arguments or ""
        assert names == ["lookup"] and "<" not in content, content
    else:
        choice = coder_client.chat.completions.create(**body).choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls
        args = call.function.arguments
    jsonschema.validate(json.loads(args), CODER_TOOLS[0]["function"]["parameters"])
