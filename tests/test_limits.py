"""Per-tenant limits (RPM, TPM, concurrency, max_tokens cap): the limiter itself under many threads (SQLite
and a real redis-server), then real servers with auth required and the real `openai`/`ollama` clients.

Windows are fixed 60 s ones, so a test that counts exactly first waits out a window that is about to
end (`fresh_window`): a count split over two windows would be right but not the number asserted.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from inferflux.server.access.errors import KeyStoreError, RateLimited
from inferflux.server.access.keys import KeyStore
from inferflux.server.access.limits import WINDOW, SqliteLimiter, TenantLimits, duration
from inferflux.server.access.limits_redis import RedisLimiter

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "hi"}]


def fresh_window(need: float = 20.0) -> None:
    """Sleep into the next window when fewer than `need` seconds of this one are left."""
    left = WINDOW - time.time() % WINDOW
    if left < need:
        time.sleep(left + 0.05)


def hammer(limiters: list, tenant: str, tokens: int, threads: int = 16, tries: int = 10) -> list:
    """`threads` threads, each `tries` admissions of `tokens`, spread over `limiters`: the reservations made."""
    admitted, barrier, lock = [], threading.Barrier(threads), threading.Lock()

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(tries):
            try:
                got = limiters[i % len(limiters)].admit(tenant, tokens)
            except RateLimited as exc:
                assert int(exc.rate_headers["Retry-After"]) >= 1
                continue
            with lock:
                admitted.append(got)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    return admitted


@pytest.fixture(params=["sqlite", "redis"])
def limiters(request, tmp_path: Path):
    """Two limiters on ONE store (two processes' worth): the same state.db file, or the same Redis database."""
    if request.param == "sqlite":
        made = [SqliteLimiter.at_home(tmp_path), SqliteLimiter.at_home(tmp_path)]
    else:
        url = request.getfixturevalue("redis_url")
        made = [RedisLimiter(url), RedisLimiter(url)]
    yield made
    for limiter in made:
        limiter.close()


def test_tpm_is_never_overshot_by_many_threads(limiters) -> None:
    first = limiters[0]
    first.set("acme", {"tpm": 1000})
    assert limiters[1].get("acme") == TenantLimits(tpm=1000)
    fresh_window()
    admitted = hammer(limiters, "acme", 30)  # 160 tries of 30 tokens against 1000
    assert len(admitted) == 1000 // 30 and sum(r.tokens for r in admitted) == 990
    assert first.usage("acme")["tokens"] == 990 and first.usage("acme")["in_flight"] == len(admitted)
    for reservation in admitted:  # each used a third: two thirds come back
        limiters[1].reconcile(reservation, 10)
    usage = first.usage("acme")
    assert usage["tokens"] == 10 * len(admitted) and usage["in_flight"] == 0
    # what came back is admitted again, up to the limit exactly
    more = hammer(limiters, "acme", 30)
    assert sum(r.tokens for r in more) + usage["tokens"] <= 1000 and len(more) == (1000 - usage["tokens"]) // 30


def test_rpm_and_concurrency_are_exact(limiters) -> None:
    first, second = limiters
    first.set("acme", {"rpm": 25})
    fresh_window()
    assert len(hammer(limiters, "acme", 1)) == 25
    with pytest.raises(RateLimited, match="25 requests per minute") as caught:
        second.admit("acme", 1)
    headers = caught.value.rate_headers
    assert headers["x-ratelimit-limit-requests"] == "25" and headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["Retry-After"]) <= WINDOW and "x-ratelimit-limit-tokens" not in headers
    first.set("other", {"concurrency": 3})  # each admission holds its slot until reconciled
    running = hammer(limiters, "other", 1)
    assert len(running) == 3 and first.usage("other")["in_flight"] == 3
    with pytest.raises(RateLimited, match="3 requests running") as caught:
        second.admit("other", 1)
    assert caught.value.rate_headers["Retry-After"] == "1"
    second.reconcile(running[0], 1)
    assert first.admit("other", 1) is not None


def test_limits_records(limiters) -> None:
    first, second = limiters
    assert first.get("nobody") is None and first.admit("nobody", 10**9) is None  # no limits: unlimited
    assert first.set("acme", {"rpm": 5, "max_tokens": 64}) == TenantLimits(rpm=5, max_tokens=64)
    assert second.set("acme", {"tpm": 900, "rpm": None}) == TenantLimits(rpm=5, tpm=900, max_tokens=64)
    assert list(second.all()) == ["acme"]
    for bad in ({"rpm": -1}, {"tpm": 1.5}, {"burst": 3}, {"rpm": True}):
        with pytest.raises(KeyStoreError):
            first.set("acme", bad)
    with pytest.raises(KeyStoreError):
        first.set("no tenant!", {"rpm": 1})
    with pytest.raises(RateLimited, match="more than tenant acme's limit of 900"):
        first.admit("acme", 901)  # can never fit: said so, not "try later"
    assert first.delete("acme") and not second.delete("acme") and second.get("acme") is None


def test_reset_durations_are_openais() -> None:
    assert [duration(s) for s in (0.02, 1, 1.5, 59.9999, 360, 61.25)] == ["20ms", "1s", "1.5s", "1m0s", "6m0s",
                                                                          "1m1.25s"]
