"""OpenID Connect bearer tokens: a JWT the provider signed -> the same `Principal` an API key gives.

With `security.oidc.issuer` set, a bearer value that is not an `ifx-` key is taken for a JWT and checked
here (joserfc, authlib's JOSE library; `authlib.jose` is deprecated in its favour):

- the signature, against the provider's published keys (JWKS), with an algorithm that fits the key's type
  (RSA: RS*/PS*, EC: the curve's ES*, OKP: EdDSA). Symmetric (`HS*`) and `none` tokens are refused before
  any key is looked at, so a public key can never be used as an HMAC secret;
- `iss` equal to the configured issuer, `aud` naming the configured audience, `exp` (required) and `nbf`
  / `iat` when present, each with `leeway_seconds` of clock skew;
- a tenant in `tenant_claim` (a token without one is 401: there is no tenant to charge), scopes from
  `scopes_claim` (a space-separated string or a list), filtered to the scopes `scopes.py` knows.

Keys are fetched with httpx (discovery `<issuer>/.well-known/openid-configuration` -> `jwks_uri`, unless
`jwks_url` is given), cached for `jwks_cache_seconds`, and fetched again early when a token names a key id
the cache lacks (the provider rotated), at most once per `jwks_min_refresh_seconds`, so a stream of
garbage tokens costs the provider nothing. A fetch that fails keeps the old keys; with none at all the
request gets 503 (the server cannot tell a good token from a bad one), never a 500.

With `client_id` set, a bearer value that is not a JWT is an opaque token, checked by the provider's RFC 7662
introspection endpoint instead (introspection.py), against the same claims and mapped to the same principal.

`verify` blocks while it fetches: `auth.py` calls it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from joserfc import jwk, jws, jwt
from joserfc.errors import BadSignatureError, ClaimError, ExpiredTokenError, JoseError, MissingClaimError

from inferflux.config import OidcConfig, secure_url
from inferflux.server.access.errors import AuthenticationError
from inferflux.server.access.keys import Principal
from inferflux.server.access.scopes import SCOPES
from inferflux.server.errors import APIError

log = logging.getLogger(__name__)

_MAX_DOCUMENT = 1 << 20  # a JWKS or discovery document larger than this is refused
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_OKP = ("EdDSA", "Ed25519", "Ed448")
_ASYMMETRIC = frozenset(_RSA) | frozenset(_EC.values()) | frozenset(_OKP)
# The key store's tenant names (keys.py); a claim is held to the same rule, as it reaches logs and limits.
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@|:+=-]")  # what a key id may show of `sub` (it is logged)
_KEY_ID_SUB = 48  # characters of `sub` kept in the key id


class OidcUnavailable(APIError):
    """The provider's keys could not be fetched and none are cached: 503, not a verdict on the token."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message, type="service_unavailable", code="identity_provider_unavailable")


class FetchError(Exception):
    """Discovery or the JWKS could not be fetched or read (kept out of clients' view except as a reason)."""


@dataclasses.dataclass(frozen=True)
class _Key:
    key: jwk.Key
    algorithms: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _KeySet:
    by_kid: dict[str, _Key]
    all: tuple[_Key, ...]
    fetched: float  # the verifier's clock


def _algorithms(data: dict[str, Any]) -> tuple[str, ...]:
    """The signature algorithms a JWK may verify, by its type (and its `alg`, when it names one)."""
    kty = data.get("kty")
    if kty == "RSA":
        allowed: tuple[str, ...] = _RSA
    elif kty == "EC":
        allowed = (_EC[data["crv"]],) if data.get("crv") in _EC else ()
    elif kty == "OKP":
        allowed = _OKP
    else:
        allowed = ()  # "oct" (a shared secret) has no place in a public key set
    alg = data.get("alg")
    return tuple(a for a in allowed if a == alg) if isinstance(alg, str) else allowed


