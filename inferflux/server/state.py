"""What the server holds between requests: the model pool, draining, counters.

`ServerState.acquire(model)` is how every handler gets a model: resolved by name (the default
model given to `inferctl serve`, or a stored model), loaded if need be (see `model_pool.py`), and
held until `handle.release()`. Reloading the default model builds a new handle next to the old one
and swaps it in: requests that already hold the old handle finish on it, new requests get the new
one, and the old engine stops once its last request is done.
"""

from __future__ import annotations

import asyncio
import logging
import time

from inferflux.config import Config
from inferflux.engine import device
from inferflux.server.errors import unavailable
from inferflux.server.handle import ModelHandle, config_aliases, is_encoder, load_handle
from inferflux.server.metrics import ServerMetrics
from inferflux.server.model_pool import ModelPool
from inferflux.store import ModelStore

__all__ = ["ModelHandle", "ServerState", "config_aliases", "is_encoder", "load_handle"]

log = logging.getLogger(__name__)


class ServerState:
    def __init__(self, config: Config, handle: ModelHandle, config_path: str | None = None,
                 store: ModelStore | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started = time.time()
        self.metrics = ServerMetrics(model=handle.name, backend=device.backend())
        self.pool = ModelPool(config, handle, self.metrics, store)
        self._reload_lock = asyncio.Lock()

    @property
    def draining(self) -> bool:
        return self.pool.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.pool.draining = value

    @property
    def default_name(self) -> str:
        return self.pool.default.name

    async def acquire(self, model: str | None, keep_alive: float | None = None) -> ModelHandle:
        """The handle serving `model` (loaded if need be), held until `release()`; 404 if unknown, 503 draining."""
        return await self.pool.acquire(model, keep_alive)

    def check_capacity(self, handle: ModelHandle) -> None:
        stats = handle.stats()
        if stats.num_waiting >= self.config.server.max_queued_requests:
            raise unavailable(f"the server is overloaded ({stats.num_waiting} requests waiting); retry later")

    @property
    def healthy(self) -> bool:
        """Every loaded engine's step loop is alive."""
        return all(h.is_running for h in self.pool.loaded())

    @property
    def ready(self) -> bool:
        """Not draining and healthy; a model that is not loaded is loaded on its first request."""
        return not self.draining and self.healthy

    async def swap(self, new: ModelHandle) -> ModelHandle | None:
        """Serve `new` as the default model from now on; the old engine stops when its last request finishes."""
        async with self._reload_lock:
            old = await self.pool.swap_default(new)
            log.info("now serving %s (was %s)", new.name, old.name if old else "not loaded")
            return old
