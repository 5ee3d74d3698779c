"""LM Studio's Python SDK (`lmstudio`, its websocket protocol) against a real server, unchanged.

The SDK connects to the `--lmstudio-port` listener as it would to LM Studio on localhost:1234: its
probe, then the `/llm`, `/embedding` and `/system` websockets. Greedy answers must equal the OpenAI
routes' for the same settings, and vectors `/v1/embeddings`'.
"""

from __future__ import annotations

import httpx
import lmstudio as lms
import numpy as np
import pytest

from tests.fixtures.server import Server, free_port

QUESTION = "Tell me a story about llamas."
GREEDY = {"temperature": 0, "maxTokens": 16}


@pytest.fixture(scope="module")
def lms_server(tiny_model):
    port = free_port()
    srv = Server(tiny_model("llama"), "tiny", extra=[f"server.lmstudio_port={port}"])
    srv.lms_host = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(lms_server):
    with lms.Client(lms_server.lms_host) as sdk:
        yield sdk


def openai_chat(server, messages: list[dict], max_tokens: int = 16) -> dict:
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_probe_on_both_ports(lms_server) -> None:
    assert lms.Client.is_valid_api_host(lms_server.lms_host)
    assert lms.Client.is_valid_api_host(lms_server.url.removeprefix("http://"))
    assert not lms.Client.is_valid_api_host(f"127.0.0.1:{free_port()}")


def test_respond_equals_openai_chat(client, lms_server) -> None:
    model = client.llm.model("tiny")
    assert model.identifier == "tiny"
    result = model.respond(QUESTION, config=GREEDY)
    same = openai_chat(lms_server, [{"role": "user", "content": QUESTION}])
    assert result.content and result.content == same["choices"][0]["message"]["content"]
    stats = result.stats
    assert stats.prompt_tokens_count == same["usage"]["prompt_tokens"]
    assert stats.predicted_tokens_count == same["usage"]["completion_tokens"]
    finish = same["choices"][0]["finish_reason"]
    assert stats.stop_reason == {"length": "maxPredictedTokensReached", "stop": "eosFound"}[finish]
    assert stats.time_to_first_token_sec is not None and stats.time_to_first_token_sec > 0
    assert result.model_info.model_key == "tiny" and result.model_info.architecture == "llama"
    assert result.prediction_config.temperature == 0 and result.prediction_config.max_tokens == 16


def test_respond_with_a_chat_history(client, lms_server) -> None:
    chat = lms.Chat("Be brief.")
    chat.add_user_message("Hello.")
    chat.add_assistant_response("Hi there.")
    chat.add_user_message(QUESTION)
    result = client.llm.model("tiny").respond(chat, config=GREEDY)
    same = openai_chat(lms_server, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello."},
                                    {"role": "assistant", "content": "Hi there."},
                                    {"role": "user", "content": QUESTION}])
    assert result.content == same["choices"][0]["message"]["content"]