def parse_jwks(document: Any, fetched: float = 0.0) -> _KeySet:
    """The signing keys of a JWKS document; keys for encryption, of unknown types, or malformed are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchError("not a JWKS document (no `keys` list)")
    by_kid: dict[str, _Key] = {}
    keys: list[_Key] = []
    for data in document["keys"]:
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue
        algorithms = _algorithms(data)
        if not algorithms:
            continue
        try:
            key = _Key(jwk.import_key(data), algorithms)
        except (JoseError, ValueError, TypeError, KeyError):
            log.warning("OIDC: skipped a malformed key in the JWKS (kid %r)", data.get("kid"))
            continue
        keys.append(key)
        if isinstance(data.get("kid"), str):
            by_kid[data["kid"]] = key
    if not keys:
        raise FetchError("the JWKS holds no usable signing key (RSA, EC or OKP)")
    return _KeySet(by_kid, tuple(keys), fetched)


class OidcVerifier:
    """Checks bearer JWTs against one issuer; thread-safe (one fetch at a time, the cache swapped whole)."""

    def __init__(self, settings: OidcConfig, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, timeout: float = 5.0) -> None:
        self.settings = settings
        self._clock = clock
        self._timeout = timeout
        self._lock = threading.Lock()
        self._keys: _KeySet | None = None
        self._last_attempt = -math.inf
        self._last_error = ""
        self.fetches = 0  # JWKS documents fetched (discovery not counted): what tests and logs look at
        # Opaque (non-JWT) tokens go here when security.oidc.client_id is set (introspection.py).
        self.introspector: Callable[[str], Principal] | None = None
        self._claims = jwt.JWTClaimsRegistry(
            now=lambda: int(wall()), leeway=settings.leeway_seconds,
            iss={"essential": True, "value": settings.issuer},
            aud={"essential": True, "value": settings.audience},
            exp={"essential": True})

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; AuthenticationError (401) or OidcUnavailable (503)."""
        if self.introspector is not None and not looks_like_jwt(token):
            return self.introspector(token)
        header = _header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in _ASYMMETRIC:
            raise AuthenticationError(f"bearer token signed with {alg!r}: only asymmetric signatures "
                                      "(RS*, PS*, ES*, EdDSA) from the identity provider's keys are accepted")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("bearer token has a malformed key id (kid)")
        key = self._key(alg, kid)
        try:
            claims = jwt.decode(token, key.key, algorithms=[alg]).claims
        except BadSignatureError:
            raise AuthenticationError("bearer token signature does not verify") from None
        except (JoseError, ValueError, TypeError) as exc:
            raise AuthenticationError(f"bearer token is malformed ({type(exc).__name__})") from None
        if not isinstance(claims, dict):
            raise AuthenticationError("bearer token's claims are not a JSON object")
        self.check_claims(claims)
        return self.principal(claims)

    # --- keys ---

    def _key(self, alg: str, kid: str | None) -> _Key:
        keys = self._keys_for(kid)
        if kid is not None:
            found = keys.by_kid.get(kid)
            if found is None:
                raise AuthenticationError("bearer token is signed by a key the identity provider does not "
                                          "publish (unknown kid)")
        else:
            fitting = [k for k in keys.all if alg in k.algorithms]
            if len(fitting) != 1:
                raise AuthenticationError("bearer token names no key id (kid) and the identity provider "
                                          f"publishes {len(fitting)} keys for {alg}")
            found = fitting[0]
        if alg not in found.algorithms:
            raise AuthenticationError(f"bearer token's algorithm {alg} does not fit its key "
                                      f"(allowed: {', '.join(found.algorithms)})")
        return found

    def warm(self) -> None:
        """Fetch the keys now (at start-up, in a thread), so a misconfigured provider shows in the log at once."""
        try:
            self._keys_for(None)
        except OidcUnavailable:
            pass  # logged by _keys_for; requests answer 503 until a fetch succeeds

    def _keys_for(self, kid: str | None) -> _KeySet:
        """The cached keys, fetched first when missing, stale, or lacking `kid` (rate-limited)."""
        keys = self._keys
        if self._wants_fetch(keys, kid):
            # Only stale (the token's key is cached): don't queue behind another thread's fetch, use the old keys.
            must_wait = keys is None or (kid is not None and kid not in keys.by_kid)
            if self._lock.acquire(blocking=must_wait):
                try:
                    keys = self._refresh(kid)
                finally:
                    self._lock.release()
        if keys is None:
            raise OidcUnavailable("cannot verify bearer tokens now: the identity provider's keys could not be "
                                  f"fetched ({self._last_error}); retried at most every "
                                  f"{self.settings.jwks_min_refresh_seconds} s")
        return keys

    def _refresh(self, kid: str | None) -> _KeySet | None:
        """Fetch unless another thread just did or the last attempt is too recent; the caller holds the lock."""
        keys = self._keys  # another thread may have fetched while this one waited
        now = self._clock()
        if self._wants_fetch(keys, kid) and now - self._last_attempt >= self.settings.jwks_min_refresh_seconds:
            self._last_attempt = now
            try:
                keys = self._keys = self._fetch(now)
            except FetchError as exc:
                self._last_error = str(exc)
                log.warning("OIDC: could not fetch the identity provider's keys: %s%s", exc,
                            " (keeping the cached ones)" if keys else "")
        return keys

    def _wants_fetch(self, keys: _KeySet | None, kid: str | None) -> bool:
        if keys is None or self._clock() - keys.fetched >= self.settings.jwks_cache_seconds:
            return True
        return kid is not None and kid not in keys.by_kid

    def _fetch(self, now: float) -> _KeySet:
        with httpx.Client(timeout=self._timeout, follow_redirects=False) as client:
            url = self.settings.jwks_url or self._discover(client)
            keys = parse_jwks(_get_json(client, url), fetched=now)
        self.fetches += 1
        log.info("OIDC: fetched %d signing keys from %s", len(keys.all), url)
        return keys

    def _discover(self, client: httpx.Client) -> str:
        return discovered_url(client, self.settings, "jwks_uri")

    # --- claims ---

    def check_claims(self, claims: dict[str, Any]) -> None:
        """iss, aud, exp (required), nbf and iat of a JWT's claims or an introspection answer; 401 if wrong."""
        try:
            self._claims.validate(claims)
        except ExpiredTokenError:
            raise AuthenticationError("bearer token has expired") from None
        except MissingClaimError as exc:
            raise AuthenticationError(f"bearer token lacks a required claim ({exc.claim})") from None
        except ClaimError as exc:
            reasons = {"iss": f"was not issued by {self.settings.issuer}",
                       "aud": f"is not for audience {self.settings.audience!r}",
                       "nbf": "is not valid yet (nbf)", "iat": "was issued in the future (iat)"}
            reason = reasons.get(exc.claim, f"has a bad {exc.claim} claim")
            raise AuthenticationError(f"bearer token {reason}") from None

    def principal(self, claims: dict[str, Any]) -> Principal:
        """Tenant, key id (`oidc:<sub>`) and known scopes of checked claims; 401 without a tenant or sub."""
        name = self.settings.tenant_claim
        tenant = claims.get(name)
        if tenant is None:
            raise AuthenticationError(f"bearer token has no `{name}` claim naming its tenant "
                                      "(security.oidc.tenant_claim)")
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise AuthenticationError(f"bearer token's `{name}` claim is not a tenant name (1-64 letters, "
                                      "digits, '.', '_' or '-')")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthenticationError("bearer token has no sub claim (the subject it stands for)")
        raw = claims.get(self.settings.scopes_claim)
        items = raw.split() if isinstance(raw, str) else [s for s in raw if isinstance(s, str)] \
            if isinstance(raw, list) else []
        return Principal(tenant, "oidc:" + _UNSAFE.sub("_", sub)[:_KEY_ID_SUB],
                         frozenset(s for s in items if s in SCOPES))


