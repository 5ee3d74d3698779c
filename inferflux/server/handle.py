"""A loaded model: a generative LLM with its running engine, or an encoder with its embedder.

`load_handle` builds one (blocking: run it off the event loop). Requests hold a handle between
`acquire()` and `release()`; the model pool (`model_pool.py`) decides when it is unloaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from inferflux.config import Config
from inferflux.engine.compile_cache import enable_home_caches
from inferflux.engine.embedder import Embedder
from inferflux.engine.engine import Engine
from inferflux.engine.request import EngineStats, Pooling
from inferflux.engine.reranker import Reranker, load_reranker
from inferflux.formats.describe import ModelFacts, model_facts
from inferflux.formats.encoder import load_encoder
from inferflux.formats.loader import LoadedModel, load_model
from inferflux.formats.tokenizer import Tokenizer
from inferflux.store.signing import check_model

log = logging.getLogger(__name__)


class ServedModel(Protocol):
    """What a route needs of a loaded model, whichever kind: routes ask this (or `ModelHandle.facts`), never
    whether there is an engine. `Generator` (an LLM on the engine) and `Encoder` (a BERT embedder) are the two."""

    generative: bool  # generates text (chat, completions, tokenize with a template); False: embeddings only

    @property
    def max_model_len(self) -> int: ...
    @property
    def embed_limit(self) -> int: ...  # the longest input `embed` takes: an LLM needs one position after the input
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def is_running(self) -> bool: ...
    def stats(self) -> EngineStats: ...
    def stop(self, wait: bool = True) -> None: ...
    def encode_texts(self, texts: list[str], keep: int | None) -> list[list[int]]: ...
    async def embed(self, token_lists: list[list[int]], pooling: Pooling) -> np.ndarray: ...


class Generator:
    """A generative model with its running engine."""

    generative = True

    def __init__(self, model: LoadedModel | None, engine: Engine) -> None:
        self.model, self.engine = model, engine  # model None: a pool test's stand-in engine

    @property
    def max_model_len(self) -> int:
        return self.engine.core.max_model_len

    @property
    def embed_limit(self) -> int:
        return self.max_model_len - 1

    @property
    def tokenizer(self) -> Tokenizer:
        if self.model is None:
            raise RuntimeError("this handle has an engine but no model")
        return self.model.tokenizer

    @property
    def is_running(self) -> bool:
        return self.engine.is_running

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def stop(self, wait: bool = True) -> None:
        self.engine.stop(timeout=30.0 if wait else 0)

    def encode_texts(self, texts: list[str], keep: int | None) -> list[list[int]]:
        return [self.tokenizer.encode(text)[:keep] if keep else self.tokenizer.encode(text) for text in texts]

    async def embed(self, token_lists: list[list[int]], pooling: Pooling) -> np.ndarray:
        """Pooled hidden states from the engine (scheduled with the generations in flight), unit length."""
        vectors = await self.engine.embed(token_lists, pooling)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class Encoder:
    """An encoder (embeddings only) with its embedder; no engine, nothing to stop."""

    generative = False

    def __init__(self, embedder: Embedder, reranker: Reranker | None = None) -> None:
        self.embedder = embedder
        self.reranker = reranker  # a cross-encoder's classifier path (/v1/rerank, /v1/score); None: embeddings only
        # The embedder holds device state and compiles on demand: one caller at a time.
        self.lock = threading.Lock()

    @property
    def max_model_len(self) -> int:
        return self.embedder.model.max_seq_length

    @property
    def embed_limit(self) -> int:
        return self.max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self.embedder.model.tokenizer

    @property
    def is_running(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats()

    def stop(self, wait: bool = True) -> None:
        pass

    def encode_texts(self, texts: list[str], keep: int | None) -> list[list[int]]:
        """[CLS] ... [SEP] per text, truncated keeping the closing [SEP]; ValueError if too long and no `keep`."""
        return self.embedder.tokenize(texts, truncate=keep)

    async def embed(self, token_lists: list[list[int]], pooling: Pooling) -> np.ndarray:
        def run() -> np.ndarray:
            with self.lock:
                return self.embedder.embed(token_lists)

        return await asyncio.to_thread(run)

    async def score_pairs(self, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, int]:
        """Cross-encoder scores `[N, num_labels]` and tokens read (the caller checked `reranker`), off the loop."""
        reranker = self.reranker
        assert reranker is not None

        def run() -> tuple[np.ndarray, int]:
            with self.lock:  # the same device-state rule as the embedder's
                return reranker.score_texts(pairs)

        return await asyncio.to_thread(run)


@dataclasses.dataclass
class ModelHandle:
    """A served model (a `Generator` or an `Encoder`, as `served`) with the pool's bookkeeping and its facts."""

    name: str
    aliases: tuple[str, ...]
    path: Path
    model: LoadedModel | None
    engine: Engine | None
    embedder: Embedder | None = None
    reranker: Reranker | None = None  # with an embedder: the model is a cross-encoder
    facts: ModelFacts | None = None  # None only for handles built around test doubles
    served: ServedModel = dataclasses.field(init=False)
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

    def __post_init__(self) -> None:
        if self.embedder is not None:
            self.served = Encoder(self.embedder, self.reranker)
        elif self.engine is not None:
            self.served = Generator(self.model, self.engine)
        else:
            raise ValueError("a ModelHandle needs an engine or an embedder")

    @property
    def generative(self) -> bool:
        return self.served.generative

    @property
    def max_model_len(self) -> int:
        return self.served.max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self.served.tokenizer

    @property
    def is_running(self) -> bool:
        return self.served.is_running

    def stats(self) -> EngineStats:
        return self.served.stats()

    def stop(self, wait: bool = True) -> None:
        """Stop the engine; `wait=False` from the event loop, which must not block on the join."""
        self.served.stop(wait)

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
    enable_home_caches(config.home_path, config.runtime.cache_executables)
    check_model(Path(path), config, config.home_path)  # security.require_signed_models (store/signing.py)
    name = served_name or config.server.served_model_name or Path(path).name
    aliases = config_aliases(config) if aliases is None else aliases
    facts = model_facts(path)
    if not facts.generative:  # BERT-family embedding models are served by the embedder, not the engine
        encoder = load_encoder(path)
        return ModelHandle(name=name, aliases=aliases, path=Path(path), model=None, engine=None,
                           embedder=Embedder(encoder), reranker=load_reranker(path, encoder), facts=facts)
    model = load_model(path)
    engine = Engine(model, config).start()
    return ModelHandle(name=name, aliases=aliases, path=Path(path), model=model, engine=engine, facts=facts)


def is_encoder(path: str | Path) -> bool:
    """Whether a model path is an encoder (embeddings only): what its `ModelFacts` say."""
    return not model_facts(path).generative


