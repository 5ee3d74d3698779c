"""Rerank and score for cross-encoder models: `/v1/rerank` + `/rerank`, `/v2/rerank`, `/v1/score`.

The shapes retrieval stacks already speak, so they point at InferFlux unchanged:
- `POST /v1/rerank` and `POST /rerank`: Jina's and Cohere v1's (the `cohere` client's `Client.rerank`),
  as vLLM and llama.cpp serve them: `query`, `documents` (strings or objects with `text`; Cohere's
  `rank_fields` picks and joins other fields), `top_n`, `return_documents` (default true) ->
  `{id, model, results: [{index, relevance_score, document?: {text}}], usage, meta}`, best first.
- `POST /v2/rerank`: Cohere v2's (`ClientV2.rerank`): `documents` are strings, no documents are
  returned; `max_tokens_per_doc` cuts each document before pairing.
- `POST /v1/score`: vLLM's `text_1` / `text_2`: one to one, one to many, or pairwise lists ->
  `{data: [{index, object: "score", score}], usage}` in input order.

Every route is one `score_pairs` call (`scoring.py`) on a cross-encoder (a `*ForSequenceClassification`
folder, `formats/cross_encoder.py`, or a `bert` GGUF reranker, `formats/gguf_rerank.py`); a relevance score is
what sentence-transformers' `CrossEncoder.predict` gives for the pair (the logit through the model's
activation, Sigmoid by default for one label). A model that is not a one-label cross-encoder is a 400 naming it.
Errors are OpenAI's object, as vLLM answers on these routes; the `cohere` client raises by status.
"""

from __future__ import annotations

from quart import Blueprint

from inferflux.server.errors import APIError

bp = Blueprint("rerank", __name__)
ERROR_SHAPE = APIError.body

from inferflux.server.rerank import routes  # noqa: E402, F401 - register routes
