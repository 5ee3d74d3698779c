"""LM Studio's native REST API v1 (LM Studio 0.4): `/api/v1/models`, `/models/load`, `/models/unload`, `/chat`.

What LM Studio's own tools and scripts call on port 1234 (`inferctl serve --lmstudio-port 1234` adds that
listener). A thin translation like every dialect: `chat.py` turns the body into a `GenerationSpec` and the
generation's events into LM Studio's `output` items (`reasoning`, `message`) and its named SSE events
(`chat.start`, `model_load.*`, `prompt_processing.*`, `reasoning.*`, `message.*`, `error`, `chat.end`);
`models.py` lists, loads and unloads through the model pool.

Differences from LM Studio, by design or not yet done:
- Stateful chats are not kept: `store` is accepted but no `response_id` is returned, and a request that
  continues one (`previous_response_id`, `thread_id`) is a 400.
- `integrations` (MCP servers, plugins) are refused with a 400: the server runs no tools.
- A load's `config` (context length, flash attention, ...) is accepted; the instance runs with the
  server's runtime settings, which the answer reports. A model loaded through `/models/load` stays loaded
  until `/models/unload`, as in LM Studio.
- `reasoning_output_tokens` counts the split-out reasoning text's tokens (the engine counts output tokens
  as one stream).
- The `model_load.progress` and `prompt_processing.progress` events are not sent (no progress is measured).

Errors are LM Studio's `{"error": {"type", "message", "code"?, "param"?}}`, the type from the status.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from inferflux.server.errors import APIError

bp = Blueprint("lmstudio_v1", __name__)

_ERROR_TYPES = {400: "invalid_request", 404: "model_not_found", 413: "invalid_request", 422: "invalid_request"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request" if status < 500 else "internal_error")


def ERROR_SHAPE(error: APIError) -> dict[str, Any]:  # noqa: N802 - every dialect's error shape has this name
    body: dict[str, Any] = {"type": error_type(error.status), "message": error.message}
    if error.code:
        body["code"] = error.code
    if error.param:
        body["param"] = error.param
    return {"error": body}


from inferflux.server.lmstudio.v1 import chat, models  # noqa: E402, F401 - register routes
