"""The classifier head of a llama.cpp `bert` GGUF reranker (rank pooling), as a `ClassifierHead`.

llama.cpp scores a pair with rank pooling (`LLAMA_POOLING_TYPE_RANK`, `bert.pooling_type = 4`): the
[CLS] state through `cls.weight`/`cls.bias` and tanh (BERT's pooler dense), then
`cls.output.weight`/`cls.output.bias` (the classifier). Both are optional there (jina-reranker-v1
has no `cls.output`; a `BertForSequenceClassification` converted by llama.cpp's own converter has
no `cls`, its pooler dropped), and so they are here: a missing part is skipped exactly as
llama.cpp's graph skips it, so a file scores as llama.cpp scores it. Only a file that keeps the
pooler (one written by `inferctl convert`, `convert/bert_gguf.py`) reproduces
`CrossEncoder.predict` of the folder it came from.

A file is a reranker when its pooling type is rank, or when it names none and carries a
`cls.output` head (what llama.cpp's converter writes for a sequence classifier; llama-server
serves such a file with `--reranking`). A file that declares mean/cls/last pooling is an
embedding model whatever tensors it carries. What CrossEncoder applies to the logits is not a GGUF
key: `inferflux.cross_encoder.activation` when the file has it, else CrossEncoder's default
(Sigmoid for one label, Identity for more). llama.cpp itself returns the raw logit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferflux.errors import ModelFormatError
from inferflux.formats.cross_encoder import ACTIVATIONS, Activation, ClassifierHead
from inferflux.formats.gguf_file import GGUFFile
from inferflux.formats.quants import dequantize_raw
from inferflux.formats.weights import QuantizedWeight

RANK = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK
ACTIVATION_KEY = "inferflux.cross_encoder.activation"
MAX_LENGTH_KEY = "inferflux.cross_encoder.max_length"
HEAD_TENSORS = {  # ClassifierHead's names -> llama.cpp's
    "pooler": "cls.weight", "pooler_bias": "cls.bias",
    "classifier": "cls.output.weight", "classifier_bias": "cls.output.bias",
}


def is_gguf_reranker(file: GGUFFile) -> bool:
    """Rank pooling, or no pooling type and a `cls.output` head (llama.cpp's converted classifiers)."""
    pooling = file.metadata.get("bert.pooling_type")
    if pooling is None:
        return "cls.output.weight" in file.tensors
    return int(pooling) == RANK


def load_gguf_classifier_head(path: str | Path) -> ClassifierHead | None:
    """The rank head of a `bert` GGUF file, or None for anything else (a folder, an embedding GGUF)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    file = GGUFFile(path)
    if file.metadata.get("general.architecture") != "bert" or not is_gguf_reranker(file):
        return None
    hidden = int(file.metadata.get("bert.embedding_length") or 0)
    weights: dict[str, np.ndarray] = {}
    for part in ("pooler", "classifier"):
        name = HEAD_TENSORS[part]
        if name not in file.tensors:
            continue
        weights[part] = _float32(file, name)
        bias = HEAD_TENSORS[f"{part}_bias"]  # llama.cpp adds a bias only where the file has one
        weights[f"{part}_bias"] = (_float32(file, bias) if bias in file.tensors
                                   else np.zeros(weights[part].shape[0], np.float32))
    if not weights:
        raise ModelFormatError(path, "a rank-pooling (reranker) file needs 'cls.weight' or 'cls.output.weight'")
    pooler, classifier = weights.get("pooler"), weights.get("classifier")
    if pooler is not None and pooler.shape[1] != hidden:
        raise ModelFormatError(path, f"cls.weight has shape {pooler.shape}, expected (*, {hidden})")
    features = hidden if pooler is None else pooler.shape[0]
    if classifier is not None and classifier.shape[1] != features:
        raise ModelFormatError(path, f"cls.output.weight has shape {classifier.shape}, expected (*, {features})")
    labels = (classifier if classifier is not None else pooler).shape[0]  # type: ignore[union-attr]
    return ClassifierHead(weights=weights, num_labels=int(labels), activation=_activation(file, labels),
                          max_length=_max_length(file))


def _float32(file: GGUFFile, name: str) -> np.ndarray:
    weight = file.weight(name)
    if isinstance(weight, QuantizedWeight):
        return np.asarray(dequantize_raw(weight.raw, weight.qtype, weight.shape, name=name, path=file.path),
                          np.float32)
    return np.asarray(weight, np.float32)


def _activation(file: GGUFFile, labels: int) -> Activation:
    name = file.metadata.get(ACTIVATION_KEY)
    if name is None:
        return "sigmoid" if labels == 1 else "identity"
    known = set(ACTIVATIONS.values())
    if name not in known:
        raise ModelFormatError(file.path, f"unsupported {ACTIVATION_KEY} {name!r} "
                                          f"(supported: {', '.join(sorted(known))})")
    return name  # type: ignore[no-any-return]


def _max_length(file: GGUFFile) -> int:
    positions = int(file.metadata.get("bert.context_length") or 512)
    value = file.metadata.get(MAX_LENGTH_KEY)
    return min(int(value), positions) if isinstance(value, int) and value > 0 else positions
