"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) on the same app and port.

So the `anthropic` client, Claude Code and agent frameworks written for Anthropic point at InferFlux
unchanged: `base_url` is the server, `x-api-key` is an InferFlux key (or anything, with auth off),
`anthropic-version` / `anthropic-beta` headers are accepted and ignored, and `model` is any name the
server serves. A thin translation like the other dialects: `bodies.py` turns the body into a
`GenerationSpec` (system + content blocks -> chat-template messages, tools -> the template's tools),
`encode.py` turns the generation's events into Anthropic's SSE events or, folded, one `message`.

Differences from Anthropic's API, by design or not yet done:
- `image` and `document` blocks are refused with a 400 (no vision models are served).
- `max_tokens` is capped to what fits the context window (Anthropic-style clients send one large value
  whatever the model), and a capped answer ends with `stop_reason: max_tokens`.
- `tool_choice` `any` / `tool` force a call by constraining the output to calls in the template's tool
  format (the engine's grammar, server/structured.py): one or more, or exactly one with
  `disable_parallel_tool_use` (which also keeps only the first call of an unforced answer); `none` keeps
  the tools in the prompt but never parses calls out of the text.
- `thinking` is the reasoning switch of server/reasoning.py (the template's `enable_thinking`): `disabled`
  off, `enabled` / `adaptive` on (at `output_config.effort` when given), absent the template's default,
  as the OpenAI endpoint renders it. `enabled` on a model that does not reason is a 400; `budget_tokens`
  is validated but not enforced. Reasoning the generation layer splits out (`ReasoningDelta`) becomes
  `thinking` blocks with an empty `signature`; thinking blocks sent back are dropped from the prompt,
  as Anthropic does for earlier turns.
- An assistant message last in `messages` is not continued as a prefill: the answer starts a new turn.
- `usage.input_tokens` counts the prompt tokens not served from the prefix cache; those are
  `cache_read_input_tokens` (so the two add up to `count_tokens`' answer).
- `temperature`, `top_p`, `top_k` are honoured (current clients send them with `extra_body`).
- `output_config.format` (`json_schema`) constrains the output to JSON valid against the schema.
- `metadata`, `service_tier`, `cache_control` and other fields Anthropic knows are accepted and ignored.

Errors are Anthropic's `{"type": "error", "error": {"type", "message"}}`, their type chosen by status.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from inferflux.server.errors import APIError

bp = Blueprint("anthropic", __name__)

# HTTP status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors); the client's exception
# classes are chosen by status, the type is what its users match on.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def ERROR_SHAPE(error: APIError) -> dict[str, Any]:  # noqa: N802 - every dialect's error shape has this name
    """Anthropic's error body: the type follows the status (a 401 is `authentication_error`, ...)."""
    return {"type": "error", "error": {"type": error_type(error.status), "message": error.message}}


from inferflux.server.anthropic import messages  # noqa: E402, F401 - register routes
