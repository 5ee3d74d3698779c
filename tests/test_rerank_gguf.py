"""Rerank and score with `bert` GGUF cross-encoder files, against sentence-transformers and llama.cpp.

The model is test_rerank.py's tiny random one-label `BertForSequenceClassification` (MiniLM's
WordPiece tokenizer). It is written as a GGUF rerank file by InferFlux's converter (`inferctl
convert` / `pull --quantize`, convert/bert_gguf.py: llama.cpp's tensor names, the pooler kept as
`cls.*`, the classifier as `cls.output.*`, `bert.pooling_type = 4`), and checked three ways:
  * InferFlux's scores on the file equal `CrossEncoder(folder).predict` (1e-4 at F32, looser at F16/Q8_0);
  * the same file pulled into the model store and served answers /v1/rerank and /v1/score with them;
  * llama.cpp (llama-cpp-python, rank pooling) reads the same file as an independent reader and
    gives the model's own scores. llama.cpp's BERT graph adds token type 0 to every token (it has no
    segment ids), so its score is the model's for all-zero token types, which transformers computes
    here, not CrossEncoder's (which gives the document type 1).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest

from inferflux.convert.hf_to_gguf import convert_hf_to_gguf
from inferflux.engine.reranker import Reranker, load_reranker
from inferflux.errors import ModelFormatError
from inferflux.formats.describe import describe_model
from inferflux.formats.encoder import load_encoder
from inferflux.formats.gguf_file import GGUFFile
from inferflux.formats.gguf_rerank import load_gguf_classifier_head
from inferflux.store.model_store import ModelStore
from tests.fixtures.server import Server, private_home
from tests.test_rerank import DOCUMENTS, QUERY, cross_encoder, expected  # noqa: F401 - shared fixtures

PAIRS = [(QUERY, d) for d in DOCUMENTS]
# Measured worst errors on this model (weights of std 0.3, so quantization errors are large):
# F16 2.4e-4, Q8_0 6.0e-3 against CrossEncoder's scores.
TOLERANCE = {"F32": 1e-4, "F16": 1e-3, "Q8_0": 2e-2}
# llama.cpp's GELU is its tanh approximation, BERT's the erf form: about 1e-4 apart on these scores.
LLAMA_CPP_TOLERANCE = 5e-4


@pytest.fixture(scope="module")
def gguf_files(cross_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    out = tmp_path_factory.mktemp("rerank-gguf")
    return {t: convert_hf_to_gguf(cross_encoder, out / f"reranker-{t}.gguf", t) for t in TOLERANCE}


@pytest.fixture(scope="module")
def rerankers(gguf_files: dict[str, Path]) -> dict[str, Reranker]:
    """One `Reranker` per file, loaded on first use and shared (each compiles its own buckets)."""

    class Lazy(dict):
        def __missing__(self, qtype: str) -> Reranker:
            reranker = load_reranker(gguf_files[qtype], load_encoder(gguf_files[qtype]))
            assert reranker is not None
            self[qtype] = reranker
            return reranker

    return Lazy()


def test_file_has_llama_cpp_rank_layout(gguf_files: dict[str, Path]) -> None:
    file = GGUFFile(gguf_files["F32"])
    meta = file.metadata
    assert meta["general.architecture"] == "bert" and meta["bert.pooling_type"] == gguf.PoolingType.RANK
    assert meta["bert.classifier.output_labels"] == ["LABEL_0"]
    assert meta["inferflux.cross_encoder.activation"] == "sigmoid"
    assert file.tensors["cls.weight"].shape.tolist() == [32, 32]  # the pooler dense, kept
    assert file.tensors["cls.output.weight"].shape.tolist() == [32, 1]  # GGUF lists dims innermost first
    assert not [n for n in file.tensors if "pooler" in n or "classifier" in n]
    q8 = GGUFFile(gguf_files["Q8_0"])
    assert gguf.GGMLQuantizationType(q8.tensors["blk.0.attn_q.weight"].tensor_type).name == "Q8_0"


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_gguf_scores_equal_cross_encoder(rerankers: dict[str, Reranker], expected: np.ndarray,  # noqa: F811
                                         qtype: str) -> None:
    reranker = rerankers[qtype]
    assert reranker.head.activation == "sigmoid" and reranker.num_labels == 1
    scores, tokens = reranker.score_texts(PAIRS)
    np.testing.assert_allclose(scores[:, 0], expected, atol=TOLERANCE[qtype])
    assert reranker.max_length == 128 and tokens <= len(PAIRS) * 128  # the long document was truncated


def test_store_pull_and_serve_gguf_reranker(cross_encoder: Path, expected: np.ndarray) -> None:  # noqa: F811
    """`pull FOLDER --quantize F32` converts the cross-encoder to a rank GGUF blob; serving the stored name
    answers rerank and score with CrossEncoder's scores."""
    home = private_home()
    store = ModelStore(home)
    assert store.pull(str(cross_encoder), name="tiny-gguf-reranker", quantize="F32") == "tiny-gguf-reranker:latest"
    stored = store.path("tiny-gguf-reranker")
    assert stored.is_file() and GGUFFile(stored).metadata["bert.pooling_type"] == gguf.PoolingType.RANK
    for described in (describe_model(stored), describe_model(cross_encoder)):  # what `inferctl show` prints
        assert described["kind"] == "encoder" and described["note"].startswith("cross-encoder: served on /v1/rerank")
    server = Server(Path("tiny-gguf-reranker"), "tiny-gguf-reranker", home=home)  # served by its store name
    try:
        r = httpx.post(server.url + "/v1/rerank", json={"model": "tiny-gguf-reranker", "query": QUERY,
                                                         "documents": DOCUMENTS}, timeout=120)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == list(np.argsort(-expected, kind="stable"))
        for item in results:
            assert item["relevance_score"] == pytest.approx(expected[item["index"]], abs=1e-4)
        s = httpx.post(server.url + "/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS}, timeout=120)
        assert s.status_code == 200, s.text
        np.testing.assert_allclose([d["score"] for d in s.json()["data"]], expected, atol=1e-4)
    finally:
        assert server.stop() == 0, server.output()


def _zero_type_scores(folder: Path) -> np.ndarray:
    """The model's own sigmoid scores with every token type 0 (what llama.cpp's BERT graph computes)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for ids in tokenizer([q for q, _ in PAIRS], [d for _, d in PAIRS], truncation="longest_first",
                             max_length=128)["input_ids"]:
            tokens = torch.tensor([ids])
            out.append(torch.sigmoid(model(input_ids=tokens, token_type_ids=torch.zeros_like(tokens)).logits)[0, 0])
    return np.asarray(out, np.float32)


def _llama_cpp_rank(path: Path, token_lists: list[list[int]]) -> np.ndarray:
    """llama.cpp's rank-pooling output (the raw logit) per token list, one sequence per decode."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK, n_ctx=128,
                          n_batch=128, n_ubatch=128, verbose=False)
    try:
        assert llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_RANK
        out = []
        for ids in token_lists:  # Llama.embed tokenizes text itself; the pair's ids are given here
            llm._ctx.kv_cache_clear()
            llm._batch.reset()
            llm._batch.add_sequence(ids, 0, True)
            llm._ctx.decode(llm._batch)
            out.append(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)[0])
        return np.asarray(out, np.float32)
    finally:
        llm.close()


