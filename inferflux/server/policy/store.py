"""Versioned policy documents: in `$INFERFLUX_HOME/state.db`, or in Redis (`state.backend: redis`).

Every change (a `set`, a `rollback`) is a new row with the next number of ONE global sequence, the
`policy_version`: a scope's document is its newest row. Rolling back to version N writes N's
document again as a new version, so history is never rewritten and `policy_version` only grows.
That single number is what a server's watcher compares (`watch.py`: on each message published on
`CHANNEL`, and every `policy.poll_seconds`): when it moved, the server reloads the documents it
holds in memory for its requests, so a change made by `inferctl admin policy` on this host, or by
any replica on the same Redis, applies without a store read per request.

The salt of the `hash` action lives beside the documents (32 random bytes, made once), so hashes
are stable across restarts and equal on every replica, and are not reversible by hashing guesses
without it.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from inferflux.server.errors import not_found
from inferflux.server.state_db import open_state_db, state_db_path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy_versions (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL,
    document TEXT NOT NULL,
    created REAL NOT NULL,
    actor TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS policy_versions_scope ON policy_versions (scope, version);
CREATE TABLE IF NOT EXISTS policy_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class PolicyStore(Protocol):
    def version(self) -> int: ...
    def current(self) -> dict[str, dict[str, Any]]: ...
    def history(self, scope: str | None = None) -> list[dict[str, Any]]: ...
    def get(self, version: int) -> dict[str, Any]: ...
    def put(self, scope: str, document: dict[str, Any], actor: str) -> dict[str, Any]: ...
    def salt(self) -> bytes: ...


def _row(version: int, scope: str, document: str, created: float, actor: str) -> dict[str, Any]:
    return {"version": version, "scope": scope, "document": json.loads(document), "created": created, "actor": actor}


class SqlitePolicyStore:
    """The policy tables of one `state.db` (WAL, shared with the key store and `inferctl admin`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_state_db(self.path, synchronous="FULL")
        self._db.executescript(_SCHEMA)

    def version(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(version) FROM policy_versions").fetchone()
        return int(row[0] or 0)

    def current(self) -> dict[str, dict[str, Any]]:
        """Each scope's newest document: {scope: row}."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version, scope, document, created, actor FROM policy_versions WHERE version IN "
                "(SELECT MAX(version) FROM policy_versions GROUP BY scope) ORDER BY scope").fetchall()
        return {r[1]: _row(*r) for r in rows}

    def history(self, scope: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT version, scope, document, created, actor FROM policy_versions"
                + (" WHERE scope = ?" if scope else "") + " ORDER BY version", (scope,) if scope else ()).fetchall()
        return [_row(*r) for r in rows]

    def get(self, version: int) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT version, scope, document, created, actor FROM policy_versions "
                                   "WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise not_found(f"there is no policy version {version} (`inferctl admin policy list` shows them)")
        return _row(*row)

    def put(self, scope: str, document: dict[str, Any], actor: str) -> dict[str, Any]:
        text = json.dumps(document, sort_keys=True)
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO policy_versions (scope, document, created, actor) VALUES (?, ?, ?, ?)",
                (scope, text, now, actor))
        return _row(int(cursor.lastrowid or 0), scope, text, now, actor)

    def salt(self) -> bytes:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO policy_meta (name, value) VALUES ('hash_salt', ?)",
                             (secrets.token_hex(32),))
            row = self._db.execute("SELECT value FROM policy_meta WHERE name = 'hash_salt'").fetchone()
        return bytes.fromhex(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PREFIX = "inferflux:policy:"
CHANNEL = _PREFIX + "changed"  # a version number is published here on every change


class RedisPolicyStore:
    """The same in Redis: `inferflux:policy:version` (the sequence), `inferflux:policy:v:N` (hash per
    version), `inferflux:policy:scope:S` (the scope's newest version), `inferflux:policy:scopes` (set)."""

    def __init__(self, url: str) -> None:
        import redis

        self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=5.0)

    def version(self) -> int:
        return int(self._r.get(_PREFIX + "version") or 0)

    def current(self) -> dict[str, dict[str, Any]]:
        scopes = sorted(str(s) for s in self._r.smembers(_PREFIX + "scopes"))  # type: ignore[union-attr]
        versions: list[Any] = self._r.mget([_PREFIX + "scope:" + s for s in scopes]) if scopes else []  # type: ignore[assignment]
        rows = [self.get(int(v)) for v in versions if v]
        return {row["scope"]: row for row in rows}

    def history(self, scope: str | None = None) -> list[dict[str, Any]]:
        rows = []
        for version in range(1, self.version() + 1):
            data: dict[str, str] = self._r.hgetall(_PREFIX + f"v:{version}")  # type: ignore[assignment]
            if data and (scope is None or data["scope"] == scope):
                rows.append(_row(version, data["scope"], data["document"], float(data["created"]), data["actor"]))
        return rows

    def get(self, version: int) -> dict[str, Any]:
        data: dict[str, str] = self._r.hgetall(_PREFIX + f"v:{version}")  # type: ignore[assignment]
        if not data:
            raise not_found(f"there is no policy version {version} (`inferctl admin policy list` shows them)")
        return _row(version, data["scope"], data["document"], float(data["created"]), data["actor"])

    def put(self, scope: str, document: dict[str, Any], actor: str) -> dict[str, Any]:
        text, now = json.dumps(document, sort_keys=True), time.time()
        version = int(self._r.incr(_PREFIX + "version"))  # type: ignore[arg-type]
        pipe = self._r.pipeline()
        pipe.hset(_PREFIX + f"v:{version}", mapping={"scope": scope, "document": text, "created": str(now),
                                                     "actor": actor})
        pipe.set(_PREFIX + "scope:" + scope, version)
        pipe.sadd(_PREFIX + "scopes", scope)
        pipe.publish(CHANNEL, str(version))
        pipe.execute()
        return _row(version, scope, text, now, actor)

    def salt(self) -> bytes:
        self._r.set(_PREFIX + "hash_salt", secrets.token_hex(32), nx=True)
        return bytes.fromhex(str(self._r.get(_PREFIX + "hash_salt")))


def open_policy_store(backend: str, redis_url: str, home: str | Path) -> PolicyStore:
    """The store `state.backend` names."""
    if backend == "redis":
        return RedisPolicyStore(redis_url)
    return SqlitePolicyStore(state_db_path(home))


__all__ = ["CHANNEL", "PolicyStore", "RedisPolicyStore", "SqlitePolicyStore", "open_policy_store"]
