"""OpenAI's Responses API (`/v1/responses`): a thin translation over the generation layer.

`bodies.py` turns input items into chat messages and a `GenerationSpec`; `encode.py` turns the
generation's events into the typed event stream and the response object; `store.py` keeps
`store: true` responses per tenant in `state.db` (retrieve, delete, input items, and the
`previous_response_id` chain); `routes.py` wires them. Errors are OpenAI's error object.

Differences from OpenAI: no built-in tools (web search, files, computer use), no images or files
in input, no `background` mode, no `conversation` objects; `text.format` json_object / json_schema
and `tool_choice` "required" or a named function are enforced by the engine's grammar
(`engine/grammar.py`, `server/structured.py`); `reasoning.effort` is the chat template's thinking
switch (`enable_thinking`, `reasoning_effort`), ignored by templates without one;
`output_tokens_details.reasoning_tokens` is 0.
"""

from __future__ import annotations

from quart import Blueprint

from inferflux.server.errors import APIError

bp = Blueprint("responses", __name__)
ERROR_SHAPE = APIError.body

from inferflux.server.responses import routes  # noqa: E402, F401 - register routes
