"""LM Studio's REST API (`/api/v0/*`): the OpenAI wire format plus its `stats`, `model_info` and `runtime` fields.

LM Studio's OpenAI-compatible endpoints are our `/v1/*` as they are (its extras `top_k`, `repeat_penalty`,
`max_tokens: -1` and `ttl`, the idle seconds before the model unloads, are accepted there). Stored models
are listed with `state: "not-loaded"` until a request loads them. Its own SDKs' websocket protocol is
`server/lmstudio_sdk/`. Errors are OpenAI's error object, as LM Studio's are.
"""

from __future__ import annotations

from quart import Blueprint

from inferflux.server.errors import APIError

bp = Blueprint("lmstudio", __name__)
ERROR_SHAPE = APIError.body

from inferflux.server.lmstudio import generate, models  # noqa: E402, F401 - register routes
