"""Tenants and API keys in `$INFERFLUX_HOME/state.db` (SQLite in WAL mode, the stdlib `sqlite3`).

A key is `ifx-` + 32 random bytes (`secrets.token_urlsafe`), shown once, in the answer that creates
it. The database keeps only its SHA-256 (a lookup needs no salt: the key is 256 random bits, so the
hash cannot be reversed by guessing) and a short random key id, unrelated to the key, which is what
lists, revocation and logs name. WAL lets a server read while `inferctl admin` writes to the same
file: revoking a key takes effect at the server's next request, with no cache to invalidate.

`last_used` is written at most once a minute per key, so authenticating a request is a read, not a
write, on the hot path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from inferflux.server.access.errors import AuthenticationError, KeyStoreError, NotFoundError
from inferflux.server.access.scopes import parse_scopes
from inferflux.server.state_db import open_state_db, state_db_path

KEY_PREFIX = "ifx-"
_LAST_USED_EVERY = 60.0  # seconds between last_used writes for one key
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    last_used REAL
);
"""


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """A key as lists show it: everything but the key (which is never stored) and its hash."""

    id: str
    tenant: str
    name: str
    scopes: tuple[str, ...]
    created: float
    expires: float | None
    revoked: float | None
    last_used: float | None

    def public(self) -> dict[str, Any]:
        """The JSON an admin list returns."""
        return {**dataclasses.asdict(self), "scopes": list(self.scopes),
                "active": self.revoked is None and (self.expires is None or self.expires > time.time())}


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request comes from, once its key is checked: what a route's scope is checked against."""

    tenant: str
    key_id: str
    scopes: frozenset[str]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(name: str) -> None:
    """The tenant-name rule every backend (SQLite, Redis) applies."""
    if not _TENANT.fullmatch(name):
        raise KeyStoreError(f"tenant {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit")


def new_key() -> tuple[str, str]:
    """(a new key, shown once; its key id, unrelated to it): the same in every backend."""
    return KEY_PREFIX + secrets.token_urlsafe(32), "key_" + secrets.token_hex(6)


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` or `1d12h` as seconds (what `--expires` takes)."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip() or sum(int(n) for n, _ in parts) == 0:
        raise KeyStoreError(f"expires {text!r}: expected a duration like 30d, 12h, 90m, 2w (more than 0)")
    return float(sum(int(n) * _UNIT[u] for n, u in parts))


class KeyStore:
    """The tenants and keys of one `state.db`; safe to share between threads (one connection, one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_state_db(self.path)  # hashes only, but nobody else's business: 0600
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._used: dict[str, float] = {}

    @classmethod
    def at_home(cls, home: str | Path) -> KeyStore:
        return cls(state_db_path(home))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- tenants ---

    def create_tenant(self, name: str) -> dict[str, Any]:
        check_tenant(name)
        with self._lock:
            try:
                self._db.execute("INSERT INTO tenants (name, created) VALUES (?, ?)", (name, time.time()))
            except sqlite3.IntegrityError:
                raise KeyStoreError(f"tenant {name!r} exists already") from None
        return self.tenant(name)

    def tenant(self, name: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT t.name, t.created, count(k.id) FROM tenants t LEFT JOIN api_keys k "
                                   "ON k.tenant = t.name WHERE t.name = ? GROUP BY t.name", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no tenant {name!r} (`inferctl admin tenants list` lists them)")
        return {"name": row[0], "created": row[1], "keys": row[2]}

    def tenants(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT t.name, t.created, count(k.id) FROM tenants t LEFT JOIN api_keys k "
                                    "ON k.tenant = t.name GROUP BY t.name ORDER BY t.name").fetchall()
        return [{"name": n, "created": c, "keys": k} for n, c, k in rows]

    def delete_tenant(self, name: str) -> None:
        """Delete a tenant and its keys (they stop working at the next request)."""
        with self._lock:
            if self._db.execute("DELETE FROM tenants WHERE name = ?", (name,)).rowcount == 0:
                raise NotFoundError(f"no tenant {name!r}")

    # --- keys ---

    def create_key(self, tenant: str, scopes: str | list[str], expires_in: float | None = None,
                   name: str = "", expires_at: float | None = None) -> tuple[str, ApiKey]:
        """A new key for `tenant`: (the key, to show once, never again; its record)."""
        allowed = parse_scopes(scopes)
        self.tenant(tenant)
        now = time.time()
        expires = expires_at if expires_at is not None else (now + expires_in if expires_in else None)
        secret, key_id = new_key()
        with self._lock:
            self._db.execute("INSERT INTO api_keys (id, tenant, name, sha256, scopes, created, expires) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key_id, tenant, name, hash_key(secret), ",".join(allowed), now, expires))
        return secret, self.key(key_id)

    def key(self, key_id: str) -> ApiKey:
        rows = self._select("WHERE id = ?", (key_id,))
        if not rows:
            raise NotFoundError(f"no key {key_id!r} (`inferctl admin keys list` lists them)")
        return rows[0]

    def keys(self, tenant: str | None = None) -> list[ApiKey]:
        if tenant is not None:
            self.tenant(tenant)
            return self._select("WHERE tenant = ? ORDER BY created", (tenant,))
        return self._select("ORDER BY tenant, created", ())

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked (it stays listed, so who held it can still be told); idempotent."""
        with self._lock:
            found = self._db.execute("UPDATE api_keys SET revoked = coalesce(revoked, ?) WHERE id = ?",
                                     (time.time(), key_id)).rowcount
        if not found:
            raise NotFoundError(f"no key {key_id!r}")
        return self.key(key_id)

    def authenticate(self, secret: str) -> Principal:
        """The principal a presented key stands for; AuthenticationError if it is unknown, revoked or expired."""
        with self._lock:
            row = self._db.execute("SELECT id, tenant, scopes, expires, revoked FROM api_keys WHERE sha256 = ?",
                                   (hash_key(secret),)).fetchone()
        if row is None:
            raise AuthenticationError("invalid API key")
        key_id, tenant, scopes, expires, revoked = row
        now = time.time()
        if revoked is not None:
            raise AuthenticationError(f"API key {key_id} has been revoked")
        if expires is not None and expires <= now:
            raise AuthenticationError(f"API key {key_id} has expired")
        if now - self._used.get(key_id, 0.0) >= _LAST_USED_EVERY:
            self._used[key_id] = now
            with self._lock:
                self._db.execute("UPDATE api_keys SET last_used = ? WHERE id = ?", (now, key_id))
        return Principal(tenant, key_id, frozenset(scopes.split(",")))

    def _select(self, where: str, args: tuple[Any, ...]) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute("SELECT id, tenant, name, scopes, created, expires, revoked, last_used "
                                    f"FROM api_keys {where}", args).fetchall()
        return [ApiKey(r[0], r[1], r[2], tuple(r[3].split(",")), r[4], r[5], r[6], r[7]) for r in rows]
