"""OIDC bearer tokens (security.oidc.*): real key pairs, a real identity provider on loopback, a real server.

The provider is a small `http.server` in a thread serving a discovery document and a JWKS that a test
can rotate or break, counting every fetch. Keys are made with `cryptography`, tokens signed with
joserfc (authlib's JOSE library); the attacks (`alg: none`, HS256 keyed with the public key) are
built by hand, as an attacker would. The verifier's edge cases run without a server (with a clock the
test moves); one module-scoped `inferctl serve` checks the wiring with the real `openai` and `ollama`
clients.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import ollama
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws, jwt
from joserfc.jwk import ECKey, RSAKey

from inferflux.config import ConfigError, OidcConfig, load_config
from inferflux.server.access.auth import authorize
from inferflux.server.access.errors import AuthenticationError, PermissionDenied
from inferflux.server.access.keys import KeyStore
from inferflux.server.access.oidc import OidcUnavailable, OidcVerifier

AUDIENCE = "inferflux-test"
CLIENT_ID = "inferflux-rs"
CLIENT_SECRET = "cl1ent-S3cret-for-introspection-4f9a"
MESSAGES = [{"role": "user", "content": "hi"}]


# --- a key pair and an identity provider ---


class Signer:
    """A private key made with `cryptography`, its public JWK, and tokens it signs."""

    def __init__(self, kid: str, kind: str = "RSA") -> None:
        if kind == "RSA":
            private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg, importer = "RS256", RSAKey
        else:
            private, self.alg, importer = ec.generate_private_key(ec.SECP256R1()), "ES256", ECKey
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = kid
        self.key = importer.import_key(pem, {"kid": kid, "use": "sig"})
        self.jwk = self.key.as_dict(private=False)

    def token(self, issuer: str, kid: str | None = "same", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": issuer, "aud": AUDIENCE, "sub": "alice@example.com", "iat": now, "exp": now + 300,
                "tenant": "acme", "scope": "openid inference models:read", **claims}
        body = {k: v for k, v in body.items() if v is not None}
        header = {"alg": self.alg, "typ": "JWT"} | ({"kid": self.kid if kid == "same" else kid} if kid else {})
        return jwt.encode(header, body, self.key, algorithms=[self.alg])


class Provider:
    """An OpenID provider on 127.0.0.1: discovery + JWKS, rotatable, breakable, counting fetches."""

    def __init__(self, *signers: Signer) -> None:
        self.keys: list[dict[str, Any]] = [s.jwk for s in signers]
        self.fetches = {"discovery": 0, "jwks": 0}
        self.broken = False
        self.issuer_in_discovery: str | None = None
        # RFC 7662 introspection: opaque token -> its answer (absent: {"active": false}); calls counted,
        # and only this client's HTTP Basic credentials are answered (401 otherwise, as providers do).
        self.opaque: dict[str, dict[str, Any]] = {}
        self.introspections = 0
        self.client = (CLIENT_ID, CLIENT_SECRET)
        self.seen_auth: list[str] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if provider.broken:
                    return self._send(500, {"error": "down"})
                if self.path == "/.well-known/openid-configuration":
                    provider.fetches["discovery"] += 1
                    return self._send(200, {"issuer": provider.issuer_in_discovery or provider.issuer,
                                            "jwks_uri": provider.issuer + "/jwks",
                                            "introspection_endpoint": provider.issuer + "/introspect"})
                if self.path == "/jwks":
                    provider.fetches["jwks"] += 1
                    return self._send(200, {"keys": provider.keys})
                return self._send(404, {})

            def do_POST(self) -> None:  # noqa: N802
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                if provider.broken or self.path != "/introspect":
                    return self._send(500 if provider.broken else 404, {"error": "no"})
                provider.introspections += 1
                auth = self.headers.get("Authorization") or ""
                provider.seen_auth.append(auth)
                expected = "Basic " + base64.b64encode(":".join(provider.client).encode()).decode()
                if not hmac.compare_digest(auth, expected):
                    return self._send(401, {"error": "invalid_client"})
                token = form.get("token", [""])[0]
                return self._send(200, provider.opaque.get(token, {"active": False}))

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _handmade(header: Any, claims: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: `alg: none` (no signature) or HS256 keyed with `secret`."""
    signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    signature = _b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest()) if secret else ""
    return signing + "." + signature


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer("rsa-1")


