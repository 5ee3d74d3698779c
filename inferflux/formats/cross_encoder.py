"""The classifier head of a BERT-family cross-encoder (a `BertForSequenceClassification` folder).

A cross-encoder (a reranker such as ms-marco-MiniLM-L-6-v2) is a BERT encoder that reads a
(query, document) pair as one input, `[CLS] query [SEP] document [SEP]` with token type 0 for the
query and 1 for the document, and scores it from the [CLS] state through BERT's pooler
(`tanh(W h + b)`) and a linear classifier. The encoder itself loads with `formats/encoder.py`
(task-head prefixes are stripped there and the head tensors ignored); this module reads only what
that leaves out: the pooler and classifier tensors, the label count, the maximum pair length and the
activation sentence-transformers' `CrossEncoder.predict` applies to the logits, so a served score is
what `CrossEncoder(folder).predict(pairs)` returns for the same folder:

  * activation: `config_sentence_transformers.json`'s `activation_fn` (sentence-transformers >= 6),
    else `config.json`'s `sentence_transformers.activation_fn` (v4-v5), else the pre-v4
    `sbert_ce_default_activation_function`, else Sigmoid for one label and Identity for more;
  * maximum length: `sentence_bert_config.json`'s `max_seq_length`, else the smaller of the
    tokenizer's `model_max_length` and the position table (what the Transformer module uses); pairs
    longer than that are truncated `longest_first`, as the tokenizer does for CrossEncoder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np

from inferflux.errors import ModelFormatError
from inferflux.formats.hf_folder import SafetensorsFolder
from inferflux.formats.json_file import read_json_object

Activation = Literal["sigmoid", "identity", "tanh"]

# sentence-transformers stores the activation as a dotted torch class path.
ACTIVATIONS: dict[str, Activation] = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid", "torch.nn.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity", "torch.nn.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh", "torch.nn.Tanh": "tanh",
}
HEAD_NAMES = {  # ours -> Hugging Face's, as BertForSequenceClassification saves them
    "pooler": "bert.pooler.dense.weight", "pooler_bias": "bert.pooler.dense.bias",
    "classifier": "classifier.weight", "classifier_bias": "classifier.bias",
}


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
    """Pooler + classifier weights (float32) and how to turn the logits into scores."""

    weights: dict[str, np.ndarray]
    num_labels: int
    activation: Activation
    max_length: int  # tokens per pair, [CLS] and both [SEP] included


def is_cross_encoder(path: str | Path) -> bool:
    """A folder whose config.json names a `*ForSequenceClassification` architecture of a BERT model."""
    folder = _model_dir(Path(path).expanduser())
    if folder is None:
        return False
    config = read_json_object(folder / "config.json", missing_ok=True)
    return config.get("model_type") == "bert" and any(
        str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ())


def load_classifier_head(path: str | Path) -> ClassifierHead | None:
    """The head of a cross-encoder folder, or None for anything else (a bi-encoder, a GGUF file)."""
    path = Path(path).expanduser()
    folder = _model_dir(path)
    if folder is None or not is_cross_encoder(path):
        return None
    config = read_json_object(folder / "config.json")
    hidden = int(config.get("hidden_size") or 0)
    tensors = SafetensorsFolder(folder)
    available = set(tensors.names)
    weights: dict[str, np.ndarray] = {}
    for ours, hf in HEAD_NAMES.items():
        name = hf if hf in available else hf.removeprefix("bert.")
        if name not in available:
            raise ModelFormatError(folder, f"a sequence-classification model needs tensor {hf!r}")
        weights[ours] = np.asarray(tensors.read(name), np.float32)
    labels = weights["classifier"].shape[0]
    if weights["pooler"].shape != (hidden, hidden) or weights["classifier"].shape != (labels, hidden):
        raise ModelFormatError(folder, f"pooler {weights['pooler'].shape} / classifier {weights['classifier'].shape}"
                                       f" do not match hidden_size {hidden}")
    return ClassifierHead(weights=weights, num_labels=labels, activation=_activation(path, folder, config, labels),
                          max_length=_max_length(folder, config))


def _model_dir(path: Path) -> Path | None:
    """The folder holding config.json: the path itself (a CrossEncoder folder keeps its model at the top)."""
    return path if path.is_dir() and (path / "config.json").is_file() else None


def _activation(path: Path, folder: Path, config: dict, labels: int) -> Activation:
    st = read_json_object(path / "config_sentence_transformers.json", missing_ok=True)
    name = st.get("activation_fn")
    if name is None and isinstance(config.get("sentence_transformers"), dict):
        name = config["sentence_transformers"].get("activation_fn")
    if name is None:
        name = config.get("sbert_ce_default_activation_function")
    if name is None:
        return "sigmoid" if labels == 1 else "identity"
    if name not in ACTIVATIONS:
        raise ModelFormatError(folder, f"unsupported cross-encoder activation {name!r} "
                                       f"(supported: {', '.join(sorted(set(ACTIVATIONS)))})")
    return ACTIVATIONS[name]


def _max_length(folder: Path, config: dict) -> int:
    positions = int(config.get("max_position_embeddings") or 512)
    st = read_json_object(folder / "sentence_bert_config.json", missing_ok=True)
    if isinstance(st.get("max_seq_length"), int) and st["max_seq_length"] > 0:
        return min(int(st["max_seq_length"]), positions)
    tok = read_json_object(folder / "tokenizer_config.json", missing_ok=True)
    limit = tok.get("model_max_length")
    if isinstance(limit, int | float) and 0 < limit < 1e9:  # HF writes a huge sentinel for "no limit"
        return min(int(limit), positions)
    return positions
