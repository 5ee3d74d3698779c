"""Per-tenant limits: requests per minute, tokens per minute, concurrent requests, and a `max_tokens` cap.

Admission reserves before the engine sees a request, and reconciles when the request ends:

- `admit(tenant, tokens)` takes one request (RPM), one concurrency slot and `tokens` (TPM: the prompt
  plus `max_tokens` for every sample, the most the request can use) in ONE atomic step, or takes
  nothing and raises `RateLimited` (429). Because the check and the take are one step, twenty
  simultaneous requests cannot all see "room left" and overshoot a limit together.
- `reconcile(reservation, used)` releases the slot and gives back what the request did not use
  (`reserved - prompt - completion`), so a tenant is charged its real usage, not its worst case.

Windows are FIXED 60-second windows aligned to the clock's minutes (`floor(now / 60)`): the counters
reset at each minute. A fixed window is one counter per tenant, which makes both the reservation and
the give-back one row (SQLite) or one hash (Redis) update; the price is that a tenant can use up to
twice its limit across one minute boundary (end of one window, start of the next), as with
OpenAI's own per-minute limits. Tokens given back after the window rolled over are dropped (the old
window is gone). Concurrency slots are leases: a slot a crashed server never released expires after
`SLOT_LEASE` seconds.

Two stores, chosen by `state.backend`: `SqliteLimiter` here (`$INFERFLUX_HOME/state.db`, tables
`limits`, `limit_usage`, `limit_slots`; one `BEGIN IMMEDIATE` transaction per admission, so even two
processes on one file stay exact) and `RedisLimiter` (limits_redis.py: one Lua script per admission
and per reconcile, so every server on one Redis enforces one shared limit). Limits are keyed by
tenant name, independent of where the tenants and keys themselves live.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from inferflux.server.access.errors import KeyStoreError, RateLimited
from inferflux.server.state_db import open_state_db, state_db_path

WINDOW = 60  # seconds per window
SLOT_LEASE = 3600.0  # seconds after which an unreleased concurrency slot is dropped
FIELDS = ("rpm", "tpm", "concurrency", "max_tokens")
MAX_VALUE = 1 << 40
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS limits (
    tenant TEXT PRIMARY KEY,
    rpm INTEGER NOT NULL DEFAULT 0,
    tpm INTEGER NOT NULL DEFAULT 0,
    concurrency INTEGER NOT NULL DEFAULT 0,
    max_tokens INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS limit_usage (
    tenant TEXT PRIMARY KEY,
    window INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS limit_slots (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS limit_slots_tenant ON limit_slots (tenant, started);
"""


@dataclasses.dataclass(frozen=True)
class TenantLimits:
    """One tenant's limits; 0 means no limit of that kind."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    max_tokens: int = 0

    def public(self, tenant: str) -> dict[str, Any]:
        return {"tenant": tenant, **dataclasses.asdict(self)}

    def merged(self, changes: dict[str, int | None]) -> TenantLimits:
        """These limits with the given fields replaced (None: keep), each checked."""
        values = {k: v for k, v in changes.items() if v is not None}
        for name, value in values.items():
            if name not in FIELDS:
                raise KeyStoreError(f"unknown limit {name!r}: limits are {', '.join(FIELDS)}")
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VALUE:
                raise KeyStoreError(f"limit {name} must be a whole number from 0 (no limit) to {MAX_VALUE}")
        return dataclasses.replace(self, **values)


@dataclasses.dataclass
class Reservation:
    """What one admission took (given back by `reconcile`), and the counters after it (for the headers)."""

    tenant: str
    slot: str  # the concurrency slot's id ("" for none)
    window: int
    tokens: int  # reserved
    limits: TenantLimits
    requests_used: int  # in this window, this request included
    tokens_used: int
    reset: float  # seconds until the window ends

    def headers(self) -> dict[str, str]:
        return rate_headers(self.limits, self.requests_used, self.tokens_used, self.reset)


def check_tenant(name: str) -> str:
    if not _TENANT.fullmatch(name):
        raise KeyStoreError(f"tenant {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: `20ms`, `1s`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def rate_headers(limits: TenantLimits, requests: int, tokens: int, reset: float) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the limits a tenant has (none for a kind without a limit)."""
    headers = {}
    if limits.rpm:
        headers.update({"x-ratelimit-limit-requests": str(limits.rpm),
                        "x-ratelimit-remaining-requests": str(max(0, limits.rpm - requests)),
                        "x-ratelimit-reset-requests": duration(reset)})
    if limits.tpm:
        headers.update({"x-ratelimit-limit-tokens": str(limits.tpm),
                        "x-ratelimit-remaining-tokens": str(max(0, limits.tpm - tokens)),
                        "x-ratelimit-reset-tokens": duration(reset)})
    return headers