@pytest.fixture(scope="module")
def ec_signer() -> Signer:
    return Signer("ec-1", "EC")


@pytest.fixture
def provider(rsa_signer: Signer, ec_signer: Signer) -> Iterator[Provider]:
    idp = Provider(rsa_signer, ec_signer)
    yield idp
    idp.close()


def _verifier(provider: Provider, clock: Clock | None = None, **settings: Any) -> OidcVerifier:
    return OidcVerifier(OidcConfig(issuer=provider.issuer, audience=AUDIENCE, **settings),
                        clock=clock or Clock(), timeout=2.0)


# --- configuration: a nested section ---


def test_oidc_is_a_nested_config_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("security:\n  auth: required\n  oidc:\n    issuer: https://idp.example.com\n"
                    "    audience: api\n    leeway_seconds: 5\n")
    oidc = load_config(path, environ={}).security.oidc
    assert (oidc.issuer, oidc.audience, oidc.leeway_seconds, oidc.tenant_claim) == \
        ("https://idp.example.com", "api", 5, "tenant")
    env = {"INFERFLUX_SECURITY__AUTH": "required", "INFERFLUX_SECURITY__OIDC__ISSUER": "https://a.example",
           "INFERFLUX_SECURITY__OIDC__AUDIENCE": "x", "INFERFLUX_SECURITY__OIDC__TENANT_CLAIM": "org"}
    config = load_config(overrides=["security.oidc.scopes_claim=scp"], environ=env)
    assert (config.security.oidc.issuer, config.security.oidc.tenant_claim, config.security.oidc.scopes_claim) \
        == ("https://a.example", "org", "scp")
    base = ["security.auth=required", "security.oidc.audience=x"]
    for bad, message in (("security.oidc.bogus=1", "unknown config key 'security.oidc.bogus'"),
                         ("security.oidc=1", "is a section, not a key"),
                         ("security.oidc.leeway_seconds=9999", "security.oidc.leeway_seconds=9999 is out of range"),
                         ("security.oidc.issuer=idp.example.com", "empty or an http"),
                         ("security.oidc.issuer=http://idp.example.com", "must be https://"),
                         ("security.oidc.issuer=http://127.evil.example", "must be https://")):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_config(overrides=[*base, bad], environ={})
    assert load_config(overrides=[*base, "security.oidc.issuer=http://127.0.0.1:9"], environ={})
    with pytest.raises(ConfigError, match="needs security.oidc.audience"):
        load_config(overrides=["security.auth=required", "security.oidc.issuer=https://a.example"], environ={})
    with pytest.raises(ConfigError, match="needs security.auth=required"):
        load_config(overrides=["security.oidc.issuer=https://a.example", "security.oidc.audience=x"], environ={})


# --- the verifier, without a server ---


def test_valid_tokens_map_to_a_principal(provider: Provider, rsa_signer: Signer, ec_signer: Signer) -> None:
    verifier = _verifier(provider)
    principal = verifier.verify(rsa_signer.token(provider.issuer))
    assert (principal.tenant, principal.key_id, principal.scopes) == \
        ("acme", "oidc:alice@example.com", frozenset({"inference", "models:read"}))  # "openid" dropped
    listed = verifier.verify(ec_signer.token(provider.issuer, scope=["embeddings", "root", 7], sub="x" * 200))
    assert listed.scopes == frozenset({"embeddings"}) and listed.key_id == "oidc:" + "x" * 48
    assert verifier.verify(rsa_signer.token(provider.issuer, sub="a\nb c")).key_id == "oidc:a_b_c"  # log-safe
    assert provider.fetches == {"discovery": 1, "jwks": 1}  # fetched once, then cached
    # A custom scopes claim, and a custom tenant claim.
    custom = _verifier(provider, tenant_claim="org", scopes_claim="scp")
    assert custom.verify(rsa_signer.token(provider.issuer, org="beta", scp="admin")).scopes == {"admin"}


def test_time_claims_and_leeway(provider: Provider, rsa_signer: Signer) -> None:
    verifier = _verifier(provider, leeway_seconds=30)
    now = int(time.time())
    assert verifier.verify(rsa_signer.token(provider.issuer, exp=now - 10)).tenant == "acme"  # within leeway
    assert verifier.verify(rsa_signer.token(provider.issuer, nbf=now + 10)).tenant == "acme"
    for claims, message in (({"exp": now - 60}, "has expired"), ({"nbf": now + 60}, "not valid yet"),
                            ({"iat": now + 600}, "issued in the future"),
                            ({"exp": None}, r"lacks a required claim \(exp\)")):
        with pytest.raises(AuthenticationError, match=message):
            verifier.verify(rsa_signer.token(provider.issuer, **claims))


