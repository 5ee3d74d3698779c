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


def fresh_window(need: float = 5.0) -> int:
    """Sleep into the next window when fewer than `need` seconds of this one are left; the window's number."""
    left = WINDOW - time.time() % WINDOW
    if left < need:
        time.sleep(left + 0.05)
    return int(time.time() // WINDOW)


def same_window(window: int) -> bool:
    """Still in `window`? (On a loaded machine a burst can outlast it; its counters are then gone, rightly.)"""
    return int(time.time() // WINDOW) == window


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


# --- against real servers (security.auth: required) ---


class Tenants:
    """Tenants with one key each (inference, embeddings) plus an admin key, in a key store the servers read."""

    def __init__(self, store) -> None:
        self.store = store
        self.keys: dict[str, str] = {}
        self.store.create_tenant("ops")
        self.admin, _ = self.store.create_key("ops", "admin")

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            self.store.create_tenant(tenant)
            self.keys[tenant], _ = self.store.create_key(tenant, "inference,embeddings")
        return self.keys[tenant]


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def chat(server, key: str, max_tokens: int = 8, **extra):
    return client(server, key).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=max_tokens,
                                                        extra_body={"ignore_eos": True, **extra})


def burst(calls: list) -> tuple[list, list[openai.RateLimitError]]:
    """Run every call at once (one thread each, released together): (answers, 429s); anything else fails."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            return call()
        except openai.RateLimitError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(run, calls))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    return [r for r in results if not isinstance(r, openai.RateLimitError)], refused


@pytest.fixture(scope="module")
def limited(tiny_model):
    from tests.fixtures.server import Server, private_home

    home = private_home()
    tenants = Tenants(KeyStore.at_home(home))
    limiter = SqliteLimiter.at_home(home)  # the same state.db as the server's, as `inferctl admin limits` uses it
    server = Server(tiny_model("llama"), "tiny", extra=["security.auth=required"], home=home)
    try:
        prompt_tokens = chat(server, tenants.key("free"), 1).usage.prompt_tokens
    except openai.APIError:
        server.stop()
        raise AssertionError("the first request failed:\n" + server.output()) from None
    yield server, tenants, limiter, prompt_tokens
    status = server.stop()
    limiter.close()
    assert status == 0, server.output()


def check_tpm_burst(servers: list, keys: list[str], limiter, tenant: str, prompt_tokens: int) -> None:
    """32 simultaneous requests (spread over `servers`) against a TPM that holds exactly 10 of them."""
    per = prompt_tokens + 8  # what each reserves, and (ignore_eos) exactly what each uses
    tpm = 10 * per + per // 2
    limiter.set(tenant, {"tpm": tpm})
    window = fresh_window(15)
    answers, refused = burst([lambda i=i: chat(servers[i % len(servers)], keys[i % len(keys)])
                              for i in range(32)])
    used = sum(a.usage.total_tokens for a in answers)
    assert len(answers) == 10 and used == 10 * per <= tpm, (len(answers), used, tpm)
    assert len(refused) == 22
    for exc in refused:
        headers = exc.response.headers
        assert exc.status_code == 429 and exc.body["code"] == "rate_limit_exceeded"
        assert 1 <= int(headers["retry-after"]) <= WINDOW and headers["x-ratelimit-limit-tokens"] == str(tpm)
        assert int(headers["x-ratelimit-remaining-tokens"]) < per and headers["x-ratelimit-reset-tokens"].endswith("s")
    assert limiter.usage(tenant)["in_flight"] == 0
    if same_window(window):
        assert limiter.usage(tenant)["tokens"] == used


def test_tpm_is_exact_under_32_concurrent_requests(limited) -> None:
    server, tenants, limiter, prompt_tokens = limited
    check_tpm_burst([server], [tenants.key("tpm")], limiter, "tpm", prompt_tokens)
    # Ollama's routes refuse in Ollama's shape ({"error": "..."}, which its client raises with the status)
    limiter.set("tiny", {"tpm": 5})
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=server.url, headers={"Authorization": f"Bearer {tenants.key('tiny')}"}).chat(
            model="tiny", messages=MESSAGES, options={"num_predict": 8})
    assert caught.value.status_code == 429 and "limit of 5 tokens per minute" in caught.value.error


def check_rpm_burst(servers: list, key: str, limiter, tenant: str) -> None:
    """32 simultaneous requests (spread over `servers`) against an RPM of 7: exactly 7 answers, 25 429s."""
    limiter.set(tenant, {"rpm": 7})
    window = fresh_window(15)
    answers, refused = burst([lambda i=i: chat(servers[i % len(servers)], key, 2) for i in range(32)])
    assert len(answers) == 7 and len(refused) == 25, (len(answers), len(refused))
    assert all(a.usage.completion_tokens == 2 for a in answers)
    for exc in refused:
        headers = exc.response.headers
        assert exc.status_code == 429 and exc.body["code"] == "rate_limit_exceeded"
        assert headers["x-ratelimit-limit-requests"] == "7" and headers["x-ratelimit-remaining-requests"] == "0"
        assert "7 requests per minute" in exc.message and 1 <= int(headers["retry-after"]) <= WINDOW
    if same_window(window):
        assert limiter.usage(tenant)["requests"] == 7  # the 25 refused were not counted
    assert limiter.usage(tenant)["in_flight"] == 0


def test_rpm_is_exact_under_32_concurrent_requests(limited) -> None:
    server, tenants, limiter, _ = limited
    check_rpm_burst([server], tenants.key("rpm"), limiter, "rpm")


def test_concurrency_limit(limited) -> None:
    server, tenants, limiter, _ = limited
    key = tenants.key("conc")
    limiter.set("conc", {"concurrency": 2})
    held = [limiter.admit("conc", 0), limiter.admit("conc", 0)]  # two requests running elsewhere on this state.db
    with pytest.raises(openai.RateLimitError, match="2 requests running") as caught:
        chat(server, key, 2)
    assert caught.value.response.headers["retry-after"] == "1"
    limiter.reconcile(held.pop(), 0)  # one slot free: requests take it one at a time
    answers, refused = burst([lambda: chat(server, key, 48)] * 6)
    assert answers and refused and all("requests running" in r.message for r in refused)
    assert limiter.usage("conc")["in_flight"] == 1  # every admitted request gave its slot back
    limiter.reconcile(held.pop(), 0)


def test_reconcile_and_headers_on_success(limited) -> None:
    server, tenants, limiter, prompt_tokens = limited
    limiter.set("give", {"tpm": 100_000, "rpm": 1000})
    window = fresh_window(15)
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {tenants.key('give')}"},
                          json={"model": "tiny", "messages": MESSAGES, "max_tokens": 120, "stop": [" ", "e", "a", "o"]})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    reserved = prompt_tokens + 120
    # the headers count the reservation (sent before the answer is known); the store then keeps the real usage
    assert response.headers["x-ratelimit-limit-tokens"] == "100000"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(100_000 - reserved)
    assert response.headers["x-ratelimit-remaining-requests"] == "999"
    if same_window(window):
        assert limiter.usage("give")["tokens"] == usage["total_tokens"]
    if response.json()["choices"][0]["finish_reason"] == "stop":
        assert usage["total_tokens"] < reserved  # what it did not use was given back
    # embeddings count their input tokens; with no room left they are refused
    window = fresh_window(10)
    before = limiter.usage("give")["tokens"]
    embedded = client(server, tenants.key("give")).embeddings.create(model="tiny", input="hello world")
    if same_window(window):
        assert limiter.usage("give")["tokens"] == before + embedded.usage.prompt_tokens
    limiter.set("give", {"tpm": embedded.usage.prompt_tokens - 1})
    with pytest.raises(openai.RateLimitError, match="more than tenant give's limit"):
        client(server, tenants.key("give")).embeddings.create(model="tiny", input="hello world")


def test_max_tokens_cap_clamps(limited) -> None:
    server, tenants, limiter, _ = limited
    limiter.set("cap", {"max_tokens": 3})
    assert chat(server, tenants.key("cap"), 50).usage.completion_tokens == 3
    reply = client(server, tenants.key("cap")).chat.completions.create(model="tiny", messages=MESSAGES,
                                                                       extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_inferctl_admin_limits_against_a_running_server(limited) -> None:
    server, tenants, limiter, _ = limited
    key = tenants.key("cli")
    env = {**os.environ, "INFERFLUX_API_KEY": tenants.admin}
    base = [sys.executable, "-m", "inferctl.cli", "admin", "limits"]
    start = time.monotonic()
    done = subprocess.run([*base, "set", "cli", "--rpm", "1", "--max-tokens", "4", "--url", server.url],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    elapsed = time.monotonic() - start
    log.warning("inferctl admin limits set against a running server: %.2f s (the issue's bar: < 5 s)", elapsed)
    assert done.returncode == 0 and "rpm=1" in done.stdout and "max_tokens=4" in done.stdout, done
    fresh_window(10)
    assert chat(server, key, 9).usage.completion_tokens == 4  # in force at the next request
    with pytest.raises(openai.RateLimitError, match="1 requests per minute"):
        chat(server, key, 1)
    shown = subprocess.run([*base, "show", "cli", "--url", server.url, "--json"], capture_output=True, text=True,
                           cwd=ROOT, env=env)
    assert shown.returncode == 0, shown
    assert '"requests": 1' in shown.stdout and '"rpm": 1' in shown.stdout
    listed = httpx.get(server.url + "/admin/limits", headers={"Authorization": f"Bearer {tenants.admin}"}).json()
    assert {"tenant": "cli", "rpm": 1, "tpm": 0, "concurrency": 0, "max_tokens": 4} in listed["data"]
    for verb, code in (("clear", 0), ("clear", 1)):  # the second: no limits left to clear
        cleared = subprocess.run([*base, verb, "cli", "--url", server.url], capture_output=True, text=True,
                                 cwd=ROOT, env=env)
        assert cleared.returncode == code, cleared
    assert chat(server, key, 1).usage.completion_tokens == 1  # unlimited again
    # admin scope only; an unknown tenant is a 404; a bad value a 400
    auth = {"Authorization": f"Bearer {tenants.admin}"}
    assert httpx.get(server.url + "/admin/limits", headers={"Authorization": f"Bearer {key}"}).status_code == 403
    assert httpx.put(server.url + "/admin/limits/nobody", json={"rpm": 1}, headers=auth).status_code == 404
    bad = httpx.put(server.url + "/admin/limits/cli", json={"rpm": -1}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"


@pytest.mark.slow
def test_two_servers_on_one_redis_share_tpm_and_rpm_limits(tiny_model, redis_base_url, limited) -> None:
    """Two servers, one Redis (keys and limits): one tenant's TPM, then another's RPM, each exact across both."""
    from inferflux.server.access.keys_redis import RedisKeyStore
    from tests.fixtures.redis_server import fresh_db
    from tests.fixtures.server import Server

    url = fresh_db(redis_base_url)
    tenants = Tenants(RedisKeyStore(url))  # tenants and keys in Redis too: both servers see one key store
    shared = ["security.auth=required", "state.backend=redis", f"state.redis_url={url}"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both start at once (each start takes a while)
        servers = list(pool.map(lambda _: Server(tiny_model("llama"), "tiny", extra=shared), range(2)))
    limiter = RedisLimiter(url)
    try:
        check_tpm_burst(servers, [tenants.key("shared")], limiter, "shared", limited[3])
        check_rpm_burst(servers, tenants.key("shared-rpm"), limiter, "shared-rpm")
    finally:
        statuses = [s.stop() for s in servers]
        limiter.close()
    assert statuses == [0, 0]
