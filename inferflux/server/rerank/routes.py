"""`POST /v1/rerank`, `/rerank`, `/v2/rerank`, `/v1/score`: bodies -> pairs -> `score_pairs` -> each shape."""

from __future__ import annotations

from typing import Any

from inferflux.server.errors import bad_request
from inferflux.server.http import read_body
from inferflux.server.openapi import documented
from inferflux.server.rerank import bp
from inferflux.server.rerank.bodies import RerankRequest, RerankV2Request, ScoreRequest
from inferflux.server.rerank.scoring import ranked, score_pairs


@bp.post("/v1/rerank")
@documented(RerankRequest, "Rerank documents against a query (Jina / Cohere v1 / vLLM)")
async def rerank() -> Any:
    body = await read_body(RerankRequest)
    texts = [_document_text(d, i, body.rank_fields) for i, d in enumerate(body.documents)]
    scored = await score_pairs(body.model, [(body.query, t) for t in texts])
    results = []
    for i in ranked(scored.scores, body.top_n):
        item: dict[str, Any] = {"index": i, "relevance_score": float(scored.scores[i])}
        if body.return_documents:
            doc = body.documents[i]
            item["document"] = doc if isinstance(doc, dict) else {"text": doc}
        results.append(item)
    return {"id": scored.id, "model": scored.model, "results": results,
            "usage": {"prompt_tokens": scored.num_tokens, "total_tokens": scored.num_tokens},
            "meta": _meta("1", len(texts))}


@bp.post("/rerank")
@documented(RerankRequest, "Rerank documents against a query (Jina's path, as llama.cpp serves it)")
async def rerank_bare() -> Any:
    return await rerank()


@bp.post("/v2/rerank")
@documented(RerankV2Request, "Rerank documents against a query (Cohere v2)")
async def rerank_v2() -> Any:
    body = await read_body(RerankV2Request)
    scored = await score_pairs(body.model, [(body.query, d) for d in body.documents], body.max_tokens_per_doc)
    results = [{"index": i, "relevance_score": float(scored.scores[i])} for i in ranked(scored.scores, body.top_n)]
    return {"id": scored.id, "results": results, "meta": _meta("2", len(body.documents))}


@bp.post("/v1/score")
@documented(ScoreRequest, "Score text pairs with a cross-encoder (vLLM's text_1 / text_2)")
async def score() -> Any:
    body = await read_body(ScoreRequest)
    left = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    right = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if not left or not right:
        raise bad_request("text_1 and text_2 must not be empty", param="text_1" if not left else "text_2")
    if len(left) == 1:
        left = left * len(right)  # one to many
    elif len(left) != len(right):
        raise bad_request(f"text_1 has {len(left)} items and text_2 {len(right)}: give one text_1, or lists of the "
                          "same length", param="text_2")
    scored = await score_pairs(body.model, list(zip(left, right, strict=True)))
    return {"id": f"score-{scored.id}", "object": "list", "created": scored.created, "model": scored.model,
            "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scored.scores)],
            "usage": {"prompt_tokens": scored.num_tokens, "total_tokens": scored.num_tokens,
                      "completion_tokens": 0}}


def _document_text(doc: str | dict[str, Any], index: int, rank_fields: list[str] | None) -> str:
    """A document's text: a string, an object's `text`, or Cohere's `rank_fields` joined as `field: value` lines."""
    if isinstance(doc, str):
        return doc
    if rank_fields:
        missing = [f for f in rank_fields if not isinstance(doc.get(f), str)]
        if missing:
            raise bad_request(f"document {index} has no string field {missing[0]!r} named in rank_fields",
                              param="documents")
        return "\n".join(f"{f}: {doc[f]}" for f in rank_fields)
    text = doc.get("text")
    if not isinstance(text, str):
        raise bad_request(f"document {index} is an object without a string `text` field", param="documents")
    return text


def _meta(version: str, documents: int) -> dict[str, Any]:
    """Cohere's `meta`: one search unit per request of up to 100 documents, as Cohere bills."""
    return {"api_version": {"version": version}, "billed_units": {"search_units": -(-documents // 100)}}