@pytest.mark.parametrize(("claims", "message"), [
    ({"aud": "someone-else"}, "is not for audience"),
    ({"aud": ["a", "b"]}, "is not for audience"),
    ({"iss": "https://evil.example"}, "was not issued by"),
    ({"tenant": None}, "no `tenant` claim"),
    ({"tenant": "../etc"}, "is not a tenant name"),
    ({"tenant": 42}, "is not a tenant name"),
    ({"sub": None}, "no sub claim"),
])
def test_bad_claims_are_refused(provider: Provider, rsa_signer: Signer, claims: dict[str, Any],
                                message: str) -> None:
    with pytest.raises(AuthenticationError, match=message):
        _verifier(provider).verify(rsa_signer.token(provider.issuer, **claims))


def test_audience_in_a_list_is_accepted(provider: Provider, rsa_signer: Signer) -> None:
    assert _verifier(provider).verify(rsa_signer.token(provider.issuer, aud=["other", AUDIENCE])).tenant == "acme"


def test_forged_and_garbage_tokens(provider: Provider, rsa_signer: Signer) -> None:
    verifier = _verifier(provider)
    good = rsa_signer.token(provider.issuer)
    impostor = Signer(rsa_signer.kid)  # another key claiming the same kid
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verifier.verify(impostor.token(provider.issuer))
    head, body, _ = good.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(body + "=="))
    tampered["tenant"] = "other"
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verifier.verify(f"{head}.{_b64(json.dumps(tampered).encode())}.{good.split('.')[2]}")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    for token in (_handmade({"alg": "none", "kid": rsa_signer.kid}, claims, None),
                  _handmade({"alg": "HS256", "kid": rsa_signer.kid}, claims, rsa_signer.public_pem)):
        with pytest.raises(AuthenticationError, match="only asymmetric signatures"):
            verifier.verify(token)
    odd_headers = [{"alg": ["RS256"]}, {"alg": {"a": 1}}, {"alg": "RS256", "kid": ["x"]}, [1], "RS256"]
    for garbage in ("not-a-token", "a.b.c", "....", "eyJhbGciOiJSUzI1NiJ9.%%%.x",
                    *(_handmade(h, claims, None) for h in odd_headers),
                    jws.serialize_compact({"alg": "RS256", "kid": rsa_signer.kid}, "[1]", rsa_signer.key)):
        with pytest.raises(AuthenticationError):
            verifier.verify(garbage)
    with pytest.raises(AuthenticationError, match="signature does not verify"):
        verifier.verify(Signer("x").token(provider.issuer, kid=None))  # no kid: the one RS256 key is tried
    assert verifier.verify(rsa_signer.token(provider.issuer, kid=None)).tenant == "acme"


def test_unknown_kid_refreshes_at_most_once_per_interval(provider: Provider, rsa_signer: Signer) -> None:
    clock = Clock()
    verifier = _verifier(provider, clock, jwks_min_refresh_seconds=10)
    verifier.verify(rsa_signer.token(provider.issuer))
    assert provider.fetches["jwks"] == 1
    clock.now += 10
    for i in range(50):  # garbage naming unknown key ids: one refresh, not fifty
        with pytest.raises(AuthenticationError, match="unknown kid"):
            verifier.verify(rsa_signer.token(provider.issuer, kid=f"nope-{i}"))
    assert provider.fetches["jwks"] == 2
    rotated = Signer("rsa-2")
    provider.keys = [rotated.jwk]  # the provider rotates: the old key is gone
    with pytest.raises(AuthenticationError, match="unknown kid"):  # still inside the interval
        verifier.verify(rotated.token(provider.issuer))
    clock.now += 10
    assert verifier.verify(rotated.token(provider.issuer)).tenant == "acme"
    assert provider.fetches["jwks"] == 3
    clock.now += 10
    with pytest.raises(AuthenticationError, match="unknown kid"):
        verifier.verify(rsa_signer.token(provider.issuer))  # the dropped key no longer verifies
    # Past jwks_cache_seconds the keys are fetched again even for a known kid.
    clock.now += 3600
    verifier.verify(rotated.token(provider.issuer))
    assert provider.fetches["jwks"] == 5 and verifier.fetches == 5