def test_llama_cpp_reads_the_same_file(gguf_files: dict[str, Path], rerankers: dict[str, Reranker],
                                       cross_encoder: Path, expected: np.ndarray) -> None:  # noqa: F811
    logits = _llama_cpp_rank(gguf_files["F32"], [ids for ids, _ in rerankers["F32"].tokenize(PAIRS)])
    zero_types = _zero_type_scores(cross_encoder)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), zero_types, atol=LLAMA_CPP_TOLERANCE)
    # ... which is not CrossEncoder's score for this model: its two token-type rows differ.
    assert np.abs(zero_types - expected).max() > 0.05


def _strip(src: Path, dst: Path, drop: tuple[str, ...], keep_pooling: bool) -> Path:
    """A copy of `src` without the tensors `drop` (and without bert.pooling_type unless `keep_pooling`)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "bert")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "bert.pooling_type" and not keep_pooling:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        if tensor.name not in drop:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_llama_cpp_converted_file_without_pooler_scores_as_llama_cpp(gguf_files: dict[str, Path],
                                                                      rerankers: dict[str, Reranker],
                                                                      tmp_path: Path) -> None:
    """llama.cpp's converter drops BERT's pooler and writes no pooling type: such a file is still a reranker
    (it has `cls.output`), and is scored as llama.cpp scores it, the classifier on the [CLS] state."""
    path = _strip(gguf_files["F32"], tmp_path / "no-pooler.gguf", ("cls.weight", "cls.bias"), keep_pooling=False)
    head = load_gguf_classifier_head(path)
    assert head is not None and set(head.weights) == {"classifier", "classifier_bias"}
    reranker = load_reranker(path, load_encoder(path))
    assert reranker is not None
    ours, _ = reranker.score_texts(PAIRS[:3])
    assert np.abs(ours[:, 0] - rerankers["F32"].score_texts(PAIRS[:3])[0][:, 0]).max() > 1e-3  # the pooler mattered
    # One segment only (no second text): llama.cpp's all-zero token types are then CrossEncoder's too.
    singles = [ids for ids, _ in reranker.tokenize([(q, d) for q, d in PAIRS[:3]])]
    ids_only = [ids[: ids.index(102) + 1] for ids in singles]  # [CLS] query [SEP]
    ref = reranker.score([(ids, [0] * len(ids)) for ids in ids_only])[:, 0]
    logits = _llama_cpp_rank(path, ids_only)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), ref, atol=LLAMA_CPP_TOLERANCE)


def test_rank_file_without_a_head_is_refused(gguf_files: dict[str, Path], tmp_path: Path) -> None:
    path = _strip(gguf_files["F32"], tmp_path / "headless.gguf",
                  ("cls.weight", "cls.bias", "cls.output.weight", "cls.output.bias"), keep_pooling=True)
    with pytest.raises(ModelFormatError, match="cls.output.weight"):
        load_gguf_classifier_head(path)
    # Without a rank pooling type or a head it is an embedding model, as llama.cpp reads it.
    plain = _strip(path, tmp_path / "plain.gguf", (), keep_pooling=False)
    assert load_gguf_classifier_head(plain) is None


def test_bi_encoder_folder_converts_to_an_embedding_gguf(tmp_path: Path) -> None:
    """A sentence-transformers bi-encoder goes through the same converter: mean pooling, no head, same tokens."""
    from tests.test_rerank import MINILM

    path = convert_hf_to_gguf(MINILM, tmp_path / "minilm.gguf", "F16")
    file = GGUFFile(path)
    assert file.metadata["bert.pooling_type"] == gguf.PoolingType.MEAN and "cls.weight" not in file.tensors
    assert load_gguf_classifier_head(path) is None
    ours, folder = load_encoder(path), load_encoder(MINILM)
    texts = ["Hello world!", "Café naïve résumé", "UPPERCASE and [unused0] pieces"]
    assert [e.ids for e in ours.tokenizer.backend.encode_batch(texts)] == \
        [e.ids for e in folder.tokenizer.backend.encode_batch(texts)]
    assert ours.pooling == "mean"
    np.testing.assert_allclose(ours.weights["layers.0.q"], folder.weights["layers.0.q"], atol=1e-3)
    np.testing.assert_array_equal(ours.weights["pos_embed"], folder.weights["pos_embed"])  # kept F32
