"""Anthropic's Messages API (`server/anthropic/`) with the real `anthropic` client against a live server.

One server for the module (the tiny Qwen2 model: its ChatML template renders tool calls), with
`security.auth=required`, so every request also checks that keys work as Anthropic's clients send
them. A random-weight model cannot be made to call a tool, so the tool round trip is tested in two
halves: the conversation's translation into the prompt (the real template, on the real server's
token counts), and the parsing of a `<tool_call>` output through the whole route, on an app whose
engine replays a fixed output, driven by the same client.
"""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import httpx2
import openai
import pytest

from inferflux.formats.chat_template import ChatTemplate
from inferflux.server.anthropic.bodies import CountTokensRequest
from tests.fixtures.models import CHATML_TEMPLATE
from tests.fixtures.replay_engine import replay_app
from tests.fixtures.server import Server, private_home

SYSTEM = "You answer briefly."
USER = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = {"temperature": 0}  # current clients send sampling knobs as extra fields
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                      {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                       "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                  "content": [{"type": "text", "text": "18C and sunny"}]},
                                 {"type": "text", "text": "Thanks, and tomorrow?"}]},
]


@pytest.fixture(scope="module")
def server(tiny_model):
    """One server with security.auth=required (each start costs seconds): `inference` and `reader` keys, a
    revoked and an expired one, and `limited`, the key of a tenant allowed one request per minute."""
    from inferflux.server.access.keys import KeyStore
    from inferflux.server.access.limits import SqliteLimiter

    home = private_home()
    store = KeyStore.at_home(home)
    store.create_tenant("acme")
    inference, _ = store.create_key("acme", "inference")
    reader, _ = store.create_key("acme", "models:read")
    revoked, record = store.create_key("acme", "inference")
    store.revoke(record.id)
    expired, _ = store.create_key("acme", "inference", expires_at=time.time() - 1)
    store.create_tenant("slow")
    limited, _ = store.create_key("slow", "inference")
    store.close()
    limiter = SqliteLimiter.at_home(home)  # the server's state.db, as `inferctl admin limits set` writes it
    limiter.set("slow", {"rpm": 1})
    limiter.close()
    srv = Server(tiny_model("qwen2"), "tiny", extra=["security.auth=required"], home=home)
    srv.inference, srv.reader = inference, reader  # type: ignore[attr-defined]
    srv.revoked, srv.expired, srv.limited = revoked, expired, limited  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.output()


def _client(srv: Server, key: str | None = None) -> anthropic.Anthropic:
    """The anthropic client sends its key as `x-api-key`."""
    return anthropic.Anthropic(base_url=srv.url, api_key=key or srv.inference, max_retries=0, timeout=120)


def _openai_chat(srv: Server, messages: list[dict], max_tokens: int) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.inference, max_retries=0)
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, extra_body=GREEDY)


