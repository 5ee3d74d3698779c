"""Per-tenant limits in Redis (`state.backend: redis`): every server on one Redis enforces one limit.

The same fixed 60 s windows and reservations as `limits.SqliteLimiter`, with each admission and each
reconcile ONE Lua script (`EVALSHA`, through redis-py's `register_script`): Redis runs a script
without interleaving any other command, so the read-check-write of two servers admitting the same
tenant's requests cannot interleave, and the clock is Redis's own (`TIME`), so servers whose clocks
differ still agree on the window.

Keys, all with the tenant as a hash tag (`{T}`) so one tenant's keys share a Redis Cluster slot:
`inferflux:limits:{T}` (hash: rpm, tpm, concurrency, max_tokens), `inferflux:limits:{T}:usage`
(hash: window, requests, tokens; expires after two windows) and `inferflux:limits:{T}:slots` (sorted
set of running requests' slot ids by start time; a slot older than `SLOT_LEASE` is dropped), plus the
set `inferflux:limits:tenants` for listing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import redis

from inferflux.server.access.limits import (
    FIELDS,
    SLOT_LEASE,
    WINDOW,
    Reservation,
    TenantLimits,
    check_tenant,
    new_slot,
    refusal,
)
from inferflux.server.errors import unavailable

_PREFIX = "inferflux:limits:"
_TENANTS = _PREFIX + "tenants"

# KEYS: limits, usage, slots. ARGV: tokens, requests, slot id ('' = take no slot), lease, window seconds.
# Returns {status, window, requests, tokens, reset (string), in_flight, rpm, tpm, concurrency, max_tokens}:
# status 0 = the tenant has no limits, 1 = admitted, 2/3/4 = refused by concurrency/rpm/tpm.
_ADMIT = """
local lim = redis.call('HMGET', KEYS[1], 'rpm', 'tpm', 'concurrency', 'max_tokens')
if not lim[1] then return {0} end
local rpm, tpm, conc = tonumber(lim[1]), tonumber(lim[2]), tonumber(lim[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local span = tonumber(ARGV[5])
local window = math.floor(now / span)
local reset = tostring((window + 1) * span - now)
local u = redis.call('HMGET', KEYS[2], 'window', 'requests', 'tokens')
local requests, tokens = 0, 0
if tonumber(u[1]) == window then requests = tonumber(u[2]); tokens = tonumber(u[3]) end
local want_tokens, want_requests = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]))
local running = redis.call('ZCARD', KEYS[3])
local status = 1
if conc > 0 and ARGV[3] ~= '' and running >= conc then status = 2
elseif rpm > 0 and requests + want_requests > rpm then status = 3
elseif tpm > 0 and tokens + want_tokens > tpm then status = 4 end
if status == 1 then
  requests = requests + want_requests
  tokens = tokens + want_tokens
  redis.call('HSET', KEYS[2], 'window', window, 'requests', requests, 'tokens', tokens)
  redis.call('EXPIRE', KEYS[2], 2 * span)
  if ARGV[3] ~= '' then
    redis.call('ZADD', KEYS[3], now, ARGV[3])
    redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
  end
end
return {status, window, requests, tokens, reset, running, lim[1], lim[2], lim[3], lim[4]}
"""

# KEYS: usage, slots. ARGV: window, unused tokens, slot id.
_RECONCILE = """
redis.call('ZREM', KEYS[2], ARGV[3])
local unused = tonumber(ARGV[2])
if unused ~= 0 and tonumber(redis.call('HGET', KEYS[1], 'window')) == tonumber(ARGV[1]) then
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens')) - unused
  if tokens < 0 then tokens = 0 end
  redis.call('HSET', KEYS[1], 'tokens', tokens)
