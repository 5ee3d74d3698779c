"""What the server holds between requests: the served model (engine + names), draining, counters.

A `ModelHandle` is one loaded model with its running engine. Reloading builds
a new handle next to the old one and swaps it in: requests that already hold
the old handle finish on it, new requests get the new one, and the old
engine stops once its last request is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

from inferflux.config import Config
from inferflux.engine import device
from inferflux.engine.compile_cache import enable_persistent_cache
from inferflux.engine.engine import Engine
from inferflux.formats.loader import LoadedModel, load_model
from inferflux.server.errors import model_not_found, unavailable
from inferflux.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelHandle:
    name: str
    aliases: tuple[str, ...]
    path: Path
    model: LoadedModel
    engine: Engine
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    retired: bool = False

    @property
    def max_model_len(self) -> int:
        return self.engine.core.max_model_len

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def acquire(self) -> "ModelHandle":
        self.in_flight += 1
        return self

    def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self.engine.stop()


def load_handle(config: Config, path: str | Path, served_name: str | None = None) -> ModelHandle:
    """Load a model and start its engine (blocking: run it off the event loop)."""
    enable_persistent_cache(config.home_path / "xla-cache")
    model = load_model(path)
    engine = Engine(model, config).start()
    name = served_name or config.server.served_model_name or Path(path).name
    aliases = tuple(a.strip() for a in config.server.model_aliases.split(",") if a.strip())
    return ModelHandle(name=name, aliases=aliases, path=Path(path), model=model, engine=engine)


class ServerState:
    def __init__(self, config: Config, handle: ModelHandle, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.handle = handle
        self.draining = False
        self.started = time.time()
        self.metrics = ServerMetrics(model=handle.name, backend=device.backend())
        self._reload_lock = asyncio.Lock()

    def resolve(self, model: str | None) -> ModelHandle:
        """The handle serving `model`, or a 404 naming it; 503 while draining."""
        if self.draining:
            raise unavailable("the server is shutting down")
        handle = self.handle
        if model is None or self.config.server.accept_any_model or model in handle.names():
            return handle
        raise model_not_found(model)

    def check_capacity(self) -> None:
        stats = self.handle.engine.stats()
        if stats.num_waiting >= self.config.server.max_queued_requests:
            raise unavailable(f"the server is overloaded ({stats.num_waiting} requests waiting); retry later")

    @property
    def ready(self) -> bool:
        return not self.draining and self.handle.engine.is_running

    async def swap(self, new: ModelHandle) -> ModelHandle:
        """Serve `new` from now on; the old engine stops when its last request finishes."""
        async with self._reload_lock:
            old, self.handle = self.handle, new
            self.metrics.engine_replaced()
            old.retired = True
            if old.in_flight == 0:
                old.engine.stop()
            log.info("now serving %s (was %s)", new.name, old.name)
            return old
