"""LM Studio's `/api/v0/*` REST API and its OpenAI extras, against a real server."""

from __future__ import annotations

import httpx

MESSAGES = [{"role": "user", "content": "Tell me a story about llamas."}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def test_models(server) -> None:
    models = httpx.get(server.url + "/api/v0/models", timeout=60).json()["data"]
    assert [m["id"] for m in models] == ["tiny"]
    model = httpx.get(server.url + "/api/v0/models/tiny", timeout=60).json()
    assert model["type"] == "llm" and model["state"] == "loaded" and model["arch"] == "llama"
    assert model["max_context_length"] == 256 and model["compatibility_type"] == "safetensors"
    missing = httpx.get(server.url + "/api/v0/models/nope", timeout=60)
    assert missing.status_code == 404


def test_chat_and_completions_stats(server) -> None:
    short = post(server, "/api/v0/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 4,
                                                      "temperature": 0, "ignore_eos": True}).json()
    long = post(server, "/api/v0/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 40,
                                                     "temperature": 0, "ignore_eos": True}).json()
    for reply in (short, long):
        stats = reply["stats"]
        assert stats["stop_reason"] == "maxPredictedTokensReached"
        assert stats["tokens_per_second"] > 0 and stats["generation_time"] > 0
        assert 0 < stats["time_to_first_token"] <= stats["generation_time"]
        assert reply["model_info"]["arch"] == "llama" and reply["runtime"]["name"] == "inferflux-jax"
    # Computed from the request's own timings: two different requests do not report the same numbers.
    assert short["stats"]["tokens_per_second"] != long["stats"]["tokens_per_second"]
    assert long["usage"]["completion_tokens"] == 40
    same = post(server, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 40,
                                                  "temperature": 0, "ignore_eos": True}).json()
    assert same["choices"][0]["message"]["content"] == long["choices"][0]["message"]["content"]
    text = post(server, "/api/v0/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 5,
                                                "temperature": 0}).json()
    assert text["choices"][0]["text"] is not None and "stats" in text and "model_info" in text


def test_openai_extras(server) -> None:
    base = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    alias = post(server, "/v1/chat/completions", {**base, "repeat_penalty": 1.8, "ttl": 300}).json()
    named = post(server, "/v1/chat/completions", {**base, "repetition_penalty": 1.8}).json()
    assert alias["choices"][0]["message"]["content"] == named["choices"][0]["message"]["content"]
    unlimited = post(server, "/v1/chat/completions", {**base, "max_tokens": -1})
    assert unlimited.status_code == 200
    usage = unlimited.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 256  # up to the context window
    assert post(server, "/v1/chat/completions", {**base, "max_tokens": -2}).status_code == 400


def test_embeddings(server) -> None:
    reply = post(server, "/api/v0/embeddings", {"model": "tiny", "input": ["one", "two"]}).json()
    assert len(reply["data"]) == 2 and reply["model_info"]["arch"] == "llama"
