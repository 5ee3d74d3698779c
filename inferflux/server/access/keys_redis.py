"""Tenants and API keys in Redis (`state.backend: redis`), shared by every replica that names the same URL.

The same public methods and the same rules as the SQLite `KeyStore` (keys.py): a key is shown once
and only its SHA-256 is stored (never the key), the key id is unrelated to it, a revocation is seen
by every replica at its next request (there is no cache). Every write that touches more than one
Redis key runs as one Lua script, so it is atomic: a key is never half-created, and deleting a
tenant takes its keys with it even while another replica creates one.

Layout, under the `inferflux:` prefix:
  tenants            hash   tenant -> created
  tenant:<name>      set    the tenant's key ids
  keys               set    every key id
  key:<id>           hash   tenant, name, sha256, scopes, created[, expires, revoked, last_used]
  sha:<sha256>       string the key id (the lookup `authenticate` does)

Redis must be on a private network and need a password (`redis://:PASSWORD@host/0`) or TLS
(`rediss://`): whoever can write to it can mint keys (docs/security.md).
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from inferflux.config import Config
from inferflux.errors import InferFluxError
from inferflux.server.access.errors import AuthenticationError, KeyStoreError, NotFoundError
from inferflux.server.access.keys import ApiKey, KeyStore, Principal, check_tenant, hash_key, new_key
from inferflux.server.access.scopes import parse_scopes
from inferflux.server.errors import APIError

PREFIX = "inferflux:"
_LAST_USED_EVERY = 60.0

_CREATE_KEY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'tenant', ARGV[1], 'name', ARGV[3], 'sha256', ARGV[4], 'scopes', ARGV[5],
           'created', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], 'expires', ARGV[7]) end
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[2])
return 1
"""
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'revoked', ARGV[1])
return 1
"""
_DELETE_TENANT = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local k = ARGV[2] .. 'key:' .. id
  local sha = redis.call('HGET', k, 'sha256')
  if sha then redis.call('DEL', ARGV[2] .. 'sha:' .. sha) end
  redis.call('DEL', k)
  redis.call('SREM', KEYS[3], id)
end
redis.call('DEL', KEYS[2])
return 1
"""


class StateUnavailable(APIError, InferFluxError):
    """The Redis state backend cannot be reached: 503 to a client, one line to the CLI."""

    def __init__(self, url: str, exc: BaseException) -> None:
        super().__init__(503, f"state backend {url} is unreachable: {exc}", type="service_unavailable",
                         code="service_unavailable")