def test_warm_fetches_once_and_a_stale_refresh_never_queues(provider: Provider, rsa_signer: Signer) -> None:
    clock = Clock()
    verifier = _verifier(provider, clock)
    verifier.warm()  # what the server does at start-up
    assert provider.fetches == {"discovery": 1, "jwks": 1}
    verifier.verify(rsa_signer.token(provider.issuer))
    assert provider.fetches["jwks"] == 1
    clock.now += 7200  # stale: the next request would refresh, but another thread is fetching
    with verifier._lock:
        assert verifier.verify(rsa_signer.token(provider.issuer)).tenant == "acme"  # the cached keys, no wait
    assert provider.fetches["jwks"] == 1
    verifier.verify(rsa_signer.token(provider.issuer))
    assert provider.fetches["jwks"] == 2
    provider.broken = True
    _verifier(provider).warm()  # a provider that is down at start-up is logged, not raised


def test_provider_down(provider: Provider, rsa_signer: Signer) -> None:
    clock = Clock()
    provider.broken = True
    verifier = _verifier(provider, clock)
    with pytest.raises(OidcUnavailable, match="could not be fetched.*HTTP 500") as caught:
        verifier.verify(rsa_signer.token(provider.issuer))
    assert caught.value.status == 503
    with pytest.raises(OidcUnavailable):  # inside the interval: no new attempt
        verifier.verify(rsa_signer.token(provider.issuer))
    assert provider.fetches["discovery"] == 0
    provider.broken = False
    clock.now += 10
    assert verifier.verify(rsa_signer.token(provider.issuer)).tenant == "acme"
    provider.broken = True  # down again once keys are cached: the cached keys keep working
    clock.now += 7200
    assert verifier.verify(rsa_signer.token(provider.issuer)).tenant == "acme"
    # Nothing listening at all.
    gone = OidcVerifier(OidcConfig(issuer="http://127.0.0.1:9", audience=AUDIENCE), timeout=1.0)
    with pytest.raises(OidcUnavailable, match="ConnectError"):
        gone.verify(rsa_signer.token("http://127.0.0.1:9"))


def test_discovery_must_name_the_issuer_and_jwks_url_skips_it(provider: Provider, rsa_signer: Signer) -> None:
    provider.issuer_in_discovery = "https://evil.example"
    with pytest.raises(OidcUnavailable, match="names issuer 'https://evil.example'"):
        _verifier(provider).verify(rsa_signer.token(provider.issuer))
    direct = _verifier(provider, jwks_url=provider.issuer + "/jwks")
    assert direct.verify(rsa_signer.token(provider.issuer)).tenant == "acme"
    assert provider.fetches == {"discovery": 1, "jwks": 1}


def test_symmetric_and_encryption_keys_in_the_jwks_are_ignored(provider: Provider, rsa_signer: Signer) -> None:
    secret = b"shared-secret-shared-secret-32by"
    provider.keys = [{"kty": "oct", "kid": "hs", "k": _b64(secret)}, {**rsa_signer.jwk, "use": "enc"}]
    with pytest.raises(OidcUnavailable, match="no usable signing key"):
        _verifier(provider).verify(rsa_signer.token(provider.issuer))
    provider.keys.append(Signer("ok").jwk)
    claims = {"iss": provider.issuer, "aud": AUDIENCE, "sub": "s", "tenant": "acme", "exp": time.time() + 60}
    with pytest.raises(AuthenticationError, match="only asymmetric"):
        _verifier(provider).verify(_handmade({"alg": "HS256", "kid": "hs"}, claims, secret))


