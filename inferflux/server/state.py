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
import threading
import time
from pathlib import Path

import numpy as np

from inferflux.config import Config
from inferflux.engine import device
from inferflux.engine.compile_cache import enable_persistent_cache
from inferflux.engine.embedder import Embedder
from inferflux.engine.engine import Engine
from inferflux.engine.request import EngineStats
from inferflux.formats.encoder import load_encoder
from inferflux.formats.gguf_file import GGUFFile
from inferflux.formats.json_file import read_json_object
from inferflux.formats.loader import LoadedModel, load_model
from inferflux.formats.tokenizer import Tokenizer
from inferflux.server.errors import model_not_found, unavailable
from inferflux.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelHandle:
    """A served model: a generative LLM with its engine, or an encoder (embeddings only) with its embedder."""

    name: str
    aliases: tuple[str, ...]
    path: Path
    model: LoadedModel | None
    engine: Engine | None
    embedder: Embedder | None = None
    # The embedder holds device state and compiles on demand: one caller at a time.
    embed_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def embed_encoder(self, token_lists: list[list[int]]) -> np.ndarray:
        with self.embed_lock:
            return self.embedder.embed(token_lists)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    retired: bool = False

    @property
    def max_model_len(self) -> int:
        if self.engine is None:
            return self.embedder.model.max_seq_length
        return self.engine.core.max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer if self.model is not None else self.embedder.model.tokenizer

    @property
    def is_running(self) -> bool:
        return self.engine is None or self.engine.is_running

    def stats(self) -> EngineStats:
        return EngineStats() if self.engine is None else self.engine.stats()

    def stop(self, wait: bool = True) -> None:
        """Stop the engine; `wait=False` from the event loop, which must not block on the join."""
        if self.engine is not None:
            self.engine.stop(timeout=30.0 if wait else 0)

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def acquire(self) -> ModelHandle:
        self.in_flight += 1
        return self

    def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self.stop(wait=False)


def load_handle(config: Config, path: str | Path, served_name: str | None = None) -> ModelHandle:
    """Load a model and start its engine (blocking: run it off the event loop)."""
    enable_persistent_cache(config.home_path / "xla-cache")
    name = served_name or config.server.served_model_name or Path(path).name
    aliases = tuple(a.strip() for a in config.server.model_aliases.split(",") if a.strip())
    if is_encoder(path):
        embedder = Embedder(load_encoder(path))
        return ModelHandle(name=name, aliases=aliases, path=Path(path), model=None, engine=None, embedder=embedder)
    model = load_model(path)
    engine = Engine(model, config).start()
    return ModelHandle(name=name, aliases=aliases, path=Path(path), model=model, engine=engine)


def is_encoder(path: str | Path) -> bool:
    """BERT-family embedding models are served by the embedder, not the generation engine."""
    path = Path(path)
    if path.is_dir():
        config = read_json_object(path / "config.json", missing_ok=True)
        archs = config.get("architectures") or []
        return config.get("model_type") == "bert" or any(a.startswith("Bert") for a in archs)
    return path.is_file() and GGUFFile(path).metadata.get("general.architecture") == "bert"


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
        stats = self.handle.stats()
        if stats.num_waiting >= self.config.server.max_queued_requests:
            raise unavailable(f"the server is overloaded ({stats.num_waiting} requests waiting); retry later")

    @property
    def ready(self) -> bool:
        return not self.draining and self.handle.is_running

    async def swap(self, new: ModelHandle) -> ModelHandle:
        """Serve `new` from now on; the old engine stops when its last request finishes."""
        async with self._reload_lock:
            old, self.handle = self.handle, new
            self.metrics.engine_replaced()
            old.retired = True
            if old.in_flight == 0:
                old.stop(wait=False)
            log.info("now serving %s (was %s)", new.name, old.name)
            return old
