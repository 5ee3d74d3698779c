"""Request plumbing every dialect shares: the server state, JSON bodies, typed bodies.

`read_body(Model)` answers an unknown model before it validates anything else: `{"model": "nope",
"messages": []}` is a 404 `model_not_found`, as vLLM and Ollama answer it (clients that pull on a
404 rely on that). Validation errors are 400s naming the field, raised as `APIError` so every
dialect's error shape applies.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import current_app, request

from inferflux.server.errors import bad_request
from inferflux.server.state import ServerState

M = TypeVar("M", bound=BaseModel)


def server_state() -> ServerState:
    return current_app.extensions["inferflux"]


def parse_json(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"invalid value for `{param}`: {first['msg']}", param=param) from None


async def json_body() -> dict[str, Any]:
    return parse_json(await request.get_data())


async def read_body(model: type[M], model_keys: tuple[str, ...] = ("model",)) -> M:
    """The body as `model`; a named model that does not exist is a 404 before anything else is checked."""
    data = await json_body()
    name = next((data[k] for k in model_keys if isinstance(data.get(k), str) and data[k]), None)
    if name is not None:
        await server_state().pool.target(name)
    return validate(model, data)
