"""The `/embedding` namespace's `embedString` (the SDK's `embed()`), over the one embedding path.

The vector is `/v1/embeddings`' for the same text (L2-normalized); a list given to `embed()` is one
call per string, as the SDK sends it.
"""

from __future__ import annotations

from typing import Any

from inferflux.server.embedding import EmbeddingSpec, embed
from inferflux.server.errors import bad_request
from inferflux.server.lmstudio_sdk.framing import ChannelHandler, Rpc
from inferflux.server.lmstudio_sdk.models import specified_model


async def embed_string(param: Any) -> dict[str, Any]:
    if not isinstance(param, dict) or not isinstance(param.get("inputString"), str):
        raise bad_request("`inputString` must be a string")
    result = await embed(EmbeddingSpec(model=specified_model(param.get("modelSpecifier")),
                                       inputs=param["inputString"]))
    return {"embedding": result.vectors[0].tolist()}


def embedding_endpoints() -> tuple[dict[str, Rpc], dict[str, ChannelHandler]]:
    return {"embedString": embed_string}, {}
