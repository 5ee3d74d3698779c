"""(query, document) pairs -> relevance scores with a BERT cross-encoder, one compiled program per bucket.

The same encoder as the embedder (`models/bert.py`'s layers, float32), with two differences a
cross-encoder needs: token type ids (0 for the query segment, 1 for the document, as the tokenizer's
pair template assigns them; BERT's type embedding is how the model tells the two apart) and the
classifier head instead of pooling (`formats/cross_encoder.py`): `[CLS]` -> pooler `tanh(Wh + b)` ->
classifier -> the activation sentence-transformers applies (Sigmoid for a one-label model); a `bert` GGUF
reranker's head comes from `formats/gguf_rerank.py` (llama.cpp's rank pooling, `cls.*` tensors). Pairs
are tokenized by the model's own tokenizer with `longest_first` truncation to the model's maximum
length, exactly the call `CrossEncoder.predict` makes, so scores match it.

Batching is the embedder's: pairs sorted by length, batches padded to power-of-two buckets, each
bucket compiled once, every batch dispatched before any result is read. Like the embedder, a
`Reranker` holds device state and is called from one thread at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from inferflux.engine.model_runner import pick_bucket, power_of_two_buckets
from inferflux.formats.cross_encoder import Activation, ClassifierHead, load_classifier_head
from inferflux.formats.encoder import EncoderModel
from inferflux.formats.gguf_rerank import load_gguf_classifier_head
from inferflux.models.bert import BertModel, layer_norm

log = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (batch size, sequence length)
Pair = tuple[list[int], list[int]]  # token ids, token type ids
HIGHEST = jax.lax.Precision.HIGHEST


class Reranker:
    """Scores text pairs with one cross-encoder (`EncoderModel` + `ClassifierHead`)."""

    def __init__(self, model: EncoderModel, head: ClassifierHead, max_batch_size: int = 32,
                 min_seq_bucket: int = 16) -> None:
        self.model, self.head = model, head
        self.max_length = min(head.max_length, model.config.max_position)
        self.batch_buckets = power_of_two_buckets(1, max_batch_size)
        self.seq_buckets = power_of_two_buckets(min(min_seq_bucket, self.max_length), self.max_length)
        # A private copy of the tokenizer with the truncation CrossEncoder asks for (the shared one has none).
        self._tokenizer = tokenizers.Tokenizer.from_str(model.tokenizer.backend.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        weights = {name: jnp.asarray(value, jnp.float32) for name, value in model.weights.items()}
        head_weights = {name: jnp.asarray(value, jnp.float32) for name, value in head.weights.items()}
        graphdef, self.state = nnx.split(BertModel(model.config, weights))
        self.head_state = head_weights
        self._score_fn = jax.jit(_make_score(graphdef, head.activation, model.config.layer_norm_eps))
        self._executables: dict[Bucket, Any] = {}

    @property
    def num_labels(self) -> int:
        return self.head.num_labels

    def tokenize(self, pairs: Sequence[tuple[str, str]]) -> list[Pair]:
        """`[CLS] a [SEP] b [SEP]` ids and type ids per pair, truncated longest-first to the maximum length."""
        lower = self.model.lowercase_input
        encodings = self._tokenizer.encode_batch(
            [(a.lower(), b.lower()) if lower else (a, b) for a, b in pairs], add_special_tokens=True)
        return [(list(e.ids), list(e.type_ids)) for e in encodings]

    def score_texts(self, pairs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, int]:
        """`[N, num_labels]` float32 scores (after the model's activation) in input order, and the tokens read."""
        encoded = self.tokenize(pairs)
        return self.score(encoded), sum(len(ids) for ids, _ in encoded)

    def cut_text(self, text: str, max_tokens: int) -> str:
        """`text` up to the end of its `max_tokens`-th token (Cohere's `max_tokens_per_doc`)."""
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        out = np.zeros((len(pairs), self.num_labels), np.float32)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
        step = self.batch_buckets[-1]
        pending = []
        for start in range(0, len(order), step):  # dispatch every batch first; JAX runs them asynchronously
            rows = order[start : start + step]
            pending.append((rows, self._run([pairs[i] for i in rows])))
        for rows, scores in pending:
            out[rows] = np.asarray(scores)[: len(rows)]
        return out

    def _run(self, batch: Sequence[Pair]) -> jax.Array:
        bucket = (pick_bucket(self.batch_buckets, len(batch)),
                  pick_bucket(self.seq_buckets, max(len(ids) for ids, _ in batch)))
        ids = np.zeros(bucket, np.int32)
        types = np.zeros(bucket, np.int32)
        mask = np.zeros(bucket, bool)
        for row, (tokens, type_ids) in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            types[row, : len(tokens)] = type_ids
            mask[row, : len(tokens)] = True
        return self._executable(bucket)(self.state, self.head_state, ids, types, mask)

    def _executable(self, bucket: Bucket) -> Any:
        exe = self._executables.get(bucket)
        if exe is None:
            ints = jax.ShapeDtypeStruct(bucket, jnp.int32)
            exe = self._score_fn.lower(self.state, self.head_state, ints, ints,
                                       jax.ShapeDtypeStruct(bucket, jnp.bool_)).compile()
            self._executables[bucket] = exe
        return exe


def apply_activation(logits: jax.Array, activation: Activation) -> jax.Array:
    if activation == "sigmoid":
        return jax.nn.sigmoid(logits)
    if activation == "tanh":
        return jnp.tanh(logits)
    return logits


def _make_score(graphdef: nnx.GraphDef, activation: Activation, eps: float):
    def score(state: nnx.State, head: dict[str, jax.Array], ids: jax.Array, types: jax.Array,
              mask: jax.Array) -> jax.Array:
        bert = nnx.merge(graphdef, state)
        t = ids.shape[1]
        x = (jnp.take(bert.embed.get_value(), ids, axis=0) + bert.pos_embed.get_value()[None, :t]
             + jnp.take(bert.type_embed.get_value(), types, axis=0))
        x = layer_norm(x, bert.embed_norm.get_value(), bert.embed_norm_bias.get_value(), eps)
        for layer in bert.layers:
            x = layer(x, mask)
        # The head is two tiny matmuls: full float32 on every backend (no TF32/bf16 passes), so scores track
        # sentence-transformers' to 1e-4 wherever the encoder layers do. A GGUF head may lack either part
        # (formats/gguf_rerank.py): it is skipped, as llama.cpp's rank pooling skips it.
        logits = x[:, 0]
        if "pooler" in head:
            logits = jnp.tanh(jnp.dot(logits, head["pooler"].T, precision=HIGHEST) + head["pooler_bias"])
        if "classifier" in head:
            logits = jnp.dot(logits, head["classifier"].T, precision=HIGHEST) + head["classifier_bias"]
        return apply_activation(logits, activation)

    return score


def load_reranker(path: str | Path, model: EncoderModel) -> Reranker | None:
    """A `Reranker` for a cross-encoder folder or a rank-pooling `bert` GGUF (its head read from `path`), else None."""
    head = load_classifier_head(path) or load_gguf_classifier_head(path)
    return None if head is None else Reranker(model, head)