def refusal(kind: str, tenant: str, limits: TenantLimits, requests: int, tokens: int, in_flight: int,
            want: int, reset: float) -> RateLimited:
    """The 429 for an admission that did not fit: why, and when to come back (`Retry-After`)."""
    retry = reset
    if kind == "concurrency":
        retry = 1.0  # a slot frees when any running request ends: no window to wait for
        message = (f"tenant {tenant} has {in_flight} requests running; its limit is {limits.concurrency} "
                   "concurrent requests")
    elif kind == "rpm":
        message = f"tenant {tenant} reached its limit of {limits.rpm} requests per minute"
    elif want > limits.tpm:
        message = (f"this request needs up to {want} tokens (prompt + max_tokens), more than tenant {tenant}'s "
                   f"limit of {limits.tpm} tokens per minute: lower max_tokens or shorten the prompt")
    else:
        message = (f"tenant {tenant} reached its limit of {limits.tpm} tokens per minute ({tokens} used or reserved; "
                   f"this request needs up to {want})")
    headers = rate_headers(limits, requests, tokens, reset)
    headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return RateLimited(message, headers)


class Limiter(Protocol):
    """What both stores do (`SqliteLimiter`, `limits_redis.RedisLimiter`)."""

    def get(self, tenant: str) -> TenantLimits | None: ...
    def all(self) -> dict[str, TenantLimits]: ...
    def set(self, tenant: str, changes: dict[str, int | None]) -> TenantLimits: ...
    def delete(self, tenant: str) -> bool: ...
    def usage(self, tenant: str) -> dict[str, Any]: ...
    def admit(self, tenant: str, tokens: int, requests: int = 1, slot: bool = True) -> Reservation | None: ...
    def reconcile(self, reservation: Reservation, used_tokens: int) -> None: ...


def open_limiter(backend: str, redis_url: str, home: str | Path) -> Limiter:
    """The limiter `state.backend` names: `state.db` under `home`, or the Redis at `redis_url`."""
    if backend == "redis":
        from inferflux.server.access.limits_redis import RedisLimiter

        return RedisLimiter(redis_url)
    return SqliteLimiter.at_home(home)


def new_slot() -> str:
    return "slot_" + secrets.token_hex(8)


