"""LM Studio's native REST v1 (`/api/v1/*`) against a real server, on its own port too (`--lmstudio-port`).

httpx speaks the REST API as LM Studio documents it (0.4). The `lmstudio` Python SDK speaks LM Studio's
websocket protocol instead: tests/test_lmstudio_sdk.py.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fixtures.server import Server, free_port

QUESTION = "Tell me a story about llamas."


@pytest.fixture(scope="module")
def lms(tiny_model):
    port = free_port()
    srv = Server(tiny_model("llama"), "tiny", extra=[f"server.lmstudio_port={port}"])
    srv.lms_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.output()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) per SSE frame; the name must equal the data's `type`."""
    out = []
    for frame in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        out.append((lines["event"], data))
    return out


def test_models_list_on_the_lmstudio_port(lms) -> None:
    models = httpx.get(lms.lms_url + "/api/v1/models", timeout=60).json()["models"]
    assert [m["key"] for m in models] == ["tiny"]
    model = models[0]
    assert model["type"] == "llm" and model["architecture"] == "llama" and model["size_bytes"] > 0
    assert model["loaded_instances"] == [{"id": "tiny", "config": {"context_length": 256, "eval_batch_size": 128}}]
    assert model["quantization"] == {"name": None, "bits_per_weight": None} and model["format"] is None
    assert model["capabilities"] == {"vision": False, "trained_for_tool_use": True}


def test_chat_greedy_equals_openai_chat(lms) -> None:
    body = {"model": "tiny", "input": QUESTION, "system_prompt": "Be brief.", "temperature": 0,
            "max_output_tokens": 16}
    reply = post(lms.lms_url, "/api/v1/chat", body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    same = post(lms.url, "/v1/chat/completions", {
        "model": "tiny", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]}).json()
    assert result["model_instance_id"] == "tiny"
    assert result["output"] == [{"type": "message", "content": same["choices"][0]["message"]["content"]}]
    stats = result["stats"]
    assert stats["input_tokens"] == same["usage"]["prompt_tokens"]
    assert stats["total_output_tokens"] == same["usage"]["completion_tokens"]
    assert stats["reasoning_output_tokens"] == 0 and stats["time_to_first_token_seconds"] > 0
    assert "response_id" not in result  # stateful chats are not kept
    # An input given as items is the same turn.
    items = post(lms.url, "/api/v1/chat", {**body, "input": [{"type": "message", "content": QUESTION}]}).json()
    assert items["output"] == result["output"]


def test_chat_stream_event_order(lms) -> None:
    body = {"model": "tiny", "input": QUESTION, "temperature": 0, "max_output_tokens": 12}
    whole = post(lms.url, "/api/v1/chat", body).json()
    reply = post(lms.url, "/api/v1/chat", {**body, "stream": True})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    names = [name for name, _ in events]
    assert names[:3] == ["chat.start", "prompt_processing.start", "prompt_processing.end"]
    assert names[3] == "message.start" and names[-2:] == ["message.end", "chat.end"]
    assert set(names[4:-2]) == {"message.delta"}
    text = "".join(data["content"] for name, data in events if name == "message.delta")
    assert text == whole["output"][0]["content"]
    end = events[-1][1]["result"]
    assert end["output"] == whole["output"] and end["stats"]["total_output_tokens"] == whole["stats"][
        "total_output_tokens"]
    assert events[0][1] == {"type": "chat.start", "model_instance_id": "tiny"}


def test_unload_then_load(lms) -> None:
    gone = post(lms.url, "/api/v1/models/unload", {"instance_id": "tiny"})
    assert gone.status_code == 200 and gone.json() == {"instance_id": "tiny"}
    listed = httpx.get(lms.url + "/api/v1/models", timeout=60).json()["models"]
    assert listed[0]["loaded_instances"] == []
    again = post(lms.url, "/api/v1/models/unload", {"instance_id": "tiny"})
    assert again.status_code == 404 and again.json()["error"]["type"] == "model_not_found"
    loaded = post(lms.url, "/api/v1/models/load", {"model": "tiny", "config": {"context_length": 4096}})
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    assert body["model_instance_id"] == "tiny" and body["load_time_seconds"] > 0
    assert body["config"]["context_length"] == 256  # the instance runs with the server's runtime settings
    listed = httpx.get(lms.url + "/api/v1/models", timeout=60).json()["models"]
    assert [i["id"] for i in listed[0]["loaded_instances"]] == ["tiny"]
    # Unloaded again, a streamed chat loads it and says so with model_load events.
    post(lms.url, "/api/v1/models/unload", {"instance_id": "tiny"})
    names = [n for n, _ in sse_events(post(lms.url, "/api/v1/chat", {
        "model": "tiny", "input": "hi", "max_output_tokens": 2, "stream": True}).text)]
    assert names[:3] == ["chat.start", "model_load.start", "model_load.end"]


@pytest.mark.parametrize("body", [
    {"input": "hi"},
    {"model": "tiny"},
    {"model": "tiny", "input": "hi", "temperature": -1},
    {"model": "tiny", "input": "hi", "reasoning": "sometimes"},
    {"model": "tiny", "input": "hi", "integrations": ["mcp/playwright"]},
    {"model": "tiny", "input": "hi", "previous_response_id": "resp_1"},
    {"model": "tiny", "input": [{"type": "image", "data_url": "data:,"}]},
])
def test_bad_chat_is_a_400_in_lmstudio_shape(lms, body: dict) -> None:
    r = post(lms.url, "/api/v1/chat", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request" and error["message"]


def test_unknown_model_is_a_404(lms) -> None:
    for path, body in (("/api/v1/chat", {"model": "nope", "input": "hi"}),
                       ("/api/v1/models/load", {"model": "nope"})):
        r = post(lms.url, path, body)
        assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