def test_create_equals_openai_chat_greedy(server) -> None:
    reply = _client(server).messages.create(model="tiny", system=SYSTEM, messages=USER, max_tokens=12,
                                            extra_body=GREEDY, metadata={"user_id": "u1"})
    chat = _openai_chat(server, [{"role": "system", "content": SYSTEM}, *USER], 12)
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.model == "tiny" and [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == chat.choices[0].message.content and reply.content[0].text
    assert reply.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert reply.stop_sequence is None
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens


def test_stream_events_and_text_equal_the_non_streamed(server) -> None:
    client = _client(server)
    whole = client.messages.create(model="tiny", messages=USER, max_tokens=10, extra_body=GREEDY)
    with client.messages.stream(model="tiny", messages=USER, max_tokens=10, extra_body=GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    # the client adds its own `text` events after each text delta (and drops pings); the rest came on the wire
    kinds = [e.type for e in events if e.type != "text"]
    assert kinds[:2] == ["message_start", "content_block_start"], kinds
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"], kinds
    assert set(kinds[2:-3]) == {"content_block_delta"}
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    # the bytes on the wire: `event:` lines naming each `data:` line's type
    raw = httpx.post(server.url + "/v1/messages", timeout=120,
                     headers={"anthropic-version": "2023-06-01", "x-api-key": server.inference},
                     json={"model": "tiny", "messages": USER, "max_tokens": 4, "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    frames = [f.split("\n") for f in raw.text.strip().split("\n\n")]
    names = [f[0].removeprefix("event: ") for f in frames]
    assert all(name == json.loads(f[1].removeprefix("data: "))["type"] for name, f in zip(names, frames)), raw.text
    assert names[:4] == ["message_start", "content_block_start", "ping", "content_block_delta"], names
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"], names
    assert "[DONE]" not in raw.text


def test_stop_sequence_and_max_tokens(server) -> None:
    client = _client(server)
    full = client.messages.create(model="tiny", messages=USER, max_tokens=24, extra_body=GREEDY).content[0].text
    start = next(i for i in range(4, len(full) - 2)  # two visible characters seen first there
                 if full[i:i + 2].strip() == full[i:i + 2] and full.index(full[i:i + 2]) == i)
    sequence = full[start:start + 2]
    cut = client.messages.create(model="tiny", messages=USER, max_tokens=24, extra_body=GREEDY,
                                 stop_sequences=["never-appears", sequence])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == sequence
    assert cut.content[0].text == full[:start]
    short = client.messages.create(model="tiny", messages=USER, max_tokens=3, extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3
    assert short.content[0].text and full.startswith(short.content[0].text)


def test_count_tokens_matches_the_generated_prompt(server) -> None:
    client = _client(server)
    counted = client.messages.count_tokens(model="tiny", system=SYSTEM, messages=USER)
    tokenized = httpx.post(server.url + "/tokenize", timeout=60, headers={"x-api-key": server.inference}, json={
        "model": "tiny", "messages": [{"role": "system", "content": SYSTEM}, *USER]}).json()
    assert counted.input_tokens == tokenized["count"] > 5
    used = client.messages.create(model="tiny", system=SYSTEM, messages=USER, max_tokens=2, extra_body=GREEDY).usage
    assert used.input_tokens + used.cache_read_input_tokens == counted.input_tokens


def test_tool_conversation_becomes_the_templates_messages(server) -> None:
    """tool_use -> the assistant's tool_calls; tool_result -> a tool message, before the user's next words."""
    prompt = CountTokensRequest.model_validate({"model": "tiny", "messages": TOOL_TURNS, "tools": TOOLS}).prompt()
    assert prompt.messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C and sunny", "name": "get_weather"},
        {"role": "user", "content": "Thanks, and tomorrow?"},
    ]
    assert prompt.tools == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": TOOLS[0]["input_schema"]}}]
    text = ChatTemplate(CHATML_TEMPLATE).render(prompt.messages, add_generation_prompt=True, tools=prompt.tools)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert text.index("Let me look.") < text.index("18C and sunny") < text.index("Thanks, and tomorrow?")
    # the server renders it the same way: its count is the count of this text's tokens
    counted = _client(server).messages.count_tokens(model="tiny", messages=TOOL_TURNS, tools=TOOLS)
    tokenized = httpx.post(server.url + "/tokenize", timeout=60, headers={"x-api-key": server.inference}, json={
        "model": "tiny", "prompt": text, "add_special_tokens": False}).json()
    assert counted.input_tokens == tokenized["count"]
    # the same conversation generates on the real server (tools given, tool_choice honoured as auto)
    reply = _client(server).messages.create(model="tiny", messages=TOOL_TURNS, tools=TOOLS, max_tokens=4,
                                            extra_body=GREEDY, tool_choice={"type": "auto"})
    assert reply.stop_reason in ("max_tokens", "end_turn", "tool_use")


CITY_TOOL = [{"name": "get_weather", "description": "The weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                               "required": ["city"], "additionalProperties": False}}]


def test_forced_tool_call_round_trip(server) -> None:
    """tool_choice `tool` / `any` constrain the random model to a call: a real tool_use, answered and continued."""
    client = _client(server)
    ask = {"model": "tiny", "max_tokens": 100, "tools": CITY_TOOL, "extra_body": GREEDY,
           "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    first = client.messages.create(**ask, tool_choice={"type": "tool", "name": "get_weather"})
    assert first.stop_reason == "tool_use", first
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input["city"] in ("Paris", "Rome") and call.id.startswith("toolu_")
    with client.messages.stream(**ask, tool_choice={"type": "any"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.input for b in final.content if b.type == "tool_use"] == [call.input]
    turn = [*ask["messages"], {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]}]
    second = client.messages.create(**{**ask, "messages": turn, "max_tokens": 4})
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use") and second.usage.output_tokens >= 1
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens > first.usage.input_tokens


def test_output_format_json_schema(server) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = _client(server).messages.create(model="tiny", max_tokens=40, messages=USER, extra_body=GREEDY,
                                            output_config={"format": {"type": "json_schema", "schema": schema}})
    assert isinstance(json.loads(reply.content[0].text)["ok"], bool)


def test_errors_in_anthropics_shape(server) -> None:
    client = _client(server)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="tiny", messages=USER, max_tokens=0)
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", messages=USER, max_tokens=4)
    assert missing.value.body["error"]["type"] == "not_found_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="image blocks are not supported"):
        client.messages.create(model="tiny", max_tokens=4,
                               messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}])
    with pytest.raises(anthropic.BadRequestError, match="thinking.budget_tokens"):
        client.messages.create(model="tiny", messages=USER, max_tokens=4, thinking={"type": "enabled"})  # type: ignore
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        client.messages.create(model="tiny", messages=USER, max_tokens=4, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "nope"})
    for method, body in (("GET", None), ("POST", "not json")):
        response = httpx.request(method, server.url + "/v1/messages", content=body, timeout=60,
                                 headers={"x-api-key": server.inference})
        assert response.status_code in (400, 405) and response.json()["type"] == "error", response.text
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200


def test_openapi_documents_the_routes(server) -> None:
    """What the schemathesis fuzz (tests/test_openapi_fuzz.py) reads: both routes, their bodies, the scope."""
    doc = httpx.get(server.url + "/openapi.json", timeout=60).json()
    for path, model in (("/v1/messages", "MessagesRequest"), ("/v1/messages/count_tokens", "CountTokensRequest")):
        post = doc["paths"][path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + model)
        assert "`inference` scope" in post["description"]
    assert "max_tokens" in doc["components"]["schemas"]["MessagesRequest"]["required"]


# --- access (the server runs with security.auth=required) ---


def test_keys_on_the_messages_routes(server) -> None:
    reply = _client(server).messages.create(model="tiny", messages=USER, max_tokens=2)  # the x-api-key header
    assert reply.usage.output_tokens == 2
    bare = httpx.post(server.url + "/v1/messages", json={"model": "tiny", "messages": USER, "max_tokens": 2})
    assert bare.status_code == 401 and bare.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": bare.json()["error"]["message"]}}
    for route, extra in (("create", {"max_tokens": 2}), ("count_tokens", {})):
        with pytest.raises(anthropic.AuthenticationError) as unknown:
            getattr(_client(server, "ifx-" + "A" * 43).messages, route)(model="tiny", messages=USER, **extra)
        assert unknown.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            getattr(_client(server, server.reader).messages, route)(model="tiny", messages=USER, **extra)
        assert denied.value.body["error"]["type"] == "permission_error"
        assert "inference" in denied.value.body["error"]["message"]
        for key, why in ((server.revoked, "revoked"), (server.expired, "expired")):
            with pytest.raises(anthropic.AuthenticationError) as refused:
                getattr(_client(server, key).messages, route)(model="tiny", messages=USER, **extra)
            assert refused.value.status_code == 401 and refused.value.body == {"type": "error", "error": {
                "type": "authentication_error", "message": refused.value.body["error"]["message"]}}
            assert why in refused.value.body["error"]["message"]


def test_rate_limit_in_anthropics_shape(server) -> None:
    """Tenant `slow` may make one request a minute: the next is the client's RateLimitError, Anthropic's body
    (`rate_limit_error`) with Retry-After, streamed or not; the limit is the tenant's, not the server's."""
    from inferflux.server.access.limits import WINDOW

    left = WINDOW - time.time() % WINDOW
    if left < 10:  # both requests in one window, or the second would rightly be admitted
        time.sleep(left + 0.05)
    client = _client(server, server.limited)
    assert client.messages.create(model="tiny", messages=USER, max_tokens=2).usage.output_tokens == 2
    for stream in (False, True):
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.create(model="tiny", messages=USER, max_tokens=2, stream=stream)
        error = caught.value
        assert error.status_code == 429 and error.body == {"type": "error", "error": {
            "type": "rate_limit_error", "message": error.body["error"]["message"]}}, error.body
        assert "1 requests per minute" in error.body["error"]["message"]
        assert 1 <= int(error.response.headers["retry-after"]) <= WINDOW
    assert _client(server).messages.create(model="tiny", messages=USER, max_tokens=1).usage.output_tokens == 1


# --- a <tool_call> output, through the route, on an engine that replays it ---


CALL = ["Checking. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>']
# a template that reasons (it mentions <think>), so the generation layer splits the thinking out
THINKING_TEMPLATE = CHATML_TEMPLATE + "{% if enable_thinking is false %}<think></think>{% endif %}"


def _replay_app(tmp_path, pieces: list[str], template: str = CHATML_TEMPLATE):
    """The real app and generation layer over an engine that writes `pieces`; prompts count 9 tokens."""
    return replay_app(tmp_path, pieces, ChatTemplate(template), prompt_tokens=9)


def _async_client(app) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://app")  # the client's httpx
    return anthropic.AsyncAnthropic(base_url="http://app", api_key="unused", http_client=http, max_retries=0)


def test_tool_call_output_becomes_tool_use_blocks(tmp_path) -> None:
    app = _replay_app(tmp_path, CALL)

    async def main():
        client = _async_client(app)
        ask = {"model": "fake", "max_tokens": 50, "messages": [{"role": "user", "content": "Weather in Paris?"}],
               "tools": TOOLS}
        whole = await client.messages.create(**ask)
        async with client.messages.stream(**ask) as stream:
            kinds = [event.type async for event in stream if event.type not in ("text", "input_json")]
            final = await stream.get_final_message()
        # tool_choice none: the same output is text
        plain = await client.messages.create(**ask, tool_choice={"type": "none"})
        # the round trip: the call and its result go back, and the model is asked again
        turn = [*ask["messages"], {"role": "assistant", "content": [b.model_dump() for b in whole.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": whole.content[1].id,
                                              "content": "18C"}]}]
        again = await client.messages.create(**{**ask, "messages": turn})
        await client.close()
        return whole, kinds, final, plain, again

    whole, kinds, final, plain, again = asyncio.run(main())
    assert [b.type for b in whole.content] == ["text", "tool_use"] and whole.stop_reason == "tool_use"
    assert whole.content[0].text == "Checking. "
    call = whole.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    assert kinds == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"], kinds
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.content[1].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    assert plain.stop_reason == "end_turn" and plain.content[0].text == "".join(CALL)
    assert again.stop_reason == "tool_use" and again.usage.input_tokens == 9


def test_thinking_becomes_thinking_blocks(tmp_path) -> None:
    app = _replay_app(tmp_path, ["<think>Let me", " think.</think>", "Hello."], THINKING_TEMPLATE)

    async def main():
        client = _async_client(app)
        ask = {"model": "fake", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}],
               "thinking": {"type": "enabled", "budget_tokens": 1024}}
        whole = await client.messages.create(**ask)
        async with client.messages.stream(**ask) as stream:
            deltas = [event.delta.type async for event in stream if event.type == "content_block_delta"]
            final = await stream.get_final_message()
        await client.close()
        return whole, deltas, final

    whole, deltas, final = asyncio.run(main())
    assert [b.type for b in whole.content] == ["thinking", "text"]
    assert whole.content[0].thinking == "Let me think." and whole.content[1].text == "Hello."
    assert deltas[0] == "thinking_delta" and deltas[-1] == "text_delta"
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]


def test_thinking_on_a_model_that_does_not_reason_is_a_400(server) -> None:
    with pytest.raises(anthropic.BadRequestError, match="does not support thinking"):
        _client(server).messages.create(model="tiny", messages=USER, max_tokens=4,
                                        thinking={"type": "enabled", "budget_tokens": 1024})
    # adaptive lets the model decide: it answers
    reply = _client(server).messages.create(model="tiny", messages=USER, max_tokens=2, thinking={"type": "adaptive"})
    assert reply.usage.output_tokens == 2
