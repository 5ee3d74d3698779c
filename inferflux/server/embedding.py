"""The one embedding path: every embedding route of every dialect goes through `embed()`.

BERT-family encoders run through the embedder, LLMs through the engine's embedding mode. Vectors
are L2-normalized (what OpenAI and Ollama return). `dimensions` keeps the first d components and
re-normalizes (Matryoshka truncation); it is accepted for every model, since model files do not say
whether a model was trained for it. Inputs longer than the model's maximum are refused with the
numbers, unless `truncate` (or vLLM's `truncate_prompt_tokens`) asks to cut them.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from inferflux.engine.embedder import truncate_dimensions
from inferflux.server import record
from inferflux.server.access import limits_http
from inferflux.server.errors import bad_request
from inferflux.server.handle import ModelHandle
from inferflux.server.http import server_state
from inferflux.server.policy import guard as policy

Inputs = str | list[str] | list[int] | list[list[int]]


@dataclasses.dataclass
class EmbeddingSpec:
    model: str | None
    inputs: Inputs
    truncate: bool = False  # cut inputs to the model's maximum length instead of refusing them
    truncate_tokens: int | None = None  # keep at most this many tokens (the first ones)
    dimensions: int | None = None
    keep_alive: float | None = None


@dataclasses.dataclass
class Embeddings:
    vectors: np.ndarray  # float32 [N, d], L2-normalized
    num_tokens: int
    handle: ModelHandle  # released already: for its name and facts only
    load_seconds: float
    seconds: float


async def embed(spec: EmbeddingSpec) -> Embeddings:
    """Acquire the model, tokenize, compute and normalize; the handle is released before this returns."""
    started = time.monotonic()
    handle = await server_state().acquire(spec.model, spec.keep_alive)
    entry = record.current()
    if entry is not None:
        entry.model = handle.name
    try:
        # The policy's pre-hooks on the text inputs (server/policy/): PII scrubbed, or a 400 for block/filters.
        spec.inputs = policy.embedding_inputs(spec.inputs, handle.name)
        lists = input_ids(spec, handle)
        limits_http.admit_tokens(sum(len(ids) for ids in lists))  # the tenant's tokens per minute, or 429
        vectors = await compute(handle, lists)
    finally:
        handle.release()
    if entry is not None:
        entry.add_usage(sum(len(ids) for ids in lists), 0)
    if spec.dimensions is not None:
        if not 1 <= spec.dimensions <= vectors.shape[-1]:
            raise bad_request(f"dimensions must be between 1 and {vectors.shape[-1]}", param="dimensions")
        vectors = truncate_dimensions(vectors, spec.dimensions)
    return Embeddings(np.asarray(vectors, np.float32), sum(len(ids) for ids in lists), handle, handle.load_seconds,
                      time.monotonic() - started)


def input_ids(spec: EmbeddingSpec, handle: ModelHandle) -> list[list[int]]:
    """Token ids per input, truncated or checked against the model's maximum length."""
    raw = spec.inputs
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise bad_request("`input` is empty", param="input")
    # An LLM needs one position left after the input; an encoder can use its whole window.
    limit = handle.served.embed_limit
    keep = spec.truncate_tokens or (limit if spec.truncate else None)
    if keep is not None and not 1 <= keep <= limit:
        raise bad_request(f"truncate_prompt_tokens must be between 1 and {limit}", param="truncate_prompt_tokens")
    lists: list[list[int]]
    if all(isinstance(x, int) for x in raw):
        lists = [[int(x) for x in raw]]  # type: ignore[arg-type]
    elif all(isinstance(x, str) for x in raw):
        try:  # an encoder adds [CLS]/[SEP] and truncates keeping the closing [SEP]
            lists = handle.served.encode_texts([str(x) for x in raw], keep)
        except ValueError as exc:
            raise bad_request(f"{exc}; or set `truncate: true`", param="input",
                              code="context_length_exceeded") from None
        keep = None
    else:
        lists = [handle.tokenizer.encode(x) if isinstance(x, str) else [int(t) for t in x]  # type: ignore[union-attr]
                 for x in raw]
    out = []
    for i, ids in enumerate(lists):
        if not ids:
            raise bad_request(f"input {i} is empty", param="input")
        if keep is not None:
            ids = ids[:keep]
        elif len(ids) > limit:
            raise bad_request(f"input {i} has {len(ids)} tokens; this model takes at most {limit}. "
                              "Shorten it or set `truncate: true`.", param="input", code="context_length_exceeded")
        out.append(ids)
    return out


async def compute(handle: ModelHandle, lists: list[list[int]]) -> np.ndarray:
    # Engine errors (bad ids, a dead engine) map to 4xx/503 in the app's error handler.
    pooling = server_state().config.runtime.embedding_pooling  # "mean" or "last": checked when the config loaded
    return await handle.served.embed(lists, pooling)  # type: ignore[arg-type]
