"""Errors a client sees: domain errors map to an HTTP status here, once; each dialect picks the body shape.

`APIError` is an error already decided (status, message, kind, param, code). `to_api_error` maps
everything else the server can raise on purpose (a missing or bad API key -> 401, a key without
the route's scope -> 403, bad sampling values, a chat template that fails, a context that is too
long, the engine being gone, model store errors) to one, so no route
catches and re-raises domain errors itself. The app's error handler and the streaming encoders
both use it; the body shape is chosen by the dialect that serves the route (`ErrorShape`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from werkzeug.exceptions import HTTPException

from inferflux.errors import InferFluxError


class APIError(Exception):
    """An error to return to the client as is, with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, model: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.model = model  # the model name an unknown-model error is about (dialects word it their way)

    def body(self) -> dict[str, Any]:
        """OpenAI's error object (the default shape)."""
        return error_body(self.message, self.type, self.param, self.code)


ErrorShape = Callable[[APIError], dict[str, Any]]


class ContextLengthError(InferFluxError):
    """The prompt (plus the tokens asked for) does not fit the model's context window (a 400)."""


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, param=param, code="not_found")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", type="invalid_request_error", param="model",
                    code="model_not_found", model=model)


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable")


def to_api_error(exc: BaseException) -> APIError | None:
    """The client-facing error for `exc`, or None for a bug (a 500 the caller logs)."""
    # Imported here: the engine and store import nothing of the server, and the server's modules import this one.
    from inferflux.engine.engine import EngineDeadError
    from inferflux.engine.sampling_params import SamplingParamsError
    from inferflux.formats.chat_template import ChatTemplateError
    from inferflux.server.access.errors import (
        AuthenticationError,
        KeyStoreError,
        NotFoundError,
        PermissionDenied,
        RateLimited,
    )
    from inferflux.store import ModelNotFoundError, StoreError
    from inferflux.store.signing import SignatureError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AuthenticationError):
        return APIError(401, str(exc), type="authentication_error", code="invalid_api_key")
    if isinstance(exc, PermissionDenied):
        return APIError(403, str(exc), type="permission_error", code="insufficient_scope")
    if isinstance(exc, RateLimited):
        return APIError(429, str(exc), type="rate_limit_exceeded", code="rate_limit_exceeded")
    if isinstance(exc, NotFoundError):
        return not_found(str(exc))
    if isinstance(exc, KeyStoreError):
        return bad_request(str(exc))
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, SamplingParamsError):
        return bad_request(str(exc))
    if isinstance(exc, ChatTemplateError):
        return bad_request(str(exc), param="messages")
    if isinstance(exc, EngineDeadError):
        return unavailable(str(exc))
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, SignatureError):  # security.require_signed_models refused the model
        return APIError(403, str(exc), type="permission_error", param="model", code="model_not_signed")
    if isinstance(exc, StoreError | InferFluxError):
        return bad_request(str(exc))
    if isinstance(exc, HTTPException):
        code = exc.code or 500
        kind = "invalid_request_error" if code < 500 else "server_error"
        return APIError(code, exc.description or str(exc), type=kind)
    return None
