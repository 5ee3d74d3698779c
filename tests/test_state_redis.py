"""`state.backend: redis`: the RedisKeyStore behaves as the SQLite KeyStore, and replicas share it.

The behaviour checks run over both backends (one parametrized fixture), against a real redis-server
(tests/fixtures/redis_server.py) and a real state.db. Then two real `inferctl serve` processes share
one Redis database: a key made through one's /admin/keys works on the other, and a revocation on one
is seen by the other at its next request.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from inferflux.config import load_config
from inferflux.server.access.auth import authorize
from inferflux.server.access.errors import AuthenticationError, KeyStoreError, NotFoundError, PermissionDenied
from inferflux.server.access.keys import KeyStore, hash_key
from inferflux.server.access.keys_redis import RedisKeyStore, StateUnavailable, open_key_store, redact
from inferflux.server.errors import to_api_error


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        backend = KeyStore.at_home(tmp_path)
    else:
        backend = RedisKeyStore(request.getfixturevalue("redis_url"))
    yield backend
    backend.close()


def test_tenants(store) -> None:
    assert store.tenants() == []
    created = store.create_tenant("acme")
    assert created["name"] == "acme" and created["keys"] == 0 and created["created"] <= time.time()
    with pytest.raises(KeyStoreError, match="exists"):
        store.create_tenant("acme")
    with pytest.raises(KeyStoreError, match="1-64 letters"):
        store.create_tenant("no spaces")
    store.create_tenant("beta")
    assert [t["name"] for t in store.tenants()] == ["acme", "beta"]
    with pytest.raises(NotFoundError):
        store.tenant("gamma")
    with pytest.raises(NotFoundError):
        store.delete_tenant("gamma")


def test_keys_create_list_authenticate(store) -> None:
    store.create_tenant("acme")
    store.create_tenant("beta")
    secret, record = store.create_key("acme", "models:read,inference", name="ci")
    assert secret.startswith("ifx-") and len(secret) == 4 + 43 and record.id not in secret
    assert (record.tenant, record.name, record.scopes) == ("acme", "ci", ("inference", "models:read"))
    assert record.revoked is None and record.expires is None and record.public()["active"]
    other, _ = store.create_key("beta", ["embeddings"], expires_in=3600)
    principal = store.authenticate(secret)
    assert (principal.tenant, principal.key_id, principal.scopes) == ("acme", record.id,
                                                                      frozenset({"inference", "models:read"}))
    assert store.key(record.id).last_used is not None
    assert [k.id for k in store.keys("acme")] == [record.id]
    assert [k.tenant for k in store.keys()] == ["acme", "beta"]
    assert store.tenant("acme")["keys"] == 1
    with pytest.raises(AuthenticationError, match="invalid API key"):
        store.authenticate(secret + "x")
    with pytest.raises(KeyStoreError, match="unknown scope"):
        store.create_key("acme", "inference,root")
    with pytest.raises(NotFoundError):
        store.create_key("nobody", "inference")
    with pytest.raises(NotFoundError):
        store.keys("nobody")
    with pytest.raises(NotFoundError):
        store.key("key_000000000000")
    bearer = {"Authorization": f"Bearer {secret}"}
    assert authorize(store, "ops.healthz", {}, False) is None
    assert authorize(store, "ops.metrics", bearer, False).tenant == "acme"
    with pytest.raises(PermissionDenied):
        authorize(store, "ollama.api_pull", bearer, False)
    assert store.authenticate(other).scopes == frozenset({"embeddings"})


def test_revoke_expiry_and_tenant_deletion(store) -> None:
    store.create_tenant("acme")
    secret, record = store.create_key("acme", "inference")
    expired, _ = store.create_key("acme", "inference", expires_at=time.time() - 1)
    with pytest.raises(AuthenticationError, match="has expired"):
        store.authenticate(expired)
    first = store.revoke(record.id)
    assert first.revoked is not None and not first.public()["active"]
    assert store.revoke(record.id).revoked == first.revoked  # idempotent: the first time stays
    with pytest.raises(AuthenticationError, match="revoked"):
        store.authenticate(secret)
    with pytest.raises(NotFoundError):
        store.revoke("key_000000000000")
    assert len(store.keys("acme")) == 2  # revoked and expired keys stay listed
    kept, _ = store.create_key("acme", "inference")
    store.delete_tenant("acme")
    assert store.keys() == [] and store.tenants() == []
    with pytest.raises(AuthenticationError):
        store.authenticate(kept)


def _everything_in(url: str) -> bytes:
    """Every key name, hash field, member and value in the database, as one byte string."""
    r = redis.Redis.from_url(url)
    out = []
    for name in r.scan_iter():
        out.append(name)
        kind = r.type(name)
        if kind == b"string":
            out.append(r.get(name))
        elif kind == b"hash":
            out += [x for pair in r.hgetall(name).items() for x in pair]
        elif kind == b"set":
            out += list(r.smembers(name))
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} at {name!r}")
    return b"\n".join(out)


def test_redis_holds_hashes_never_keys(redis_url: str) -> None:
    store = RedisKeyStore(redis_url)
    store.create_tenant("acme")
    secrets = [store.create_key("acme", "inference,admin", name=f"k{i}")[0] for i in range(3)]
    dump = _everything_in(redis_url)
    assert hash_key(secrets[0]).encode() in dump  # the lookup is by hash
    for secret in secrets:
        assert secret.encode() not in dump and secret[4:].encode() not in dump


def test_factory_and_unreachable_redis(tmp_path: Path, redis_url: str) -> None:
    env = {"INFERFLUX_HOME": str(tmp_path)}
    assert isinstance(open_key_store(load_config(environ=env)), KeyStore)
    chosen = open_key_store(load_config(overrides={"state.backend": "redis", "state.redis_url": redis_url},
                                        environ=env))
    assert isinstance(chosen, RedisKeyStore)
    assert redact("redis://:hunter2@db.internal:6379/0") == "redis://:***@db.internal:6379/0"
    with pytest.raises(StateUnavailable, match=r"redis://:\*\*\*@127.0.0.1:1/0 is unreachable") as err:
        RedisKeyStore("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(err.value) and to_api_error(err.value).status == 503  # a client gets a 503
    with pytest.raises(Exception, match="state.backend=redis needs state.redis_url"):
        load_config(overrides={"state.backend": "redis"}, environ=env)


def test_cli_uses_the_configured_backend(tmp_path: Path, redis_url: str) -> None:
    env = {**os.environ, "INFERFLUX_HOME": str(tmp_path), "INFERFLUX_STATE__BACKEND": "redis",
           "INFERFLUX_STATE__REDIS_URL": redis_url}
    run = [sys.executable, "-m", "inferctl.cli", "admin"]
    assert subprocess.run([*run, "tenants", "create", "acme"], env=env, capture_output=True).returncode == 0
    made = subprocess.run([*run, "keys", "create", "--tenant", "acme", "--scopes", "inference"], env=env,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert RedisKeyStore(redis_url).authenticate(made.stdout.strip()).tenant == "acme"
    assert not (tmp_path / "state.db").exists()  # nothing went to SQLite


# --- two replicas sharing one Redis ---


@pytest.fixture(scope="module")
def replicas(tiny_model, redis_base_url: str):
    from tests.fixtures.redis_server import fresh_db
    from tests.fixtures.server import Server

    url = fresh_db(redis_base_url)
    store = RedisKeyStore(url)
    store.create_tenant("ops")
    admin, _ = store.create_key("ops", "admin,models:read")
    extra = ["security.auth=required", "state.backend=redis", f"state.redis_url={url}"]
    model = tiny_model("llama")
    servers: list[Server] = []
    failures: list[BaseException] = []
    with ThreadPoolExecutor(2) as pool:  # both start at once: their imports and model loads overlap
        for start in [pool.submit(Server, model, "tiny", extra) for _ in range(2)]:
            try:
                servers.append(start.result())
            except Exception as exc:  # noqa: BLE001 - the other one still has to be stopped first
                failures.append(exc)
    try:
        if failures:
            raise failures[0]
        yield servers, admin, url
    finally:
        statuses = [(s.stop(), s.output()) for s in servers]
        store.close()
        for status, output in statuses:
            assert status == 0, output


@pytest.mark.slow  # two server processes start (about 100 s on this 2-core machine under load)
def test_replicas_share_keys_and_revocations(replicas) -> None:
    (one, two), admin, url = replicas
    headers = {"Authorization": f"Bearer {admin}"}
    assert httpx.post(one.url + "/admin/tenants", json={"name": "acme"}, headers=headers).status_code in (200, 201)
    made = httpx.post(one.url + "/admin/keys", json={"tenant": "acme", "scopes": "inference,models:read"},
                      headers=headers)
    assert made.status_code in (200, 201), made.text
    key, key_id = made.json()["key"], made.json()["id"]
    # Made on one, used on the other, through the real openai client.
    on_two = openai.OpenAI(base_url=two.url + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in on_two.models.list()] == ["tiny"]
    listed = httpx.get(two.url + "/admin/keys", headers=headers).json()["data"]
    assert key_id in [k["id"] for k in listed]
    # Revoked on two, refused by one at its next request.
    assert httpx.post(two.url + f"/admin/keys/{key_id}/revoke", headers=headers).status_code == 200
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        openai.OpenAI(base_url=one.url + "/v1", api_key=key, max_retries=0).models.list()
    # The raw keys never reached Redis.
    dump = _everything_in(url)
    assert key.encode() not in dump and admin.encode() not in dump


def test_serve_with_unreachable_redis_is_one_line(tiny_model, tmp_path: Path) -> None:
    from tests.fixtures.server import free_port

    done = subprocess.run([sys.executable, "-m", "inferctl.cli", "serve", str(tiny_model("llama")), "--port",
                           str(free_port()), "--set", "security.auth=required", "--set", "state.backend=redis",
                           "--set", "state.redis_url=redis://:hunter2@127.0.0.1:1/0"],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "INFERFLUX_HOME": str(tmp_path)})
    assert done.returncode == 1, done.stderr
    assert "state backend redis://:***@127.0.0.1:1/0 is unreachable" in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "hunter2" not in done.stderr