def test_authorize_routes_keys_and_tokens(tmp_path: Path, provider: Provider, rsa_signer: Signer) -> None:
    store = KeyStore.at_home(tmp_path)
    store.create_tenant("acme")
    secret, _ = store.create_key("acme", "embeddings")
    verifier = _verifier(provider)
    bearer = {"Authorization": f"Bearer {rsa_signer.token(provider.issuer)}"}
    assert authorize(store, "openai.chat_completions", bearer, False, verifier).key_id.startswith("oidc:")
    assert authorize(store, "openai.embeddings", {"x-api-key": secret}, False, verifier).key_id.startswith("key_")
    with pytest.raises(PermissionDenied, match="bearer token oidc:alice@example.com lacks the `admin` scope"):
        authorize(store, "access.list_keys", bearer, False, verifier)
    with pytest.raises(AuthenticationError, match="invalid API key"):
        authorize(store, "openai.embeddings", {"x-api-key": "ifx-" + "A" * 43}, False, verifier)
    with pytest.raises(AuthenticationError, match="an API key or an OIDC bearer token is required"):
        authorize(store, "openai.embeddings", {}, False, verifier)
    store.close()


# --- against a server ---


# --- opaque tokens: RFC 7662 introspection with the stored client secret ---


def _answer(provider: Provider, **claims: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"active": True, "iss": provider.issuer, "aud": AUDIENCE, "sub": "svc-batch", "exp": now + 300,
            "iat": now, "tenant": "acme", "scope": "inference models:read", "client_id": "batch", **claims}
    return {k: v for k, v in body.items() if v is not None}


def _introspector(provider: Provider, clock: Clock, secret: str = CLIENT_SECRET, **settings: Any):
    from inferflux.server.access.introspection import TokenIntrospector

    config = OidcConfig(issuer=provider.issuer, audience=AUDIENCE, client_id=CLIENT_ID,
                        client_secret="secret:oidc-client", **settings)
    return TokenIntrospector(config, secret, OidcVerifier(config, clock=clock), clock=clock, timeout=2.0)


def test_introspection_active_inactive_and_cached(provider: Provider) -> None:
    clock = Clock()
    check = _introspector(provider, clock, introspection_cache_seconds=30)
    provider.opaque["opaque-good"] = _answer(provider)
    principal = check("opaque-good")
    assert (principal.tenant, principal.key_id, principal.scopes) == ("acme", "oidc:svc-batch",
                                                                      frozenset({"inference", "models:read"}))
    assert provider.seen_auth[-1] == "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert check("opaque-good") == principal and provider.introspections == 1  # cached
    provider.opaque["opaque-good"] = {"active": False}  # revoked at the provider
    clock.now += 29
    assert check("opaque-good") == principal and provider.introspections == 1
    clock.now += 2
    with pytest.raises(AuthenticationError, match="not active"):
        check("opaque-good")
    assert provider.introspections == 2
    with pytest.raises(AuthenticationError, match="not active"):
        check("never-issued")
    # An active answer is held to the JWT rules: audience, issuer, exp, tenant.
    for token, claims, message in [("other-aud", {"aud": "another-api"}, "audience"),
                                   ("other-iss", {"iss": "https://evil.example"}, "was not issued by"),
                                   ("expired", {"exp": int(time.time()) - 3600}, "expired"),
                                   ("no-tenant", {"tenant": None}, "no `tenant` claim")]:
        provider.opaque[token] = _answer(provider, **claims)
        with pytest.raises(AuthenticationError, match=message):
            check(token)
    # The cache never outlives the token: exp in 5 s -> asked again after 5 s, not 30.
    provider.opaque["short"] = _answer(provider, exp=int(time.time()) + 5)
    check("short")
    calls = provider.introspections
    clock.now += 6
    provider.opaque["short"] = {"active": False}
    with pytest.raises(AuthenticationError, match="not active"):
        check("short")
    assert provider.introspections == calls + 1


def test_introspection_failures_are_503_and_not_cached(provider: Provider) -> None:
    clock = Clock()
    provider.opaque["t"] = _answer(provider)
    with pytest.raises(OidcUnavailable, match="refused this server's client credentials") as err:
        _introspector(provider, clock, secret="wrong-secret")("t")
    assert "wrong-secret" not in str(err.value) and err.value.status == 503
    check = _introspector(provider, clock)
    provider.broken = True
    with pytest.raises(OidcUnavailable, match="token introspection failed"):
        check("t")
    provider.broken = False
    assert check("t").tenant == "acme"  # the failure was not cached
    dead = _introspector(provider, clock, introspection_url="http://127.0.0.1:9/introspect")
    with pytest.raises(OidcUnavailable, match="ConnectError"):
        dead("t")


