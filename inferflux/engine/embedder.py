"""Text -> embedding vectors with a BERT-family encoder, one compiled program per shape bucket.

Inputs of any count and length are sorted by length, cut into batches of at
most `max_batch_size`, and each batch is right-padded to a bucket: batch size
and sequence length each rounded up to a power of two (bounded by
`max_batch_size` and the model's `max_seq_length`). Every bucket is compiled
once with `jit(...).lower(...).compile()` and kept, exactly as the model runner
does for decoder steps, so a server embeds a steady stream of requests
without ever tracing again. Pooling and normalization run inside the compiled
program, so only `[B, H]` floats come back to the host.

Sorting by length keeps padding small, and the attention mask makes padding
invisible, so an input's vector does not depend on what it was batched with.

Like `ModelRunner`, an `Embedder` owns device state and is meant to be called
from one thread at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inferflux.engine.model_runner import pick_bucket, power_of_two_buckets
from inferflux.formats.encoder import EncoderModel
from inferflux.models.bert import BertModel, PoolingMode, l2_normalize, pool

log = logging.getLogger(__name__)

EmbedBucket = tuple[int, int]  # (batch size, sequence length)


class Embedder:
    """Embeds token id lists (or texts) with one `EncoderModel`.

    max_batch_size: inputs per compiled call (the largest batch bucket).
    min_seq_bucket: the smallest sequence bucket; short inputs share it rather than
        each length up to it getting its own program.
    """

    def __init__(self, model: EncoderModel, max_batch_size: int = 32, min_seq_bucket: int = 16) -> None:
        if max_batch_size < 1 or min_seq_bucket < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and min_seq_bucket ({min_seq_bucket}) must be >= 1")
        self.model = model
        self.max_seq_length = model.max_seq_length
        self.batch_buckets = power_of_two_buckets(1, max_batch_size)
        self.seq_buckets = power_of_two_buckets(min(min_seq_bucket, self.max_seq_length), self.max_seq_length)
        weights = {name: jnp.asarray(value, jnp.float32) for name, value in model.weights.items()}
        graphdef, self.state = nnx.split(BertModel(model.config, weights))
        self._embed_fn = jax.jit(_make_embed(graphdef, model.pooling, model.normalize))
        self._executables: dict[EmbedBucket, Any] = {}
        self.compile_count = 0  # programs compiled so far (each bucket once)

    @property
    def dimensions(self) -> int:
        return self.model.config.hidden_size

    # --- tokens ----------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], truncate: int | None = None) -> list[list[int]]:
        """Token ids per text, `[CLS] ... [SEP]` included.

        truncate=None: an input longer than `max_seq_length` is a ValueError naming both numbers
        (silently embedding a prefix would misrepresent the text). truncate=n: keep at most
        min(n, max_seq_length) tokens, cutting the text's end and keeping the closing [SEP], as
        sentence-transformers does.
        """
        limit = self.max_seq_length if truncate is None else min(truncate, self.max_seq_length)
        specials = self._num_special()
        if limit <= specials:
            raise ValueError(f"truncate={truncate} leaves no room for text: the model adds {specials} special tokens")
        out = []
        for i, body in enumerate(self._bodies(texts)):
            if len(body) + specials > limit:
                if truncate is None:
                    raise ValueError(
                        f"input {i} has {len(body) + specials} tokens, more than the model's maximum of "
                        f"{self.max_seq_length}; shorten it or ask for truncation")
                body = body[: limit - specials]
            out.append(self._with_specials(body))
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model would see it untruncated ([CLS] and [SEP] included)."""
        specials = self._num_special()
        return [len(body) + specials for body in self._bodies(texts)]

    def _bodies(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text without special tokens (text that spells [SEP] etc. is read as that token)."""
        lower = self.model.lowercase_input
        return [self.model.tokenizer.encode(t.lower() if lower else t, add_special_tokens=False) for t in texts]

    def _with_specials(self, body: list[int]) -> list[int]:
        tok = self.model.tokenizer
        return ([tok.bos_id] if tok.add_bos else []) + body + ([tok.eos_id] if tok.add_eos else [])  # type: ignore

    def _num_special(self) -> int:
        return len(self._with_specials([]))

    # --- vectors ---------------------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str], truncate: int | None = None) -> np.ndarray:
        """`tokenize` then `embed`: `[len(texts), H]` float32."""
        return self.embed(self.tokenize(texts, truncate))

    def embed(self, token_id_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """`[N, H]` float32 vectors, pooled (and normalized if the model says so), in input order."""
        self._check_inputs(token_id_lists)
        out = np.zeros((len(token_id_lists), self.dimensions), np.float32)
        order = sorted(range(len(token_id_lists)), key=lambda i: len(token_id_lists[i]))
        step = self.batch_buckets[-1]
        pending = []
        for start in range(0, len(order), step):  # dispatch every batch first; JAX runs them asynchronously
            rows = order[start : start + step]
            pending.append((rows, self._run([token_id_lists[i] for i in rows])))
        for rows, vectors in pending:
            out[rows] = np.asarray(vectors)[: len(rows)]
        return out

    def _run(self, batch: Sequence[Sequence[int]]) -> jax.Array:
        bucket = self.bucket_for(len(batch), max(len(ids) for ids in batch))
        ids, mask = _pack(batch, bucket)
        return self._executable(bucket)(self.state, ids, mask)

    def _check_inputs(self, token_id_lists: Sequence[Sequence[int]]) -> None:
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(token_id_lists):
            if not 0 < len(ids) <= self.max_seq_length:
                raise ValueError(f"input {i} has {len(ids)} tokens; the model takes 1 to {self.max_seq_length}")
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"input {i} has a token id outside the vocabulary [0, {vocab})")

    # --- buckets and compilation -----------------------------------------------------------------

    def bucket_for(self, batch_size: int, seq_len: int) -> EmbedBucket:
        return pick_bucket(self.batch_buckets, batch_size), pick_bucket(self.seq_buckets, seq_len)

    def all_buckets(self) -> list[EmbedBucket]:
        return [(b, t) for b in self.batch_buckets for t in self.seq_buckets]

    @property
    def compiled_buckets(self) -> set[EmbedBucket]:
        return set(self._executables)

    def warmup(self, buckets: Sequence[EmbedBucket] | None = None) -> int:
        """Compile `buckets` (default: all) now rather than on first use; returns how many were compiled."""
        todo = [b for b in (buckets if buckets is not None else self.all_buckets()) if b not in self._executables]
        for bucket in todo:
            self._executable(bucket)
        log.info("compiled %d embedding buckets", len(todo))
        return len(todo)

    def _executable(self, bucket: EmbedBucket) -> Any:
        exe = self._executables.get(bucket)
        if exe is None:
            shape = jax.ShapeDtypeStruct(bucket, jnp.int32), jax.ShapeDtypeStruct(bucket, jnp.bool_)
            exe = self._executables[bucket] = self._embed_fn.lower(self.state, *shape).compile()
            self.compile_count += 1
        return exe


def truncate_dimensions(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first `dimensions` components and rescale to unit length (Matryoshka-style shortening).

    Only meaningful for models trained for it (their leading dimensions carry the most
    information); for others it is a lossy projection. A zero row stays zero.
    """
    vectors = np.asarray(vectors, np.float32)
    if not 0 < dimensions <= vectors.shape[-1]:
        raise ValueError(f"dimensions must be between 1 and {vectors.shape[-1]}, got {dimensions}")
    short = vectors[..., :dimensions]
    norm = np.linalg.norm(short, axis=-1, keepdims=True)
    return short / np.maximum(norm, 1e-12)


def _make_embed(graphdef: nnx.GraphDef, pooling: PoolingMode, normalize: bool):
    def embed(state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = nnx.merge(graphdef, state)(ids, mask)
        vectors = pool(hidden, mask, pooling)
        return l2_normalize(vectors) if normalize else vectors

    return embed


def _pack(batch: Sequence[Sequence[int]], bucket: EmbedBucket) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids (pad id 0, never attended to) and the mask of real tokens, bucket-shaped."""
    ids = np.zeros(bucket, np.int32)
    mask = np.zeros(bucket, bool)
    for row, tokens in enumerate(batch):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = True
    return ids, mask
