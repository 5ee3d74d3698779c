"""A loaded model: a generative LLM with its running engine, or an encoder with its embedder.

`load_handle` builds one (blocking: run it off the event loop). Requests hold a handle between
`acquire()` and `release()`; the model pool (`model_pool.py`) decides when it is unloaded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from inferflux.config import Config
from inferflux.engine.compile_cache import enable_persistent_cache
from inferflux.engine.embedder import Embedder
from inferflux.engine.engine import Engine
from inferflux.engine.request import EngineStats
from inferflux.formats.encoder import load_encoder
from inferflux.formats.gguf_file import GGUFFile
from inferflux.formats.json_file import read_json_object
from inferflux.formats.loader import LoadedModel, load_model
from inferflux.formats.tokenizer import Tokenizer

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
    # Set by the model pool: seconds to stay loaded once idle (math.inf = forever), when it last went
    # idle (wall clock, for /api/ps), its last use (monotonic, for LRU eviction), and what to call then.
    keep_alive: float = math.inf
    idle_since: float = dataclasses.field(default_factory=time.time)
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    load_seconds: float = 0.0
    on_idle: Callable[[ModelHandle], None] | None = None

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
        if self.in_flight == 0:
            self.idle_since, self.last_used = time.time(), time.monotonic()
            if self.on_idle is not None:
                self.on_idle(self)  # the pool: start the keep-alive timer, or finish unloading
            elif self.retired:
                self.stop(wait=False)


def config_aliases(config: Config) -> tuple[str, ...]:
    return tuple(a.strip() for a in config.server.model_aliases.split(",") if a.strip())


def load_handle(config: Config, path: str | Path, served_name: str | None = None,
                aliases: tuple[str, ...] | None = None) -> ModelHandle:
    """Load a model and start its engine (blocking: run it off the event loop).

    Names default to the served model's (`server.served_model_name`, `server.model_aliases`).
    """
    enable_persistent_cache(config.home_path / "xla-cache")
    name = served_name or config.server.served_model_name or Path(path).name
    aliases = config_aliases(config) if aliases is None else aliases
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


