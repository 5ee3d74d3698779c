"""Keeping a server's in-memory policy current without a store read per request.

Requests read the documents the `Runtime` holds in memory (`Runtime.snapshot`). This module is what
moves them: one background thread per app, started when the server starts serving and stopped when it
stops (`install`), that

- with Redis (`state.backend: redis`) subscribes to `inferflux:policy:changed` (every change publishes
  its version there, `store.py`) and reloads on each message: a change through any replica is applied
  on every other one within one Redis round trip plus one reload;
- every `policy.poll_seconds` compares the stored `policy_version` with its own (one read) and reloads
  when it moved: the only path for SQLite (a local `inferctl admin policy set` writes `state.db`
  directly), and the safety net for a pub/sub message lost while the subscription was down;
- reconnects after a lost Redis connection (backing off up to 2 s) and reloads once it is subscribed
  again, whatever it missed in between. redis-py may also reconnect by itself; each (re)subscribe
  confirmation triggers the same catch-up reload, so no gap goes unnoticed.

A change through this server's own `/admin/policies` is applied in the request that made it
(`admin.py` calls `Runtime.refresh`), so the local apply never waits for the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)
_EXTENSION = "inferflux.policy"
_BACKOFF_MAX = 2.0
_TICK = 0.25  # the longest a wait blocks, so stop() returns promptly


class Watcher:
    """The thread that keeps one `Runtime`'s documents current (see the module docstring)."""

    def __init__(self, runtime: Any, poll_seconds: float, redis_url: str | None) -> None:
        self.runtime = runtime
        self.poll_seconds = poll_seconds
        self.redis_url = redis_url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)
        self.messages = 0  # change messages received (tests and logs)
        self.subscribed = threading.Event()  # set while the Redis subscription is up

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if self.redis_url:
                    self._listen()
                else:
                    self._poll_only()
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - a lost connection or a store error: retry, never die
                self.subscribed.clear()
                log.warning("policy watch: %s: %s; retrying in %.1f s", type(exc).__name__, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _reload(self, why: str) -> None:
        before = self.runtime.version
        after = self.runtime.refresh()
        if after != before:
            log.info("policy: version %d -> %d (%s)", before, after, why)

    def _poll_only(self) -> None:
        """SQLite: the version poll is the only signal (a poll of 0 seconds: never, changes come via this server)."""
        while not self._stop.is_set():
            if not self.poll_seconds:
                self._stop.wait(3600)
                continue
            self._stop.wait(self.poll_seconds)
            if not self._stop.is_set():
                self._reload("poll")

    def _listen(self) -> None:
        """Redis: a subscription to the change channel, plus the poll; returns only when stopped, raises on errors."""
        import redis

        from inferflux.server.policy.store import CHANNEL

        client = redis.Redis.from_url(self.redis_url or "", decode_responses=True, socket_connect_timeout=5.0,
                                      health_check_interval=30)
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(CHANNEL)
            next_poll = time.monotonic() + (self.poll_seconds or float("inf"))
            while not self._stop.is_set():
                wait = max(0.0, min(_TICK, next_poll - time.monotonic()))
                message = pubsub.get_message(timeout=wait)
                if message is not None:
                    if message["type"] == "subscribe":  # first subscribe, or redis-py's own reconnect
                        self.subscribed.set()
                        self._reload("subscribed")
                    elif message["type"] == "message":
                        self.messages += 1
                        self._reload(f"published v{message['data']}")
                if time.monotonic() >= next_poll:
                    self._reload("poll")
                    next_poll = time.monotonic() + self.poll_seconds
        finally:
            self.subscribed.clear()
            pubsub.close()
            client.close()


def install(app: Any) -> None:
    """Load the policy when the server starts serving (its watcher starts with it); stop the watcher at shutdown."""

    @app.before_serving
    async def start_policy_watch() -> None:
        from inferflux.server.policy.hooks import runtime

        try:
            runtime(app)
        except Exception as exc:  # noqa: BLE001 - each generation request answers 503 naming the problem
            log.error("policy: not loaded at start (%s); requests retry", exc)

    @app.after_serving
    async def stop_policy_watch() -> None:
        found = app.extensions.get(_EXTENSION)
        if found is not None and found.watcher is not None:
            found.watcher.stop()


__all__ = ["Watcher", "install"]
