"""Access errors: who the caller is (401) and what the caller may do (403), plus the key store's own.

They are domain errors like the generation layer's: raised where the decision is made and turned
into an HTTP status only by `server.errors.to_api_error`, so every dialect answers with its own
body shape (OpenAI's error object, Ollama's `{"error": ...}`) and the CLI prints them as one line.
"""

from __future__ import annotations

from inferflux.errors import InferFluxError


class AccessError(InferFluxError):
    """Base of the errors this package raises on purpose."""


class AuthenticationError(AccessError):
    """No key, an unknown key, or a revoked or expired one: 401 `authentication_error`.

    The message never repeats the presented key (it may be a real key pasted into the wrong place).
    """


class PermissionDenied(AccessError):
    """A valid key without the scope the route needs: 403 `permission_error`."""


class KeyStoreError(AccessError):
    """A bad admin request: a tenant that exists already, an unknown scope, a bad duration (400)."""


class NotFoundError(KeyStoreError):
    """The tenant or key an admin request names does not exist (404)."""


class RateLimited(AccessError):
    """A tenant over its requests or tokens per minute, or its concurrent requests: 429 `rate_limit_exceeded`.

    `rate_headers` are OpenAI's `x-ratelimit-*` and `Retry-After`, which the app's error handler sends with the
    429, so a client (the `openai` client's retry) knows when to come back.
    """

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.rate_headers = dict(headers or {})
