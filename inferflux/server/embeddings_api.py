"""`POST /v1/embeddings`: BERT-family encoders through the embedder, LLMs through the engine's embedding mode.

Vectors are L2-normalized (what OpenAI returns). `dimensions` keeps the first
d components and re-normalizes (Matryoshka truncation); it is accepted for
every model, since model files do not say whether a model was trained for it.
Inputs longer than the model's maximum are refused with the numbers, unless
`truncate: true` (or vLLM's `truncate_prompt_tokens`) asks to cut them.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from quart import Blueprint

from inferflux.engine.embedder import truncate_dimensions
from inferflux.engine.engine import EngineDeadError
from inferflux.engine.sampling_params import SamplingParamsError
from inferflux.server.errors import bad_request, unavailable
from inferflux.server.openai_api import acquire, body, server_state
from inferflux.server.protocol import EmbeddingRequest
from inferflux.server.state import ModelHandle

bp = Blueprint("embeddings", __name__)


def input_ids(req: EmbeddingRequest, handle: ModelHandle) -> list[list[int]]:
    """Token ids per input, truncated or checked against the model's maximum length."""
    raw = req.input
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise bad_request("`input` is empty", param="input")
    # An LLM needs one position left after the input; an encoder can use its whole window.
    limit = handle.max_model_len - (1 if handle.engine is not None else 0)
    keep = req.truncate_prompt_tokens or (limit if req.truncate else None)
    if keep is not None and not 1 <= keep <= limit:
        raise bad_request(f"truncate_prompt_tokens must be between 1 and {limit}", param="truncate_prompt_tokens")
    if all(isinstance(x, int) for x in raw):
        lists = [list(raw)]  # type: ignore[arg-type]
    elif handle.embedder is not None and all(isinstance(x, str) for x in raw):
        try:  # the embedder adds [CLS]/[SEP] and truncates keeping the closing [SEP]
            lists = handle.embedder.tokenize(raw, truncate=keep)
        except ValueError as exc:
            raise bad_request(f"{exc}; or set `truncate: true`", param="input",
                              code="context_length_exceeded") from None
        keep = None
    else:
        lists = [handle.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in raw]
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
    if handle.embedder is not None:
        return await asyncio.to_thread(handle.embed_encoder, lists)
    try:
        vectors = await handle.engine.embed(lists, server_state().config.runtime.embedding_pooling)
    except SamplingParamsError as exc:
        raise bad_request(str(exc), param="input") from None
    except EngineDeadError as exc:
        raise unavailable(str(exc)) from None
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


@bp.post("/v1/embeddings")
async def embeddings() -> Any:
    req = await body(EmbeddingRequest)
    handle = await acquire(req.model, req.ttl)
    try:
        lists = input_ids(req, handle)
        vectors = await compute(handle, lists)
    finally:
        handle.release()
    if req.dimensions is not None:
        if not 1 <= req.dimensions <= vectors.shape[-1]:
            raise bad_request(f"dimensions must be between 1 and {vectors.shape[-1]}", param="dimensions")
        vectors = truncate_dimensions(vectors, req.dimensions)
    vectors = np.asarray(vectors, np.float32)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
             else v.tolist()} for i, v in enumerate(vectors)]
    tokens = sum(len(ids) for ids in lists)
    return {"object": "list", "data": data, "model": handle.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