class SqliteLimiter:
    """Limits and counters in one `state.db` (WAL); one connection and lock, one transaction per admission."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_state_db(self.path)
        self._db.executescript(_SCHEMA)

    @classmethod
    def at_home(cls, home: str | Path) -> SqliteLimiter:
        return cls(state_db_path(home))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, tenant: str) -> TenantLimits | None:
        with self._lock:
            row = self._db.execute("SELECT rpm, tpm, concurrency, max_tokens FROM limits WHERE tenant = ?",
                                   (tenant,)).fetchone()
        return None if row is None else TenantLimits(*row)

    def all(self) -> dict[str, TenantLimits]:
        with self._lock:
            rows = self._db.execute("SELECT tenant, rpm, tpm, concurrency, max_tokens FROM limits "
                                    "ORDER BY tenant").fetchall()
        return {r[0]: TenantLimits(*r[1:]) for r in rows}

    def set(self, tenant: str, changes: dict[str, int | None]) -> TenantLimits:
        """Set the given limits of `tenant` (None: keep the current value; 0: no limit)."""
        check_tenant(tenant)
        with self._lock, self._transaction():
            row = self._db.execute("SELECT rpm, tpm, concurrency, max_tokens FROM limits WHERE tenant = ?",
                                   (tenant,)).fetchone()
            limits = (TenantLimits(*row) if row else TenantLimits()).merged(changes)
            self._db.execute("INSERT OR REPLACE INTO limits VALUES (?, ?, ?, ?, ?, ?)",
                             (tenant, *dataclasses.astuple(limits), time.time()))
        return limits

    def delete(self, tenant: str) -> bool:
        with self._lock, self._transaction():
            found = self._db.execute("DELETE FROM limits WHERE tenant = ?", (tenant,)).rowcount > 0
            self._db.execute("DELETE FROM limit_usage WHERE tenant = ?", (tenant,))
        return found

    def usage(self, tenant: str) -> dict[str, Any]:
        """This window's counters: requests, tokens (used or reserved), requests running, seconds to reset."""
        now = time.time()
        window = int(now // WINDOW)
        with self._lock:
            row = self._db.execute("SELECT window, requests, tokens FROM limit_usage WHERE tenant = ?",
                                   (tenant,)).fetchone()
            running = self._db.execute("SELECT count(*) FROM limit_slots WHERE tenant = ? AND started > ?",
                                       (tenant, now - SLOT_LEASE)).fetchone()[0]
        requests, tokens = (row[1], row[2]) if row and row[0] == window else (0, 0)
        return {"requests": requests, "tokens": tokens, "in_flight": running,
                "reset_seconds": round((window + 1) * WINDOW - now, 3)}

    def admit(self, tenant: str, tokens: int, requests: int = 1, slot: bool = True) -> Reservation | None:
        """Reserve `requests`, `tokens` and (with `slot`) a concurrency slot for `tenant` at once, or raise
        RateLimited; None when the tenant has no limits."""
        slot_id = new_slot() if slot else ""
        with self._lock, self._transaction():
            row = self._db.execute("SELECT rpm, tpm, concurrency, max_tokens FROM limits WHERE tenant = ?",
                                   (tenant,)).fetchone()
            if row is None:
                return None
            limits = TenantLimits(*row)
            now = time.time()
            window = int(now // WINDOW)
            reset = (window + 1) * WINDOW - now
            usage = self._db.execute("SELECT window, requests, tokens FROM limit_usage WHERE tenant = ?",
                                     (tenant,)).fetchone()
            used_requests, used_tokens = (usage[1], usage[2]) if usage and usage[0] == window else (0, 0)
            self._db.execute("DELETE FROM limit_slots WHERE tenant = ? AND started <= ?", (tenant, now - SLOT_LEASE))
            running = self._db.execute("SELECT count(*) FROM limit_slots WHERE tenant = ?", (tenant,)).fetchone()[0]
            kind = _over(limits, running if slot else 0, used_requests + requests, used_tokens + tokens)
            if kind:
                raise refusal(kind, tenant, limits, used_requests, used_tokens, running, tokens, reset)
            self._db.execute("INSERT OR REPLACE INTO limit_usage VALUES (?, ?, ?, ?)",
                             (tenant, window, used_requests + requests, used_tokens + tokens))
            if slot_id:
                self._db.execute("INSERT INTO limit_slots VALUES (?, ?, ?)", (slot_id, tenant, now))
        return Reservation(tenant, slot_id, window, tokens, limits, used_requests + requests, used_tokens + tokens,
                           reset)

    def reconcile(self, reservation: Reservation, used_tokens: int) -> None:
        """Release the slot; give back reserved tokens the request did not use (in the same window only)."""
        unused = reservation.tokens - used_tokens
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM limit_slots WHERE id = ?", (reservation.slot,))
            if unused:
                self._db.execute("UPDATE limit_usage SET tokens = max(0, tokens - ?) WHERE tenant = ? AND window = ?",
                                 (unused, reservation.tenant, reservation.window))

    def _transaction(self) -> _Immediate:
        return _Immediate(self._db)


class _Immediate:
    """`BEGIN IMMEDIATE` ... `COMMIT` (ROLLBACK on an exception): the write lock is taken before the first read."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _over(limits: TenantLimits, running: int, requests: int, tokens: int) -> str:
    """Which limit an admission would break ("" if none), checked in the order a client can act on."""
    if limits.concurrency and running >= limits.concurrency:
        return "concurrency"
    if limits.rpm and requests > limits.rpm:
        return "rpm"
    if limits.tpm and tokens > limits.tpm:
        return "tpm"
    return ""
