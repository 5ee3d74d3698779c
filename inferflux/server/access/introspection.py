"""Opaque OIDC bearer tokens: RFC 7662 token introspection, with this server's client id and secret.

Some providers hand out access tokens that are not JWTs (Keycloak's lightweight tokens, Ory Hydra's, Okta's
opaque ones), and a JWT is valid until its `exp` whatever happens at the provider. For those, a resource server
asks the provider: POST the token to its introspection endpoint, authenticated as a client (HTTP Basic
`client_id:client_secret`, authlib's OAuth 2.0 client), and gets back `{"active": true, ...claims}` or
`{"active": false}`. That call is why InferFlux has an OIDC client secret at all (docs/security.md).

- The secret is configured as a reference, `security.oidc.client_secret: secret:NAME`, and read from the
  encrypted secret store (secrets_store.py) at start-up; no config file, log line or error holds it.
- The endpoint is `security.oidc.introspection_url`, else the discovery document's `introspection_endpoint`.
- `active: false` is a 401; an active answer is held to the JWT path's rules (`OidcVerifier.check_claims`:
  iss, aud, exp required, nbf, iat) and mapped by `OidcVerifier.principal` (tenant claim, `oidc:<sub>`, scopes).
- Answers are cached under the token's SHA-256 (never the token) for `introspection_cache_seconds`, at most
  until the token's `exp`, so a busy client costs the provider one call per interval; a revoked token keeps
  working at most that long. The cache is bounded (oldest answers dropped first).
- A provider that cannot be reached, answers with an error, or refuses our client credentials is a 503
  (`OidcUnavailable`): the server cannot judge the token, which is not the client's fault. Not cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx
from authlib.integrations.httpx_client import OAuth2Client

from inferflux.config import Config, OidcConfig
from inferflux.server.access.errors import AuthenticationError
from inferflux.server.access.keys import Principal
from inferflux.server.access.oidc import FetchError, OidcUnavailable, OidcVerifier, discovered_url

log = logging.getLogger(__name__)

# authlib's OAuth client is built on httpx2 when that is installed (the openai client pulls it in), else on httpx.
_HTTP_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError,)
try:
    import httpx2

    _HTTP_ERRORS += (httpx2.HTTPError,)
except ImportError:  # pragma: no cover - authlib then uses httpx itself
    pass

_MAX_ANSWER = 1 << 20
_MAX_ENTRIES = 10_000


@dataclasses.dataclass(frozen=True)
class _Answer:
    until: float  # the introspector's clock
    principal: Principal | None
    error: str = ""


class TokenIntrospector:
    """Checks opaque bearer tokens at the provider's introspection endpoint; thread-safe; blocks on a call."""

    def __init__(self, settings: OidcConfig, client_secret: str, claims: OidcVerifier, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 timeout: float = 5.0, max_entries: int = _MAX_ENTRIES) -> None:
        self.settings = settings
        self._secret = client_secret
        self._claims = claims
        self._clock, self._wall, self._timeout = clock, wall, timeout
        self._max = max_entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Answer] = OrderedDict()
        self._endpoint = settings.introspection_url
        self.calls = 0  # introspection requests sent: what tests and logs look at

    def __call__(self, token: str) -> Principal:
        return self.verify(token)

    def verify(self, token: str) -> Principal:
        """The principal of an active token; AuthenticationError (401) or OidcUnavailable (503)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is None or hit.until <= now:
            hit = self._judge(self._introspect(token), now)
            if self.settings.introspection_cache_seconds:
                with self._lock:
                    self._cache[digest] = hit
                    self._cache.move_to_end(digest)
                    while len(self._cache) > self._max:
                        self._cache.popitem(last=False)
        if hit.principal is None:
            raise AuthenticationError(hit.error)
        return hit.principal

    def _judge(self, answer: dict[str, Any], now: float) -> _Answer:
        """The verdict on one introspection answer, with how long it may be reused."""
        until = now + self.settings.introspection_cache_seconds
        if answer.get("active") is not True:
            return _Answer(until, None, "bearer token is not active: the identity provider says it is revoked, "
                                        "expired or unknown")
        try:
            self._claims.check_claims(answer)
            principal = self._claims.principal(answer)
        except AuthenticationError as exc:
            return _Answer(until, None, str(exc))
        exp = answer["exp"]  # required by check_claims
        left = float(exp) - self._wall() if isinstance(exp, int | float) else 0.0
        return _Answer(min(until, now + max(left, 0.0)), principal)

    def _introspect(self, token: str) -> dict[str, Any]:
        """POST the token to the endpoint as this client; the JSON answer, or OidcUnavailable."""
        try:
            if not self._endpoint:
                with httpx.Client(timeout=self._timeout, follow_redirects=False) as plain:
                    self._endpoint = discovered_url(plain, self.settings, "introspection_endpoint")
            with OAuth2Client(self.settings.client_id, self._secret, token_endpoint_auth_method="client_secret_basic",
                              timeout=self._timeout, follow_redirects=False) as client:
                self.calls += 1
                response = client.introspect_token(self._endpoint, token=token, token_type_hint="access_token",
                                                   headers={"Accept": "application/json"})
                body = response.content
        except FetchError as exc:
            raise self._unavailable(str(exc)) from None
        except _HTTP_ERRORS as exc:
            raise self._unavailable(f"{self._endpoint}: {type(exc).__name__}") from None
        if response.status_code in (401, 403):
            raise self._unavailable(f"{self._endpoint}: HTTP {response.status_code}, the provider refused this "
                                    "server's client credentials (security.oidc.client_id / client_secret)")
        if response.status_code != 200:
            raise self._unavailable(f"{self._endpoint}: HTTP {response.status_code}")
        if len(body) > _MAX_ANSWER:
            raise self._unavailable(f"{self._endpoint}: answer over {_MAX_ANSWER} bytes")
        try:
            answer = json.loads(body)
        except ValueError:
            raise self._unavailable(f"{self._endpoint}: not JSON") from None
        if not isinstance(answer, dict):
            raise self._unavailable(f"{self._endpoint}: not an introspection answer (a JSON object)")
        return answer

    @staticmethod
    def _unavailable(reason: str) -> OidcUnavailable:
        log.warning("OIDC: token introspection failed: %s", reason)
        return OidcUnavailable(f"cannot check opaque bearer tokens now: token introspection failed ({reason})")


def client_secret(config: Config) -> str:
    """The plaintext of `security.oidc.client_secret` (`secret:NAME`) from the encrypted secret store; a
    one-line SecretError when it is not stored or the master key cannot open it."""
    from inferflux.server.access.secrets_store import open_secret_store

    store = open_secret_store(config)
    try:
        return store.resolve(config.security.oidc.client_secret)
    finally:
        store.close()


def build_verifier(config: Config) -> OidcVerifier | None:
    """The request path's OIDC checker: JWTs, plus opaque tokens by introspection when a client id is set."""
    settings = config.security.oidc
    if not settings.issuer:
        return None
    verifier = OidcVerifier(settings)
    if settings.client_id:
        verifier.introspector = TokenIntrospector(settings, client_secret(config), verifier)
    return verifier
