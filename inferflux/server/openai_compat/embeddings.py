"""Embeddings in the OpenAI format (float lists or base64 little-endian float32)."""

from __future__ import annotations

import base64
from typing import Any

from inferflux.server.embedding import Embeddings, EmbeddingSpec, embed
from inferflux.server.keep_alive import parse_keep_alive
from inferflux.server.openai_compat.bodies import EmbeddingRequest


async def embedding_response(req: EmbeddingRequest) -> tuple[dict[str, Any], Embeddings]:
    """The `list` object, and the result it came from (for a dialect's extra fields)."""
    result = await embed(EmbeddingSpec(req.model, req.input, req.truncate, req.truncate_prompt_tokens,
                                       req.dimensions, parse_keep_alive(req.ttl)))
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
             else v.tolist()} for i, v in enumerate(result.vectors)]
    return {"object": "list", "data": data, "model": result.handle.name,
            "usage": {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens}}, result
