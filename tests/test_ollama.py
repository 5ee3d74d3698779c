"""Ollama's API, as the real `ollama` client sees it, on a real server process."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import ollama
import pytest

from tests.fixtures.server import Server, free_port


@pytest.fixture(scope="module")
def client(server):
    """The real `ollama` client, on the conftest's `server` (this module's `client` is Ollama's, not OpenAI's)."""
    return ollama.Client(host=server.url)


GREEDY = {"temperature": 0, "num_predict": 10}


def openai_chat(server, content: str, max_tokens: int) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def ndjson(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        raw = response.read().decode()
    assert raw.endswith("\n") and "\n\n" not in raw
    return [json.loads(line) for line in raw.splitlines()]


def check_final(obj: dict) -> None:
    assert obj["done"] is True and obj["done_reason"] in ("stop", "length")
    for key in ("total_duration", "prompt_eval_duration", "eval_duration", "prompt_eval_count", "eval_count"):
        assert isinstance(obj[key], int) and obj[key] > 0, key
    assert obj["load_duration"] == 0
    assert obj["created_at"].endswith("Z")


def test_generate_and_chat_greedy_equal_openai(server, client) -> None:
    expected = openai_chat(server, "Tell me about llamas.", 10)
    text = expected["choices"][0]["message"]["content"]
    gen = client.generate(model="tiny", prompt="Tell me about llamas.", options=GREEDY, stream=False)
    assert gen.response == text and gen.done and gen.done_reason == expected["choices"][0]["finish_reason"]
    assert gen.prompt_eval_count == expected["usage"]["prompt_tokens"]
    assert gen.eval_count == expected["usage"]["completion_tokens"]
    check_final(gen.model_dump())
    chat = client.chat(model="tiny:latest", messages=[{"role": "user", "content": "Tell me about llamas."}],
                       options=GREEDY, stream=False)
    assert chat.message.role == "assistant" and chat.message.content == text
    streamed = list(client.chat(model="tiny", messages=[{"role": "user", "content": "Tell me about llamas."}],
                                options=GREEDY, stream=True))
    assert "".join(part.message.content for part in streamed) == text
    assert [p.done for p in streamed].count(True) == 1 and streamed[-1].done
    streamed_gen = list(client.generate(model="tiny", prompt="Tell me about llamas.", options=GREEDY, stream=True))
    assert "".join(part.response for part in streamed_gen) == text


def test_ndjson_stream_shape(server) -> None:
    lines = ndjson(server, "/api/generate", {"model": "tiny", "prompt": "Hi", "options": GREEDY})
    assert [o["done"] for o in lines].count(True) == 1 and lines[-1]["done"] is True
    assert all(o["model"] == "tiny" and "response" in o for o in lines)
    check_final(lines[-1])
    assert len(lines[-1]["context"]) == lines[-1]["prompt_eval_count"] + lines[-1]["eval_count"]
    chat = ndjson(server, "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                        "options": {"num_predict": 5, "seed": 3}})
    assert [o["done"] for o in chat].count(True) == 1 and chat[-1]["done"] is True
    assert all(o["message"]["role"] == "assistant" for o in chat)
    check_final(chat[-1])
    assert chat[-1]["eval_count"] <= 5


def test_context_round_trip(server, client) -> None:
    first = client.generate(model="tiny", prompt="Once upon a time", raw=True, options=GREEDY, stream=False)
    context = list(first.context)
    assert len(context) == first.prompt_eval_count + first.eval_count
    second = client.generate(model="tiny", prompt=" and then", raw=True, context=context, options=GREEDY,
                             stream=False)
    assert second.context[:len(context)] == context
    assert second.prompt_eval_count > len(context)
    # The same prompt ids through /v1/completions give the same greedy text.
    prompt_ids = list(second.context[:second.prompt_eval_count])
    ref = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": prompt_ids, "max_tokens": 10, "temperature": 0}).json()
    assert second.response == ref["choices"][0]["text"]
    # raw without context is /v1/completions on the text
    ref = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}).json()
    assert first.response == ref["choices"][0]["text"]


def test_info_routes(server, client) -> None:
    root = httpx.get(server.url + "/", timeout=120)
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert httpx.head(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/api/version", timeout=120).json()["version"]
    tags = client.list()
    assert [m.model for m in tags.models] == ["tiny:latest"]
    model = tags.models[0]
    assert model.size > 0 and len(model.digest) == 64
    assert model.details.format == "safetensors" and model.details.family
    assert model.details.parameter_size
    show = client.show("tiny")
    assert "completion" in show.capabilities and show.template and show.modelfile.startswith("#")
    assert show.modelinfo["general.architecture"] == model.details.family
    assert show.details.format == "safetensors"
    ps = client.ps()
    assert [m.model for m in ps.models] == ["tiny:latest"] and ps.models[0].expires_at.year > 2100


def test_embed(server, client) -> None:
    texts = ["hello world", "llamas are great"]
    got = client.embed(model="tiny", input=texts)
    vectors = np.array(got.embeddings)
    assert vectors.shape[0] == 2
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    ref = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": texts}, timeout=60).json()
    np.testing.assert_allclose(vectors, [d["embedding"] for d in ref["data"]], atol=1e-5)
    assert got.prompt_eval_count == ref["usage"]["prompt_tokens"]
    legacy = client.embeddings(model="tiny", prompt="hello world")
    np.testing.assert_allclose(legacy.embedding, vectors[0], atol=1e-5)


def test_errors(server, client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope", prompt="hi", stream=False)
    assert info.value.status_code == 404 and "nope" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="tiny", messages=[{"role": "user", "content": "hi", "images": ["aGVsbG8="]}])
    assert info.value.status_code == 400 and "images" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="tiny", prompt="hi", format={"type": "objectx"}, stream=False)  # a bad schema
    assert info.value.status_code == 400 and "invalid JSON schema" in info.value.error
    for body in ({"model": "tiny", "prompt": "a", "suffix": "b"}, {"model": "tiny", "prompt": "a", "template": "x"},
                 {"model": "tiny", "prompt": "a", "options": {"temperature": "hot"}}):
        r = httpx.post(server.url + "/api/generate", json=body, timeout=120)
        assert r.status_code == 400 and isinstance(r.json()["error"], str), body
    ok = client.generate(model="tiny", prompt="hi", options={"num_predict": 2, "num_keep": 4, "bogus": 1},
                         stream=False)
    assert ok.done and ok.eval_count <= 2
    empty = client.generate(model="tiny", prompt="")
    assert empty.done and empty.done_reason == "load"


def test_options_are_honoured(client) -> None:
    """seed makes sampling reproducible, num_predict caps eval_count, stop strings end the output."""

    def gen(**options) -> ollama.GenerateResponse:
        started = time.monotonic()
        reply = client.generate(model="tiny", prompt="Tell me a story.", options=options, stream=False)
        check_final(reply.model_dump())
        # Durations add up, and none is longer than the request took.
        assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration - 1
        assert reply.total_duration <= (time.monotonic() - started) * 1e9
        # eval_count is the number of tokens produced: the context is the prompt plus them.
        assert len(reply.context) == reply.prompt_eval_count + reply.eval_count
        return reply

    first = gen(seed=7, temperature=1.0, num_predict=12)
    assert gen(seed=7, temperature=1.0, num_predict=12).context == first.context
    others = {tuple(gen(seed=seed, temperature=1.0, num_predict=12).context) for seed in (8, 9, 10)}
    assert others - {tuple(first.context)}, "three other seeds all gave the same tokens"
    for cap in (1, 3, 9):
        capped = gen(temperature=0, num_predict=cap)
        assert capped.eval_count <= cap and (capped.eval_count == cap or capped.done_reason == "stop")
    free = gen(temperature=0, num_predict=24)
    cuts = [i for i in range(len(free.response) // 3, len(free.response) - 1)
            if free.response[i:i + 2].isascii() and free.response[i:i + 2].strip() == free.response[i:i + 2]]
    assert cuts, f"no usable stop string in {free.response!r}"
    stop = free.response[cuts[0]:cuts[0] + 2]
    cut = gen(temperature=0, num_predict=24, stop=[stop])
    assert cut.response == free.response[:free.response.find(stop)] and cut.done_reason == "stop"
    streamed = list(client.generate(model="tiny", prompt="Tell me a story.", stream=True,
                                    options={"temperature": 0, "num_predict": 24, "stop": [stop]}))
    assert "".join(p.response for p in streamed) == cut.response and streamed[-1].eval_count == cut.eval_count


def test_second_port_for_ollama_clients(tiny_model) -> None:
    """`server.ollama_port` (`inferctl serve --ollama-port 11434`) serves the same app on Ollama's port too."""
    port = free_port()
    server = Server(tiny_model("qwen2"), "qwen", [f"server.ollama_port={port}"])
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        reply = client.chat(model="qwen", messages=[{"role": "user", "content": "hi"}], options=GREEDY)
        assert reply["done"] and reply["message"]["role"] == "assistant"
        assert [m["model"] for m in client.list()["models"]] == ["qwen:latest"]
        assert httpx.get(server.url + "/api/version", timeout=60).status_code == 200  # main port still serves
    finally:
        assert server.stop() == 0, server.output()
