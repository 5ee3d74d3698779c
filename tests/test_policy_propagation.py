"""Policy propagation between two real servers on one real redis-server (state.backend: redis).

The servers poll the stored policy_version only every 600 s here, so a change that shows up on the other
server within seconds came through the pub/sub subscription (server/policy/watch.py). Redis's MONITOR
shows that requests read the policy from memory: no command touches the policy keys while they run
(the old per-request version check was one GET each). Killing the subscriptions (CLIENT KILL TYPE
pubsub) checks the reconnect and its catch-up reload.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest
import redis

PROMPT = "mail ann@example.org"


@pytest.fixture(scope="module")
def replicas(tiny_model, redis_base_url):
    from inferflux.server.access.keys_redis import RedisKeyStore
    from tests.fixtures.redis_server import fresh_db
    from tests.fixtures.server import Server

    url = fresh_db(redis_base_url)
    store = RedisKeyStore(url)
    store.create_tenant("acme")
    key, _ = store.create_key("acme", "admin,inference")
    shared = ["security.auth=required", "state.backend=redis", f"state.redis_url={url}", "policy.poll_seconds=600"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: Server(tiny_model("llama"), "tiny", extra=shared), range(2)))
    yield servers, key, url
    statuses = [s.stop() for s in servers]
    assert statuses == [0, 0], [s.output() for s in servers]


def _echo(server, key: str) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, echo=True).choices[0].text


def _set(server, key: str, document: dict) -> int:
    answer = httpx.put(server.url + "/admin/policies", headers={"Authorization": f"Bearer {key}"},
                       json={"scope": "acme", "document": document}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["version"]


def _until(server, key: str, prefix: str, seconds: float) -> str:
    """Echo on `server` until the prompt comes back starting with `prefix` (the policy applied), or give up."""
    deadline = time.monotonic() + seconds
    while True:
        text = _echo(server, key)
        if text.startswith(prefix) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _subscribers(url: str) -> int:
    """Pub/sub connections on this test's database (other tests' servers may share the redis-server)."""
    db = url.rsplit("/", 1)[1]
    return sum(1 for c in redis.Redis.from_url(url).client_list(_type="pubsub") if c["db"] == db)


def _policy_commands(url: str, run) -> list[str]:
    """Every Redis command naming a policy key while `run()` runs (MONITOR, ended by a marker command)."""
    seen: list[str] = []
    ready, marker = threading.Event(), "policy-test-marker"

    def watch() -> None:
        with redis.Redis.from_url(url).monitor() as monitor:
            ready.set()
            for entry in monitor.listen():
                command = entry["command"]
                if marker in command:
                    return
                if "inferflux:policy:" in command:
                    seen.append(command)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(10)
    time.sleep(0.2)  # MONITOR is registered once the reply came; give it a moment
    run()
    redis.Redis.from_url(url).echo(marker)
    thread.join(30)
    assert not thread.is_alive()
    return seen


@pytest.mark.slow  # two servers on 2 cores
def test_a_change_on_one_is_applied_by_the_other_through_pubsub_without_store_reads(replicas) -> None:
    (first, second), key, url = replicas
    assert _echo(second, key).startswith(PROMPT)
    _set(first, key, {"pii": {"EMAIL": "mask"}})
    # Within the 2 s bar (generously: a loaded CI machine), far below the 600 s poll: pub/sub did it.
    assert _until(second, key, "mail [EMAIL]", 10).startswith("mail [EMAIL]")
    commands = _policy_commands(url, lambda: [_echo(second, key) for _ in range(10)])
    assert commands == [], commands  # ten requests, no policy read from the store


@pytest.mark.slow
def test_the_subscription_reconnects_and_catches_up(replicas) -> None:
    """A change made right as the subscriptions drop is applied once they are back (a missed message is
    caught up by the reload on resubscribe), long before the 600 s poll."""
    (first, second), key, url = replicas
    assert _subscribers(url) == 2
    control = redis.Redis.from_url(url)
    for connection in control.client_list(_type="pubsub"):
        if connection["db"] == url.rsplit("/", 1)[1]:
            control.client_kill_filter(_id=connection["id"])
    _set(first, key, {"pii": {"EMAIL": "hash"}})
    deadline = time.monotonic() + 20
    while _subscribers(url) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _subscribers(url) == 2  # both watchers subscribed again
    assert _until(second, key, "mail [EMAIL:", 10).startswith("mail [EMAIL:")
    _set(first, key, {"pii": {"EMAIL": "redact"}})  # and the new subscription carries the next change
    text = _until(second, key, "mail ", 0)
    deadline = time.monotonic() + 10
    while ("[EMAIL" in text or "ann@" in text) and time.monotonic() < deadline:
        text = _echo(second, key)
    assert text.startswith("mail ") and "[EMAIL" not in text and "ann@" not in text, text  # redacted