end
return 1
"""

_KINDS = {2: "concurrency", 3: "rpm", 4: "tpm"}


def _keys(tenant: str) -> tuple[str, str, str]:
    base = f"{_PREFIX}{{{tenant}}}"
    return base, base + ":usage", base + ":slots"


class RedisLimiter:
    """Limits and counters in one Redis database; safe to share between threads (redis-py's pool)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._redis = redis.Redis.from_url(url, decode_responses=True)
        self._admit = self._redis.register_script(_ADMIT)
        self._reconcile = self._redis.register_script(_RECONCILE)

    def close(self) -> None:
        self._redis.close()

    def get(self, tenant: str) -> TenantLimits | None:
        try:
            values = self._redis.hmget(_keys(tenant)[0], FIELDS)
        except redis.RedisError as exc:
            raise unavailable(f"the tenant limits store (Redis) is unavailable: {type(exc).__name__}") from None
        return None if values[0] is None else TenantLimits(*(int(v or 0) for v in values))

    def all(self) -> dict[str, TenantLimits]:
        out = {}
        for tenant in sorted(str(t) for t in self._redis.smembers(_TENANTS)):  # type: ignore[union-attr]
            limits = self.get(tenant)
            if limits is not None:
                out[tenant] = limits
        return out

    def set(self, tenant: str, changes: dict[str, int | None]) -> TenantLimits:
        """Set the given limits (None: keep; 0: no limit). WATCH/MULTI, so two admins' changes both land."""
        check_tenant(tenant)
        key = _keys(tenant)[0]
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    values = pipe.hmget(key, FIELDS)
                    current = TenantLimits(*(int(v or 0) for v in values)) if values[0] is not None else TenantLimits()
                    limits = current.merged(changes)
                    pipe.multi()
                    fields: dict[str, int | float] = {**dataclasses.asdict(limits), "updated": time.time()}
                    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                    pipe.sadd(_TENANTS, tenant)
                    pipe.execute()
                    return limits
                except redis.WatchError:
                    continue

    def delete(self, tenant: str) -> bool:
        limits, usage, _ = _keys(tenant)
        with self._redis.pipeline() as pipe:
            pipe.delete(limits, usage)
            pipe.srem(_TENANTS, tenant)
            deleted, _removed = pipe.execute()
        return bool(deleted)

    def usage(self, tenant: str) -> dict[str, Any]:
        _, usage, slots = _keys(tenant)
        seconds, micros = self._redis.time()  # type: ignore[misc]
        now = seconds + micros / 1e6
        window = int(now // WINDOW)
        row = self._redis.hmget(usage, ("window", "requests", "tokens"))
        requests, tokens = (int(row[1] or 0), int(row[2] or 0)) if row[0] is not None and int(row[0]) == window \
            else (0, 0)
        running = self._redis.zcount(slots, now - SLOT_LEASE, "+inf")
        return {"requests": requests, "tokens": tokens, "in_flight": running,
                "reset_seconds": round((window + 1) * WINDOW - now, 3)}

    def admit(self, tenant: str, tokens: int, requests: int = 1, slot: bool = True) -> Reservation | None:
        """Reserve `requests`, `tokens` and (with `slot`) a slot at once, in one script, or raise RateLimited;
        None when the tenant has no limits."""
        slot_id = new_slot() if slot else ""
        try:
            out = self._admit(keys=_keys(tenant), args=[tokens, requests, slot_id, SLOT_LEASE, WINDOW])
        except redis.RedisError as exc:  # a 503, never a 500; the URL (it may hold a password) is not repeated
            raise unavailable(f"the tenant limits store (Redis) is unavailable: {type(exc).__name__}") from None
        status = int(out[0])
        if status == 0:
            return None
        window, used_requests, used_tokens, reset, running = int(out[1]), int(out[2]), int(out[3]), \
            float(out[4]), int(out[5])
        limits = TenantLimits(*(int(v or 0) for v in out[6:10]))
        if status != 1:
            raise refusal(_KINDS[status], tenant, limits, used_requests, used_tokens, running, tokens, reset)
        return Reservation(tenant, slot_id, window, tokens, limits, used_requests, used_tokens, reset)

    def reconcile(self, reservation: Reservation, used_tokens: int) -> None:
        _, usage, slots = _keys(reservation.tenant)
        self._reconcile(keys=[usage, slots], args=[reservation.window, reservation.tokens - used_tokens,
                                                   reservation.slot])
