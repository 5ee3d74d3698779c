"""OpenAI's API (`/v1/*`, plus vLLM's `/tokenize`, `/detokenize`, `/tokenizer_info`, `/version`).

Routes only translate: a typed body (`openai_compat.bodies`) in, the OpenAI wire format out
(`openai_compat`), everything between in the generation layer. Errors are OpenAI's error object.
"""

from __future__ import annotations

from quart import Blueprint

from inferflux.server.errors import APIError

bp = Blueprint("openai", __name__)
ERROR_SHAPE = APIError.body

from inferflux.server.openai import chat, completions, embeddings, lora, models  # noqa: E402, F401 - register routes
