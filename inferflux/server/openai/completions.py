"""`POST /v1/completions` (SSE or JSON)."""

from __future__ import annotations

from typing import Any

from inferflux.server.http import read_body
from inferflux.server.openai import bp
from inferflux.server.openai_compat.bodies import CompletionRequest
from inferflux.server.openai_compat.completions import completion_response
from inferflux.server.openapi import documented


@bp.post("/v1/completions")
@documented(CompletionRequest, "Text completion (OpenAI)", streams=True)
async def completions() -> Any:
    return await completion_response(await read_body(CompletionRequest))
