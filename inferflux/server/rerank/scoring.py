"""The one scoring path of the rerank and score routes: model -> cross-encoder -> one score per pair."""

from __future__ import annotations

import dataclasses
import time
import uuid

import numpy as np

from inferflux.server import record
from inferflux.server.access import limits_http
from inferflux.server.errors import bad_request
from inferflux.server.handle import Encoder, ModelHandle
from inferflux.server.http import server_state


@dataclasses.dataclass
class Scored:
    scores: np.ndarray  # float32 [N], one per pair, in input order
    num_tokens: int  # every pair's tokens, [CLS]/[SEP] included
    model: str  # the served name of the model that scored them
    id: str
    created: int


async def score_pairs(model: str | None, pairs: list[tuple[str, str]], max_doc_tokens: int | None = None) -> Scored:
    """Acquire the model, check it is a one-label cross-encoder, score every pair off the event loop."""
    handle = await server_state().acquire(model, None)
    entry = record.current()
    if entry is not None:
        entry.model = handle.name
    try:
        served = _cross_encoder(handle)
        reranker = served.reranker
        assert reranker is not None
        if max_doc_tokens is not None:
            pairs = [(q, reranker.cut_text(d, max_doc_tokens)) for q, d in pairs]
        # The tenant's tokens per minute (or 429), counted as the model will read the pairs.
        limits_http.admit_tokens(sum(len(ids) for ids, _ in reranker.tokenize(pairs)))
        scores, tokens = await served.score_pairs(pairs)
    finally:
        handle.release()
    if entry is not None:
        entry.add_usage(tokens, 0)
    return Scored(scores[:, 0].astype(np.float32), tokens, handle.name, uuid.uuid4().hex, int(time.time()))


def _cross_encoder(handle: ModelHandle) -> Encoder:
    served = handle.served
    if not isinstance(served, Encoder) or served.reranker is None:
        raise bad_request(f"model {handle.name!r} is not a cross-encoder: rerank and score need a "
                          "BERT-family *ForSequenceClassification (CrossEncoder) model or a bert GGUF reranker",
                          param="model", code="model_not_supported")
    if served.reranker.num_labels != 1:
        raise bad_request(f"model {handle.name!r} has {served.reranker.num_labels} labels; rerank and score "
                          "need a one-label (relevance) cross-encoder", param="model", code="model_not_supported")
    return served


def ranked(scores: np.ndarray, top_n: int | None) -> list[int]:
    """Indices best first (ties keep input order), the first `top_n` of them."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return order[:top_n] if top_n is not None else order
