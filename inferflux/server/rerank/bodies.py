"""Request bodies of the rerank and score routes (pydantic: a mistyped field is a 400 naming it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # absent: the server's default model


class RerankRequest(_Body):
    """Jina / Cohere v1 / vLLM `/v1/rerank`."""

    query: str
    documents: list[str | dict[str, Any]] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    rank_fields: list[str] | None = None  # Cohere v1: which object fields to rank on, joined in this order
    max_chunks_per_doc: int | None = None  # Cohere v1: accepted, ignored (documents are truncated, not chunked)


class RerankV2Request(_Body):
    """Cohere v2 `/v2/rerank` (what `cohere.ClientV2.rerank` sends)."""

    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    max_tokens_per_doc: int | None = Field(default=None, ge=1)


class ScoreRequest(_Body):
    """vLLM `/v1/score`: text_1 against text_2 (one to one, one to many, or pairwise equal-length lists)."""

    text_1: str | list[str]
    text_2: str | list[str]