def test_opaque_tokens_go_to_introspection_jwts_do_not(tmp_path: Path, provider: Provider,
                                                       rsa_signer: Signer) -> None:
    clock = Clock()
    check = _introspector(provider, clock)
    verifier = OidcVerifier(check.settings, clock=clock)
    verifier.introspector = check
    store = KeyStore.at_home(tmp_path)
    provider.opaque["opaque-1"] = _answer(provider)
    assert authorize(store, "openai.chat_completions", {"Authorization": "Bearer opaque-1"}, False,
                     verifier).key_id == "oidc:svc-batch"
    jwt_principal = authorize(store, "openai.chat_completions",
                              {"Authorization": f"Bearer {rsa_signer.token(provider.issuer)}"}, False, verifier)
    assert jwt_principal.key_id == "oidc:alice@example.com" and provider.introspections == 1
    store.close()


def test_client_secret_config_is_a_reference_to_a_stored_secret(tmp_path: Path, provider: Provider,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from inferflux.server.access.crypto import SecretError, generate_master_key, parse_master_key
    from inferflux.server.access.introspection import build_verifier
    from inferflux.server.access.secrets_store import SecretStore, check_secrets

    base = {"security.auth": "required", "security.oidc.issuer": provider.issuer,
            "security.oidc.audience": AUDIENCE, "security.oidc.client_id": CLIENT_ID}
    with pytest.raises(ConfigError, match="secret:NAME"):
        load_config(overrides={**base, "security.oidc.client_secret": CLIENT_SECRET}, environ={})
    with pytest.raises(ConfigError, match="together"):
        load_config(overrides=base, environ={})
    with pytest.raises(ConfigError, match="must be https"):
        load_config(overrides={**base, "security.oidc.client_secret": "secret:oidc-client",
                               "security.oidc.introspection_url": "http://idp.example/introspect"}, environ={})
    key = generate_master_key()
    monkeypatch.setenv("INFERFLUX_HOME", str(tmp_path))
    monkeypatch.setenv("INFERFLUX_MASTER_KEY", key)
    config = load_config(overrides={**base, "security.oidc.client_secret": "secret:oidc-client"}, environ={})
    with pytest.raises(SecretError, match="refers to secret 'oidc-client', which is not stored"):
        check_secrets(config)  # at start-up, before the model loads
    SecretStore(tmp_path / "state.db", parse_master_key(key, "t")).set("oidc-client", CLIENT_SECRET)
    assert check_secrets(config) == 1
    verifier = build_verifier(config)
    assert verifier is not None and verifier.introspector is not None
    provider.opaque["x"] = _answer(provider)
    assert verifier.verify("x").tenant == "acme"  # the stored secret authenticated the call
    monkeypatch.setenv("INFERFLUX_MASTER_KEY", generate_master_key())
    with pytest.raises(SecretError, match="'oidc-client' was encrypted with master key"):
        build_verifier(config)


@pytest.fixture(scope="module")
def secured(tiny_model, rsa_signer: Signer, ec_signer: Signer, tmp_path_factory):
    from inferflux.server.access.crypto import generate_master_key, parse_master_key
    from inferflux.server.access.secrets_store import SecretStore
    from tests.fixtures.server import Server

    idp = Provider(rsa_signer, ec_signer)
    home = tmp_path_factory.mktemp("oidc-home")
    key_file = home.parent / f"{home.name}.key"
    key_file.write_text(generate_master_key())
    SecretStore(home / "state.db", parse_master_key(key_file.read_text(), "t")).set("oidc-client", CLIENT_SECRET)
    server = Server(tiny_model("llama"), "tiny", home=home, extra=[
        "security.auth=required", f"security.oidc.issuer={idp.issuer}", f"security.oidc.audience={AUDIENCE}",
        "security.oidc.jwks_min_refresh_seconds=1", f"security.oidc.client_id={CLIENT_ID}",
        "security.oidc.client_secret=secret:oidc-client", "security.oidc.introspection_cache_seconds=1",
        f"security.master_key_file={key_file}"])
    yield server, idp
    status = server.stop()
    idp.close()
    assert status == 0, server.output()


def _openai(server, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)


def test_server_accepts_tokens_with_both_clients(secured, rsa_signer: Signer, ec_signer: Signer) -> None:
    server, idp = secured
    for signer in (rsa_signer, ec_signer):
        token = signer.token(idp.issuer)
        reply = _openai(server, token).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
        assert reply.choices[0].message.role == "assistant"
        client = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {token}"})
        chat = client.chat(model="tiny", messages=MESSAGES, options={"num_predict": 3})
        assert chat.message.role == "assistant" and chat.done
        server.log.flush()
        assert token not in Path(server.log.name).read_text()  # tokens are credentials: never logged


@pytest.mark.parametrize(("claims", "message"), [
    ({"exp": int(time.time()) - 3600}, "expired"),
    ({"nbf": int(time.time()) + 3600}, "not valid yet"),
    ({"aud": "another-api"}, "audience"),
    ({"iss": "https://evil.example"}, "not issued by"),
    ({"tenant": None}, "no `tenant` claim"),
])
def test_server_refuses_bad_tokens_with_401(secured, rsa_signer: Signer, claims: dict[str, Any],
                                            message: str) -> None:
    server, idp = secured
    with pytest.raises(openai.AuthenticationError, match=message) as caught:
        _openai(server, rsa_signer.token(idp.issuer, **claims)).models.list()
    assert caught.value.status_code == 401 and caught.value.response.headers["www-authenticate"].startswith("Bearer")


def test_server_refuses_a_forged_signature_and_a_missing_scope(secured, rsa_signer: Signer) -> None:
    server, idp = secured
    with pytest.raises(openai.AuthenticationError, match="signature does not verify"):
        _openai(server, Signer(rsa_signer.kid).token(idp.issuer)).models.list()
    with pytest.raises(openai.PermissionDeniedError, match="lacks the `inference` scope") as caught:
        _openai(server, rsa_signer.token(idp.issuer, scope="openid models:read")).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=3)
    assert caught.value.status_code == 403
    with pytest.raises(ollama.ResponseError) as denied:
        ollama.Client(host=server.url, headers={"Authorization": "Bearer a.b.c"}).list()
    assert denied.value.status_code == 401