def test_complete_equals_openai_completion(client, lms_server) -> None:
    prompt = "Once upon a time"
    result = client.llm.model("tiny").complete(prompt, config={"temperature": 0, "maxTokens": 12})
    same = httpx.post(lms_server.url + "/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 12}).json()
    assert result.content and result.content == same["choices"][0]["text"]
    assert result.stats.prompt_tokens_count == same["usage"]["prompt_tokens"]


def test_streamed_fragments_make_the_result(client) -> None:
    model = client.llm.model("tiny")
    seen = []
    stream = model.respond_stream(QUESTION, config={"temperature": 0, "maxTokens": 12},
                                  on_prediction_fragment=seen.append)
    fragments = [fragment.content for fragment in stream]
    result = stream.result()
    assert len(fragments) > 1 and "".join(fragments) == result.content
    assert [f.content for f in seen] == fragments and all(f.reasoning_type == "none" for f in seen)
    assert result.content == model.respond(QUESTION, config={"temperature": 0, "maxTokens": 12}).content


def test_stop_strings_and_cancel(client) -> None:
    model = client.llm.model("tiny")
    whole = model.respond(QUESTION, config={"temperature": 0, "maxTokens": 24}).content
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    cut = model.respond(QUESTION, config={"temperature": 0, "maxTokens": 24, "stopStrings": [stop]})
    assert cut.stats.stop_reason == "stopStringFound" and stop not in cut.content and whole.startswith(cut.content)
    stream = model.respond_stream(QUESTION, config={"temperature": 0, "maxTokens": 200})
    for _ in stream:
        stream.cancel()
    assert stream.result().stats.stop_reason == "userStopped"


def test_async_client_runs_predictions_side_by_side(lms_server) -> None:
    """The async SDK multiplexes channels on one socket: two predictions and a listLoaded run at once."""
    import asyncio

    async def main() -> tuple[list[str], list[str]]:
        async with lms.AsyncClient(lms_server.lms_host) as sdk:
            model = await sdk.llm.model("tiny")
            first, second, loaded = await asyncio.gather(
                model.respond(QUESTION, config=GREEDY), model.respond("Hello.", config=GREEDY), sdk.llm.list_loaded())
            return [first.content, second.content], [m.identifier for m in loaded]

    answers, loaded = asyncio.run(main())
    assert loaded == ["tiny"]
    assert answers == [openai_chat(lms_server, [{"role": "user", "content": q}])["choices"][0]["message"]["content"]
                       for q in (QUESTION, "Hello.")]


def test_list_loaded_and_model_info(client, lms_server) -> None:
    assert [m.identifier for m in client.llm.list_loaded()] == ["tiny"]
    model = client.llm.model("tiny")
    assert model.get_context_length() == 256
    info = model.get_info()
    assert info.model_key == "tiny" and info.architecture == "llama" and info.format == "safetensors"
    ids = httpx.post(lms_server.url + "/tokenize", json={"model": "tiny", "prompt": QUESTION,
                                                         "add_special_tokens": False}, timeout=60).json()["tokens"]
    assert list(model.tokenize(QUESTION)) == ids and model.count_tokens(QUESTION) == len(ids)
    assert "Hello." in model.apply_prompt_template(lms.Chat.from_history("Hello."))
    assert [m.model_key for m in client.list_downloaded_models()] == ["tiny"]


def test_embed_equals_openai_embeddings(client, lms_server) -> None:
    texts = ["one llama", "two alpacas"]
    model = client.embedding.model("tiny")
    vector = model.embed(texts[0])
    many = model.embed(texts)
    same = httpx.post(lms_server.url + "/v1/embeddings", json={"model": "tiny", "input": texts}, timeout=60).json()
    expected = [row["embedding"] for row in same["data"]]
    assert len(vector) == len(expected[0]) > 0
    np.testing.assert_allclose(vector, expected[0], atol=1e-6)
    np.testing.assert_allclose(many, expected, atol=1e-6)


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def test_bad_model_name_and_unserved_calls(client) -> None:
    with pytest.raises(lms.LMStudioModelNotFoundError, match="no-such-model"):
        client.llm.model("no-such-model")
    with pytest.raises(lms.LMStudioServerError, match="not served"):
        client.llm.load_new_instance("tiny", "second")
    with pytest.raises(lms.LMStudioServerError, match="only text"):
        chat = lms.Chat()
        chat.add_user_message("hi")
        history = chat._get_history_for_prediction()
        history["messages"][0]["content"].append({"type": "file", "name": "x.png", "identifier": "x",
                                                  "sizeBytes": 1, "fileType": "image"})
        client.llm.model("tiny").respond(history)
    with pytest.raises(lms.LMStudioServerError, match="tool use"):
        client.llm.model("tiny").act("What is 2 + 3?", [add])
    with pytest.raises(lms.LMStudioServerError, match="repository.searchModels is not served"):
        client.repository.search_models("llama")
    # The same connection (and the server) still serve.
    assert client.llm.model("tiny").respond(QUESTION, config=GREEDY).content


def test_a_client_that_leaves_mid_stream(lms_server, client) -> None:
    with lms.Client(lms_server.lms_host) as other:
        stream = other.llm.model("tiny").respond_stream(QUESTION, config={"temperature": 0, "maxTokens": 200})
        assert next(iter(stream)).content is not None
    # Its socket closed under a running prediction: the server stops it and serves on, without a traceback.
    assert client.llm.model("tiny").respond(QUESTION, config=GREEDY).content
    assert httpx.get(lms_server.url + "/readyz", timeout=10).status_code == 200
    assert "Traceback" not in lms_server.output(), lms_server.output()


class KeyedClient(lms.Client):
    """The SDK with an API key as its handshake's passkey (its only credential: it sends no HTTP headers)."""

    key = ""

    def _create_auth_message(self) -> dict:
        return self._format_auth_message(client_key=self.key)


@pytest.mark.slow  # its own server, with security.auth required
def test_auth_required_takes_the_passkey(tiny_model) -> None:
    from inferflux.server.access.keys import KeyStore
    from tests.fixtures.server import private_home

    home = private_home()
    store = KeyStore.at_home(home)
    store.create_tenant("acme")
    inference, _ = store.create_key("acme", "inference")
    reader, _ = store.create_key("acme", "models:read")
    srv = Server(tiny_model("llama"), "tiny", extra=["security.auth=required"], home=home)
    try:
        host = srv.url.removeprefix("http://")
        with lms.Client(host) as stock:  # a random passkey: refused, in the SDK's words
            with pytest.raises(lms.LMStudioServerError, match="Authentication failed"):
                stock.llm.list_loaded()
        KeyedClient.key = reader
        with KeyedClient(host) as keyed:
            with pytest.raises(lms.LMStudioServerError, match="lacks the `inference` scope"):
                keyed.llm.list_loaded()
            assert [m.model_key for m in keyed.list_downloaded_models()] == ["tiny"]  # /system: models:read
        KeyedClient.key = inference
        with KeyedClient(host) as keyed:
            assert keyed.llm.model("tiny").respond(QUESTION, config={"temperature": 0, "maxTokens": 2}).content
        assert inference not in srv.output() and reader not in srv.output()
    finally:
        status = srv.stop()
        store.close()
    assert status == 0, srv.output()
