"""`/api/embed` and the legacy `/api/embeddings`, over the one embedding path (`server/embedding.py`)."""

from __future__ import annotations

from typing import Any

from inferflux.server.embedding import EmbeddingSpec, embed
from inferflux.server.errors import bad_request
from inferflux.server.http import read_body
from inferflux.server.ollama import bp
from inferflux.server.ollama.bodies import EmbeddingsRequest, EmbedRequest
from inferflux.server.ollama.generate import ns
from inferflux.server.openapi import documented


@bp.post("/api/embed")
@documented(EmbedRequest, "Embeddings (Ollama)")
async def api_embed() -> Any:
    req = await read_body(EmbedRequest)
    texts = [req.input] if isinstance(req.input, str) else req.input
    texts = [t for t in texts if t] if isinstance(req.input, str) else texts
    if not texts:
        return {"model": req.model, "embeddings": []}
    if any(not t for t in texts):
        raise bad_request("`input` has an empty string")
    result = await embed(EmbeddingSpec(req.model, texts, truncate=req.truncate, dimensions=req.dimensions,
                                       keep_alive=req.keep_alive_seconds))
    return {"model": req.model, "embeddings": result.vectors.tolist(), "total_duration": ns(result.seconds),
            "load_duration": ns(result.load_seconds) if result.load_seconds else 0,
            "prompt_eval_count": result.num_tokens}


@bp.post("/api/embeddings")
@documented(EmbeddingsRequest, "One embedding (Ollama's legacy route)")
async def api_embeddings() -> Any:
    req = await read_body(EmbeddingsRequest)
    if not req.prompt:
        return {"embedding": []}
    result = await embed(EmbeddingSpec(req.model, [req.prompt], truncate=True, keep_alive=req.keep_alive_seconds))
    return {"embedding": result.vectors[0].tolist()}
