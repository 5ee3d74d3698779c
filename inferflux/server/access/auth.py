"""The access check every request passes before its route runs: key -> principal -> route scope.

Installed by `create_app` as a `before_request` (and `before_websocket`) hook after the origin,
body-size and preflight checks, so a CORS preflight (which browsers send without credentials) is
answered, and a request that fails here never reaches a dialect. With `security.auth: off` the
hook is not installed at all: nothing about a desktop server changes.

A key is read from `Authorization: Bearer <key>` (OpenAI's and Ollama's clients, LM Studio's
tools) or `x-api-key: <key>` (Anthropic's clients), on every route of every dialect. The decided
principal is left on `g.principal` for what comes later in the request path (limits, audit).

With `security.oidc.issuer` set, a bearer value that is not an `ifx-` key is an OpenID Connect JWT,
checked by `oidc.OidcVerifier` to the same `Principal` (key id `oidc:<sub>`); with `security.oidc.client_id`,
one that is not a JWT is introspected at the provider (`introspection.py`). The check may fetch the provider's
keys or call it, so then it runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Mapping

from quart import Quart, Response, current_app, g, request, websocket
from werkzeug.datastructures import Headers

from inferflux.server.access.errors import AuthenticationError, PermissionDenied
from inferflux.server.access.introspection import build_verifier
from inferflux.server.access.keys import KEY_PREFIX, Principal
from inferflux.server.access.keys_redis import AnyKeyStore, open_key_store
from inferflux.server.access.oidc import OidcVerifier
from inferflux.server.access.scopes import IN_BAND, PUBLIC, required_scope
from inferflux.server.errors import APIError, to_api_error

log = logging.getLogger(__name__)
_EXTENSION = "inferflux.keys"


def key_store(app: Quart | None = None) -> AnyKeyStore:
    """The app's key store (`$INFERFLUX_HOME/state.db`), opened on first use."""
    app = app or current_app
    store = app.extensions.get(_EXTENSION)
    if store is None:
        store = app.extensions[_EXTENSION] = open_key_store(app.extensions["inferflux"].config)
    return store


def install(app: Quart, public_metrics: bool) -> None:
    """Require a key with the route's scope on every request to `app` (security.auth: required)."""
    store = key_store(app)
    oidc = build_verifier(app.extensions["inferflux"].config)  # JWTs; opaque tokens too with a client id
    app.extensions["inferflux.oidc"] = oidc
    if oidc is not None:  # the provider's keys, fetched while the model loads; failures are logged
        threading.Thread(target=oidc.warm, name="oidc-jwks", daemon=True).start()
    if oidc is None and not store.keys():
        log.warning("security.auth is required and %s holds no API keys: every request will get 401 "
                    "(create one with `inferctl admin keys create --tenant T --scopes inference`)", store.path)

    @app.before_request
    async def check_request() -> None:
        if request.method == "OPTIONS" or request.url_rule is None:
            return  # a preflight, or no route: answered without running anything
        endpoint, headers = request.url_rule.endpoint, request.headers
        if oidc is None:
            g.principal = authorize(store, endpoint, headers, public_metrics)
        else:  # a token's check may fetch the provider's keys: off the event loop
            g.principal = await asyncio.to_thread(authorize, store, endpoint, headers, public_metrics, oidc)

    @app.before_websocket
    async def check_websocket() -> Response | None:
        # Answered here, not raised: the app's error handler works on HTTP requests. The handshake is
        # refused with the same status and OpenAI's error body (the WebSocket route is OpenAI's).
        if websocket.url_rule is None:
            return None
        if websocket.url_rule.endpoint in IN_BAND and presented_key(websocket.headers) is None:
            return None  # the key comes in the protocol's handshake, checked by the route (scopes.IN_BAND)
        try:
            g.principal = await asyncio.to_thread(authorize, store, websocket.url_rule.endpoint,
                                                  websocket.headers, public_metrics, oidc)
        except (AuthenticationError, PermissionDenied, APIError) as exc:
            error = to_api_error(exc)
            assert error is not None
            return Response(json.dumps(error.body()), status=error.status, content_type="application/json")
        return None


def presented_key(headers: Headers | Mapping[str, str]) -> str | None:
    """The key in `Authorization: Bearer ...` or `x-api-key`, or None."""
    get = headers.get
    auth = (get("Authorization") or "").strip()
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = (get("x-api-key") or "").strip()
    return key or None


def authorize(store: AnyKeyStore, endpoint: str, headers: Headers | Mapping[str, str],
              public_metrics: bool, oidc: OidcVerifier | None = None) -> Principal | None:
    """The request's principal, or None on a public route; AuthenticationError (401) or PermissionDenied (403).

    With `oidc`, a credential that is not an `ifx-` key is verified as a JWT (which may block on a fetch
    of the provider's keys, or raise `oidc.OidcUnavailable`, a 503).
    """
    scope = required_scope(endpoint, public_metrics)
    if scope == PUBLIC:
        return None
    secret = presented_key(headers)
    if secret is None:
        what = "an API key or an OIDC bearer token" if oidc is not None else "an API key"
        raise AuthenticationError(f"{what} is required: send `Authorization: Bearer <key>` or `x-api-key: <key>`")
    if oidc is not None and not secret.startswith(KEY_PREFIX):
        principal = oidc.verify(secret)
    else:
        principal = store.authenticate(secret)
    if scope is None:
        log.warning("denied %s: the route is not in the access table (server/access/scopes.py)", endpoint)
        raise PermissionDenied(f"route {endpoint} is not open to any API key")
    if scope not in principal.scopes:
        what = "bearer token" if principal.key_id.startswith("oidc:") else "API key"
        raise PermissionDenied(f"{what} {principal.key_id} lacks the `{scope}` scope this route needs "
                               f"(it has {', '.join(sorted(principal.scopes)) or 'none'})")
    return principal