def redact(url: str) -> str:
    """`url` without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = (f"{parts.username}:***@" if parts.username else ":***@") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _float(value: str | None) -> float | None:
    return None if value is None or value == "" else float(value)


class RedisKeyStore:
    """The tenants and keys in one Redis database; thread-safe (redis-py's connection pool)."""

    def __init__(self, url: str) -> None:
        self.path = redact(url)  # what messages name, like KeyStore.path
        self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=5.0)
        self._create_key = self._r.register_script(_CREATE_KEY)
        self._revoke = self._r.register_script(_REVOKE)
        self._delete_tenant = self._r.register_script(_DELETE_TENANT)
        self._used: dict[str, float] = {}
        self._used_lock = threading.Lock()
        self._call(self._r.ping)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StateUnavailable(self.path, exc) from None

    def close(self) -> None:
        self._r.close()

    # --- tenants ---

    def create_tenant(self, name: str) -> dict[str, Any]:
        check_tenant(name)
        if not self._call(self._r.hsetnx, PREFIX + "tenants", name, repr(time.time())):
            raise KeyStoreError(f"tenant {name!r} exists already")
        return self.tenant(name)

    def tenant(self, name: str) -> dict[str, Any]:
        pipe = self._r.pipeline()
        pipe.hget(PREFIX + "tenants", name)
        pipe.scard(f"{PREFIX}tenant:{name}")
        created, count = self._call(pipe.execute)
        if created is None:
            raise NotFoundError(f"no tenant {name!r} (`inferctl admin tenants list` lists them)")
        return {"name": name, "created": float(created), "keys": count}

    def tenants(self) -> list[dict[str, Any]]:
        rows = sorted(self._call(self._r.hgetall, PREFIX + "tenants").items())
        pipe = self._r.pipeline()
        for name, _ in rows:
            pipe.scard(f"{PREFIX}tenant:{name}")
        counts = self._call(pipe.execute) if rows else []
        return [{"name": n, "created": float(c), "keys": k} for (n, c), k in zip(rows, counts)]

    def delete_tenant(self, name: str) -> None:
        """Delete a tenant and its keys, atomically (they stop working at the next request on every replica)."""
        keys = [PREFIX + "tenants", f"{PREFIX}tenant:{name}", PREFIX + "keys"]
        if not self._call(self._delete_tenant, keys=keys, args=[name, PREFIX]):
            raise NotFoundError(f"no tenant {name!r}")

    # --- keys ---

    def create_key(self, tenant: str, scopes: str | list[str], expires_in: float | None = None,
                   name: str = "", expires_at: float | None = None) -> tuple[str, ApiKey]:
        """A new key for `tenant`: (the key, to show once, never again; its record)."""
        allowed = parse_scopes(scopes)
        now = time.time()
        expires = expires_at if expires_at is not None else (now + expires_in if expires_in else None)
        secret, key_id = new_key()
        digest = hash_key(secret)
        keys = [PREFIX + "tenants", f"{PREFIX}key:{key_id}", f"{PREFIX}sha:{digest}", f"{PREFIX}tenant:{tenant}",
                PREFIX + "keys"]
        args = [tenant, key_id, name, digest, ",".join(allowed), repr(now), "" if expires is None else repr(expires)]
        if not self._call(self._create_key, keys=keys, args=args):
            raise NotFoundError(f"no tenant {tenant!r} (`inferctl admin tenants list` lists them)")
        return secret, self.key(key_id)

    def key(self, key_id: str) -> ApiKey:
        found = self._records([key_id])
        if not found:
            raise NotFoundError(f"no key {key_id!r} (`inferctl admin keys list` lists them)")
        return found[0]

    def keys(self, tenant: str | None = None) -> list[ApiKey]:
        if tenant is not None:
            self.tenant(tenant)
            return sorted(self._records(self._call(self._r.smembers, f"{PREFIX}tenant:{tenant}")),
                          key=lambda k: (k.created, k.id))
        return sorted(self._records(self._call(self._r.smembers, PREFIX + "keys")),
                      key=lambda k: (k.tenant, k.created, k.id))

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked (it stays listed); idempotent, atomic."""
        if not self._call(self._revoke, keys=[f"{PREFIX}key:{key_id}"], args=[repr(time.time())]):
            raise NotFoundError(f"no key {key_id!r}")
        return self.key(key_id)

    def authenticate(self, secret: str) -> Principal:
        """The principal a presented key stands for; AuthenticationError if it is unknown, revoked or expired."""
        key_id = self._call(self._r.get, f"{PREFIX}sha:{hash_key(secret)}")
        row = self._call(self._r.hgetall, f"{PREFIX}key:{key_id}") if key_id else None
        if not row:
            raise AuthenticationError("invalid API key")
        now = time.time()
        if row.get("revoked"):
            raise AuthenticationError(f"API key {key_id} has been revoked")
        expires = _float(row.get("expires"))
        if expires is not None and expires <= now:
            raise AuthenticationError(f"API key {key_id} has expired")
        with self._used_lock:
            stale = now - self._used.get(key_id, 0.0) >= _LAST_USED_EVERY
            if stale:
                self._used[key_id] = now
        if stale:
            self._call(self._r.hset, f"{PREFIX}key:{key_id}", "last_used", repr(now))
        return Principal(row["tenant"], key_id, frozenset(row["scopes"].split(",")))

    def _records(self, ids: Any) -> list[ApiKey]:
        ids = list(ids)
        pipe = self._r.pipeline()
        for key_id in ids:
            pipe.hgetall(f"{PREFIX}key:{key_id}")
        rows = self._call(pipe.execute) if ids else []
        return [ApiKey(key_id, r["tenant"], r.get("name", ""), tuple(r["scopes"].split(",")), float(r["created"]),
                       _float(r.get("expires")), _float(r.get("revoked")), _float(r.get("last_used")))
                for key_id, r in zip(ids, rows) if r]


AnyKeyStore = KeyStore | RedisKeyStore


def check_state(config: Config) -> None:
    """At start, before the model loads: a Redis state backend must answer (one line naming it, else)."""
    if config.state.backend == "redis":
        RedisKeyStore(config.state.redis_url).close()


def open_key_store(config: Config) -> AnyKeyStore:
    """The key store `state.backend` names: `$INFERFLUX_HOME/state.db`, or the Redis at `state.redis_url`."""
    if config.state.backend == "redis":
        return RedisKeyStore(config.state.redis_url)
    return KeyStore.at_home(config.home_path)