def discovered_url(client: httpx.Client, settings: OidcConfig, field: str) -> str:
    """The endpoint `field` (jwks_uri, introspection_endpoint) of the issuer's discovery document, which must
    name the configured issuer and give an https:// URL; FetchError otherwise."""
    url = settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
    document = _get_json(client, url)
    if not isinstance(document, dict):
        raise FetchError(f"{url}: not a discovery document")
    if document.get("issuer") != settings.issuer:  # OpenID Connect Discovery 1.0, section 4.3
        raise FetchError(f"{url}: names issuer {document.get('issuer')!r}, not {settings.issuer!r}")
    found = document.get(field)
    if not isinstance(found, str) or not secure_url(found):
        raise FetchError(f"{url}: {field} {found!r} is not an https:// URL")
    return found


def looks_like_jwt(value: str) -> bool:
    """Three base64url parts: what a signed JWT looks like (an API key never does)."""
    return value.count(".") == 2


def _header(token: str) -> dict[str, Any]:
    try:
        header = jws.extract_compact(token.encode()).headers()
    except (JoseError, ValueError, TypeError, UnicodeError):
        raise AuthenticationError("bearer token is neither an API key nor a signed JWT") from None
    if not isinstance(header, dict):
        raise AuthenticationError("bearer token has a malformed header")
    return header


def _get_json(client: httpx.Client, url: str) -> Any:
    """GET `url` as JSON, at most _MAX_DOCUMENT bytes; FetchError (with the reason) on any failure."""
    try:
        with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise FetchError(f"{url}: HTTP {response.status_code}")
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > _MAX_DOCUMENT:
                    raise FetchError(f"{url}: document over {_MAX_DOCUMENT} bytes")
        return json.loads(body)
    except httpx.HTTPError as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
    except ValueError:
        raise FetchError(f"{url}: not JSON") from None
