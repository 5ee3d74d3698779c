"""`POST /v1/embeddings`."""

from __future__ import annotations

from typing import Any

from inferflux.server.http import read_body
from inferflux.server.openai import bp
from inferflux.server.openai_compat.bodies import EmbeddingRequest
from inferflux.server.openai_compat.embeddings import embedding_response
from inferflux.server.openapi import documented


@bp.post("/v1/embeddings")
@documented(EmbeddingRequest, "Embeddings (OpenAI)")
async def embeddings() -> Any:
    return (await embedding_response(await read_body(EmbeddingRequest)))[0]