def test_server_websocket_handshake_takes_a_token(secured, rsa_signer: Signer) -> None:
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    server, idp = secured
    url = server.url.replace("http", "ws") + "/v1/chat/completions/ws"
    with pytest.raises(InvalidStatus) as caught:
        ws_client.connect(url, additional_headers={
            "Authorization": f"Bearer {rsa_signer.token(idp.issuer, aud='another-api')}"})
    assert caught.value.response.status_code == 401 and b"audience" in caught.value.response.body
    token = rsa_signer.token(idp.issuer)
    with ws_client.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        ws.send(json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2}))
        assert "choices" in json.loads(ws.recv())


def test_server_follows_a_key_rotation(secured, rsa_signer: Signer) -> None:
    server, idp = secured
    _openai(server, rsa_signer.token(idp.issuer)).models.list()  # keys cached
    before = idp.fetches["jwks"]
    rotated = Signer("rsa-rotated")
    idp.keys = [rotated.jwk]
    time.sleep(1.1)  # security.oidc.jwks_min_refresh_seconds=1 since the server's last fetch
    assert [m.id for m in _openai(server, rotated.token(idp.issuer)).models.list()] == ["tiny"]
    assert idp.fetches["jwks"] == before + 1
    time.sleep(1.1)
    with pytest.raises(openai.AuthenticationError, match="unknown kid"):
        _openai(server, rsa_signer.token(idp.issuer)).models.list()  # the retired key is gone


def test_server_introspects_opaque_tokens(secured) -> None:
    """An opaque token through the real openai client: introspected with the stored client secret; a token
    the provider says is inactive is a 401; neither the token nor the client secret reaches the log."""
    server, idp = secured
    idp.opaque["opaque-server-token-1"] = _answer(idp)
    reply = _openai(server, "opaque-server-token-1").chat.completions.create(model="tiny", messages=MESSAGES,
                                                                             max_tokens=3)
    assert reply.choices[0].message.role == "assistant" and idp.introspections >= 1
    assert idp.seen_auth[-1] == "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    with pytest.raises(openai.AuthenticationError, match="not active"):
        _openai(server, "opaque-never-issued").models.list()
    idp.opaque["opaque-server-token-1"] = {"active": False}  # revoked: refused once the 1 s cache is over
    time.sleep(1.2)
    with pytest.raises(openai.AuthenticationError, match="not active"):
        _openai(server, "opaque-server-token-1").models.list()
    server.log.flush()
    log = Path(server.log.name).read_text()
    assert CLIENT_SECRET not in log and "opaque-server-token-1" not in log
