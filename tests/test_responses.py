"""OpenAI's Responses API (`/v1/responses`) with the real `openai` client against a live server.

One server for the module, with `security.auth: required` and keys of two tenants, so tenant
isolation of stored responses is tested on the same server as everything else. Greedy text is
compared with the chat endpoint's for the same messages: the Responses dialect is a translation,
so the two must render the same prompt and produce the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from inferflux.server.access.keys import KeyStore
from inferflux.server.responses.bodies import ResponsesRequest, items_to_messages
from inferflux.server.responses.store import ResponseStore, parse_retention

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def served(tiny_model):
    from tests.fixtures.server import Server, private_home

    home = private_home()
    store = KeyStore.at_home(home)
    keys = {}
    for tenant in ("acme", "globex"):
        store.create_tenant(tenant)
        keys[tenant], _ = store.create_key(tenant, "inference")
    store.close()
    server = Server(tiny_model("llama"), "tiny", home=home,
                    extra=["security.auth=required", "runtime.max_model_len=512"])  # room for tools printed as JSON
    yield server, keys
    assert server.stop() == 0, server.output()


def _client(served, tenant: str = "acme") -> openai.OpenAI:
    server, keys = served
    return openai.OpenAI(base_url=server.url + "/v1", api_key=keys[tenant], max_retries=0)


def _chat_text(client: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int = 8) -> str:
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, **GREEDY)
    return reply.choices[0].message.content or ""


def test_create_matches_chat(served) -> None:
    client = _client(served)
    response = client.responses.create(model="tiny", input="Say hi", instructions="Be brief.",
                                       max_output_tokens=8, metadata={"run": "1"}, **GREEDY)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "tiny"
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    expected = _chat_text(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}])
    assert response.output_text == expected and expected
    usage = response.usage
    assert usage.output_tokens == 8 and usage.total_tokens == usage.input_tokens + 8
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0
    # Eight tokens asked and eight made: the model was cut off (unless it stopped exactly there).
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.metadata == {"run": "1"} and response.instructions == "Be brief."
    # The same conversation as message items with content parts.
    items = client.responses.create(model="tiny", max_output_tokens=8, **GREEDY, input=[
        {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}])
    assert items.output_text == expected


def test_stream_event_order(served) -> None:
    client = _client(served)
    expected = client.responses.create(model="tiny", input="Count", max_output_tokens=6, **GREEDY).output_text
    events = list(client.responses.create(model="tiny", input="Count", max_output_tokens=6, stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == expected == events[-4].text == events[-1].response.output_text
    ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert ids == {events[-1].response.output[0].id}
    # The client's stream helper accumulates the same events (its snapshot of the text grows delta by delta;
    # `get_final_response()` wants `response.completed`, which a response cut off by max_output_tokens is not).
    with client.responses.stream(model="tiny", input="Count", max_output_tokens=6, **GREEDY) as stream:
        helped = list(stream)
    snapshots = [e.snapshot for e in helped if e.type == "response.output_text.delta"]
    assert snapshots[-1] == expected and all(expected.startswith(s) for s in snapshots)
    final = helped[-1].response
    assert helped[-1].type == "response.incomplete" and final.output_text == expected
    assert client.responses.retrieve(final.id).output_text == expected  # streamed ones are stored too


def test_previous_response_id_chains_the_turns(served) -> None:
    client = _client(served)
    first = client.responses.create(model="tiny", input="Hello", instructions="Not carried over.",
                                    max_output_tokens=5, **GREEDY)
    second = client.responses.create(model="tiny", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=5, **GREEDY)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "And then?"}]
    assert second.output_text == _chat_text(client, messages, 5)
    assert second.previous_response_id == first.id
    # A third turn carries both earlier turns; input_tokens counts the same rendered prompt.
    third_input = {"model": "tiny", "input": "Last", "previous_response_id": second.id}
    counted = client.responses.input_tokens.count(**third_input)
    third = client.responses.create(**third_input, max_output_tokens=3, **GREEDY)
    assert counted.input_tokens == third.usage.input_tokens
    whole = messages + [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Last"}]
    assert third.output_text == _chat_text(client, whole, 3)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id="resp_nope", max_output_tokens=2)


def test_function_call_output_renders_as_a_tool_message(served) -> None:
    client = _client(served)
    tools = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    args = json.dumps({"city": "Paris"})
    response = client.responses.create(model="tiny", tools=tools, max_output_tokens=6, **GREEDY, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": args},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}])
    chat = client.chat.completions.create(model="tiny", max_tokens=6, **GREEDY, tools=[
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                          "parameters": tools[0]["parameters"]}}], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    assert response.output_text == chat.choices[0].message.content
    assert response.tools[0].name == "get_weather"
    listed = client.responses.input_items.list(response.id, order="asc")
    assert [item.type for item in listed.data] == ["message", "function_call", "function_call_output"]


def test_forced_function_call_round_trip(served) -> None:
    """tool_choice names the function: the grammar forces a call, which comes back as a `function_call` item;
    its output, sent back with previous_response_id, is the tool message of the same turn chat renders."""
    client = _client(served)
    tools = [{"type": "function", "name": "get_weather",  # small: the llama template prints tools as JSON
              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4}},
                             "required": ["city"], "additionalProperties": False}}]
    first = client.responses.create(model="tiny", input="Weather in Paris?", tools=tools, max_output_tokens=48,
                                    tool_choice={"type": "function", "name": "get_weather"}, **GREEDY)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].status == "completed", first.output
    assert first.output[-1].type == "function_call"
    args = json.loads(calls[0].arguments)
    assert isinstance(args["city"], str) and calls[0].call_id.startswith("call_")
    # Streamed, the same call arrives as function_call_arguments events.
    events = list(client.responses.create(model="tiny", input="Weather in Paris?", tools=tools, stream=True,
                                          max_output_tokens=48, tool_choice="required", **GREEDY))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == args
    # (The forced call on this template runs on to max_output_tokens after the call: status "incomplete".)
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output[-1].type == "function_call"
    second = client.responses.create(model="tiny", previous_response_id=first.id, tools=tools, max_output_tokens=6,
                                     **GREEDY, input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                                       "output": "sunny"}])
    text = [item for item in first.output if item.type == "message"]
    chat = client.chat.completions.create(model="tiny", max_tokens=6, **GREEDY, tools=[
        {"type": "function", "function": {k: v for k, v in tools[0].items() if k != "type"}}], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": text[0].content[0].text if text else "", "tool_calls": [
            {"id": calls[0].call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}])
    assert second.output_text == chat.choices[0].message.content


def test_text_format_json_schema_is_enforced(served) -> None:
    client = _client(served)
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "level": {"type": "integer", "minimum": -5, "maximum": 5}},
              "required": ["color", "level"], "additionalProperties": False}
    response = client.responses.create(model="tiny", input="JSON please", max_output_tokens=60, temperature=0.0,
                                       text={"format": {"type": "json_schema", "name": "pick", "schema": schema,
                                                        "strict": True}})
    assert response.status == "completed", response.output_text
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema" and response.text.format.name == "pick"
    with pytest.raises(openai.BadRequestError):  # a schema that does not compile
        client.responses.create(model="tiny", input="x", max_output_tokens=4, text={"format": {
            "type": "json_schema", "name": "bad", "schema": {"type": "objectx"}}})


def test_retrieve_delete_input_items_store_false(served) -> None:
    client = _client(served)
    response = client.responses.create(model="tiny", input="Keep me", max_output_tokens=3, **GREEDY)
    again = client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == response.output_text
    items = client.responses.input_items.list(response.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Keep me")]
    assert items.first_id == items.data[0].id and items.has_more is False
    deleted = client.responses.delete(response.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    ephemeral = client.responses.create(model="tiny", input="Forget me", max_output_tokens=2, store=False)
    assert ephemeral.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ephemeral.id)


def test_tenants_cannot_see_each_other(served) -> None:
    acme, globex = _client(served, "acme"), _client(served, "globex")
    mine = acme.responses.create(model="tiny", input="Secret", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        globex.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        globex.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        globex.responses.create(model="tiny", input="x", previous_response_id=mine.id, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        globex.responses.delete(mine.id)
    assert acme.responses.retrieve(mine.id).id == mine.id  # still there for its owner
    server, _ = served
    plain = httpx.get(f"{server.url}/v1/responses/{mine.id}", timeout=30)
    assert plain.status_code == 401 and plain.json()["error"]["type"] == "authentication_error"


def test_bad_requests_are_400_in_openai_shape(served) -> None:
    server, keys = served
    headers = {"Authorization": f"Bearer {keys['acme']}"}
    bad = [({"model": "tiny", "input": [{"type": "input_image", "image_url": "x"}]}, "input"),
           ({"model": "tiny", "input": "x", "tools": [{"type": "web_search"}]}, "tools"),
           ({"model": "tiny", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "text.format.name"),
           ({"model": "tiny", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
           ({"model": "tiny", "input": []}, "input"), ({"model": "tiny", "input": ""}, "input")]
    for body, param in bad:
        reply = httpx.post(server.url + "/v1/responses", json=body, headers=headers, timeout=60)
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].startswith(param), (body, error)
    missing = httpx.post(server.url + "/v1/responses", json={"model": "nope", "input": "x"}, headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


# --- without a server ---


def test_items_to_messages_joins_calls_into_one_assistant_turn() -> None:
    items = ResponsesRequest(model="m", instructions="sys", input=[
        {"role": "user", "content": "q"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "let me check"}]},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{\"x\": 1}"},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "2"}]}])
    messages = items.messages([])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[2]["content"] == "let me check"
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["a", "b"]
    assert messages[4] == {"role": "tool", "content": "2", "tool_call_id": "b"}
    assert items_to_messages([{"type": "function_call", "call_id": "c", "name": "f"}])[0]["content"] == ""
    # text.format -> the engine's grammar constraint on the request's sampling parameters.
    from inferflux.engine.grammar import Constraint

    def constraint(fmt: dict[str, Any]) -> Any:
        return ResponsesRequest(model="m", input="x", text={"format": fmt}).spec([]).params.constraint

    assert constraint({"type": "text"}) is None
    assert constraint({"type": "json_object"}) == Constraint.json_schema(None)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert constraint({"type": "json_schema", "name": "a", "schema": schema}) == Constraint.json_schema(schema)


def test_tool_call_events_reach_the_clients_accumulator() -> None:
    """A parsed tool call (the model here cannot be made to write one) as the events and items the `openai`
    client's stream helper builds a `function_call` output item from."""
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from inferflux.server.generation import Finished, ReasoningDelta, TextDelta, Timings, ToolCallDelta
    from inferflux.server.responses.encode import response_events
    from inferflux.server.tool_calls import ToolCall

    class Events:  # the generation's side of the seam: its events, its model name, its release
        model_name, closed = "tiny", False

        async def events(self):
            yield ReasoningDelta(0, "The user wants ")
            yield ReasoningDelta(0, "weather.")
            yield TextDelta(0, "Checking.", None)
            yield ToolCallDelta(0, [ToolCall("get_weather", {"city": "Paris"})], 0)
            yield Finished(0, "stop", None, 1, 10, 4, 0, [], Timings(0.0, None, None))

        def close(self) -> None:
            self.closed = True

    req = ResponsesRequest(model="tiny", input="w?", tools=[{"type": "function", "name": "get_weather"}])
    gen = Events()

    async def collect() -> list[dict[str, Any]]:
        return [e async for e in response_events(req, gen, "resp_x")]  # type: ignore[arg-type]

    raw = asyncio.run(collect())
    assert gen.closed
    kinds = [e["type"] for e in raw]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
                     "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
                     "response.output_item.done",
                     "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    state = ResponseStreamState(input_tools=req.model_dump()["tools"], text_format=openai.omit)
    adapter = TypeAdapter(ResponseStreamEvent)
    for obj in raw:  # validated strictly against the client's event models, then accumulated
        state.handle_event(adapter.validate_python(json.loads(json.dumps(obj))))
    assert state._completed_response is not None
    assert state._completed_response.output[2].arguments == json.dumps({"city": "Paris"})
    final = raw[-1]["response"]
    thought, message, call = final["output"]
    assert thought["type"] == "reasoning" and thought["content"] == [{"type": "reasoning_text",
                                                                       "text": "The user wants weather."}]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["status"] == "completed"
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["call_id"].startswith("call_")
    assert message["content"][0]["text"] == "Checking." and final["status"] == "completed"
    assert final["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                              "output_tokens": 4,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 14}
    # The call, fed back with its output, is the assistant turn and the tool message a template renders.
    messages = items_to_messages(final["output"] + [{"type": "function_call_output", "call_id": call["call_id"],
                                                     "output": "sunny"}])
    assert messages[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": call["arguments"]}
    assert messages[1] == {"role": "tool", "content": "sunny", "tool_call_id": call["call_id"]}


def test_store_retention_and_tenants(tmp_path: Path) -> None:
    store = ResponseStore.at_home(tmp_path)
    response = {"id": "resp_1", "output": [], "previous_response_id": None}
    store.save("a", response, [{"id": "msg_1"}], retention=0.2)
    store.save("a", {"id": "resp_2", "output": [], "previous_response_id": "resp_1"}, [], retention=None)
    assert [s.response["id"] for s in store.chain("a", "resp_2")] == ["resp_1", "resp_2"]
    with pytest.raises(Exception, match="not found"):
        store.get("b", "resp_1")
    time.sleep(0.3)
    with pytest.raises(Exception, match="not found"):
        store.get("a", "resp_1")  # expired: invisible at once
    assert store.count() == 2
    store.save("a", {"id": "resp_3", "output": []}, [], retention=60)
    assert store.count() == 2  # pruned on the write
    store.close()
    assert parse_retention("30d") == 30 * 86400 and parse_retention("0") is None and parse_retention("1d12h") == 129600
