"""Which models a server answers for, which of them are loaded, and for how long (Ollama's keep-alive).

A server answers for the model given to `inferctl serve` (the default model: its served name and
aliases, and any name when `server.accept_any_model` is on) and for every model in the model store
(`$INFERFLUX_HOME/models`, by `name:tag`; `name` means `name:latest`). The default model's names win
over a stored model of the same name.

Loading. A request for a model that is not loaded loads it in a worker thread; the event loop keeps
serving. Concurrent first requests for one model share one load (a task per model, awaited through
`asyncio.shield`, so a client that disconnects does not cancel the load for the others). Loaded
models are keyed by their resolved path, so two names for the same blob (`/api/copy`) share one
engine, as in Ollama.

Keep-alive. Each request sets its model's keep-alive: the request's `keep_alive` (Ollama) or `ttl`
(LM Studio), else `server.keep_alive` (default 5m) for stored models and "forever" for the default
model. The timer starts when the model's last running request finishes; a new request stops it. 0
unloads the model as soon as it is idle; negative keeps it forever.

Eviction. At most `server.max_loaded_models` models are loaded (0 = no limit). A load that would
exceed the cap first unloads the least recently used idle model that nobody is waiting for; if every
loaded model is busy, the load waits until one is idle. Unloading an evicted model finishes before
the next load starts, so its device memory (weights and KV cache) is free again.

Unloading. An unloaded handle is removed at once (new requests load the model again); requests
already holding it finish on it, and its engine stops when the last of them releases it. Engine
counters of unloaded engines are kept, so `/metrics` totals never go down.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
import time
from pathlib import Path
from typing import Any

from inferflux.config import Config
from inferflux.engine.request import EngineStats
from inferflux.errors import InferFluxError
from inferflux.server.adapters import is_adapter
from inferflux.server.errors import APIError, model_not_found, unavailable
from inferflux.server.handle import ModelHandle, config_aliases, load_handle
from inferflux.server.keep_alive import FOREVER, parse_keep_alive
from inferflux.store import ModelEntry, ModelNotFoundError, ModelStore, StoreError, open_store, parse_name

log = logging.getLogger(__name__)

_TOTALS = ("prompt_tokens", "generation_tokens", "num_preemptions", "prefix_queries", "prefix_hits", "num_steps",
           "total_step_seconds", "spec_draft_tokens", "spec_accepted_tokens", "spec_num_drafts")


@dataclasses.dataclass(frozen=True)
class Target:
    """A model a request can name: where it is, what it is called, and its default keep-alive."""

    key: str  # the resolved path: one engine per model file or folder
    path: Path
    name: str
    aliases: tuple[str, ...]
    keep_alive: float
    default: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclasses.dataclass
class Listed:
    """One row of the model list (`/api/tags`, `/v1/models`): a name, and the stored entry behind it if any."""

    name: str
    default: bool
    stored: ModelEntry | None


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _key(path: Path) -> str:
    return str(Path(path).expanduser().resolve())


class ModelPool:
    """The loaded models (see the module docstring). All methods run on the event loop thread."""

    def __init__(self, config: Config, default: ModelHandle, metrics: Any = None,
                 store: ModelStore | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.store = store or open_store(config.home_path)
        self.default = Target(_key(default.path), default.path, default.name, default.aliases, FOREVER, True)
        self._draining = False
        self._loaded: dict[str, ModelHandle] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._reserved: set[str] = set()  # loads that passed the cap check and are in progress
        self._wanted: collections.Counter[str] = collections.Counter()  # requests waiting for a load
        self._retiring: set[int] = set()  # ids of unloaded handles still finishing requests
        self._retiring_handles: dict[int, ModelHandle] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._stops: set[asyncio.Task] = set()
        self._waiters: list[asyncio.Future] = []
        self._totals = dict.fromkeys(_TOTALS, 0)  # engine counters of handles already stopped
        self._add(default, self.default)

    # --- configuration ---

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        """While draining, new requests get 503 and requests waiting for a load give up."""
        self._draining = value
        self._wake()

    @property
    def default_keep_alive(self) -> float:
        try:
            value = parse_keep_alive(self.config.server.keep_alive)
        except ValueError as exc:
            log.warning("server.keep_alive: %s; using 5m", exc)
            return 300.0
        return 300.0 if value is None else value

    @property
    def max_loaded(self) -> int:
        return max(0, int(self.config.server.max_loaded_models))

    # --- what is there ---

    def loaded(self) -> list[ModelHandle]:
        """Loaded models, most recently used first."""
        return sorted(self._loaded.values(), key=lambda h: -h.last_used)

    def live(self) -> list[ModelHandle]:
        """Loaded models and unloaded ones still finishing requests."""
        return [*self._loaded.values(), *self._retiring_handles.values()]

    def default_handle(self) -> ModelHandle | None:
        return self._loaded.get(self.default.key)

    @property
    def in_flight(self) -> int:
        return sum(h.in_flight for h in self.live())

    def stats(self) -> EngineStats:
        """Engine statistics summed over live engines, plus the counters of engines already stopped."""
        total = EngineStats()
        for handle in self.live():
            stats = handle.stats()
            for field in ("num_running", "num_waiting", "kv_pages_used", "kv_pages_total", "queued_prompt_tokens",
                          "kv_pages_wanted", *_TOTALS):
                setattr(total, field, getattr(total, field) + getattr(stats, field))
        for field, value in self._totals.items():
            setattr(total, field, getattr(total, field) + value)
        return total

    def expires_at(self, handle: ModelHandle) -> float:
        """Wall-clock time the handle unloads if nothing uses it again (inf = never)."""
        if handle.keep_alive == FOREVER:
            return FOREVER
        start = time.time() if handle.in_flight else handle.idle_since
        return start + handle.keep_alive

    def names(self) -> list[Listed]:
        """The default model's names, then every stored model not already listed under them."""
        rows = [Listed(name, True, None) for name in self.default.names]
        taken = {tagged(n) for n in self.default.names}
        for entry in self.store.list():
            if entry.name in taken:
                rows[[tagged(r.name) for r in rows].index(entry.name)].stored = entry
                continue
            rows.append(Listed(entry.name, False, entry))
        return rows

    # --- name resolution ---

    def is_default(self, name: str) -> bool:
        names = self.default.names
        return name in names or (name.endswith(":latest") and name.removesuffix(":latest") in names) \
            or tagged(name) in {tagged(n) for n in names}

    def loaded_handle(self, target: Target) -> ModelHandle | None:
        return self._loaded.get(target.key)

    async def target(self, name: str | None, strict: bool = False) -> Target:
        """The model `name` means; a 404 naming it if none (`strict`: even with `server.accept_any_model`)."""
        if name is None or self.is_default(name) or is_adapter(self, name):  # a LoRA adapter: the default's
            return self.default
        fallback = self.default if self.config.server.accept_any_model and not strict else None
        try:
            ref = parse_name(name)
        except StoreError:  # not a valid model name at all
            if fallback is not None:
                return fallback
            raise model_not_found(name) from None
        try:
            path = await asyncio.to_thread(self.store.path, str(ref))
        except ModelNotFoundError:
            if fallback is not None:
                return fallback
            raise model_not_found(name) from None
        except StoreError as exc:  # a damaged stored model
            raise APIError(500, str(exc), type="server_error") from None
        key = _key(path)
        if key == self.default.key:
            return self.default
        return Target(key, path, str(ref), (), self.default_keep_alive)

    # --- acquire / release ---

    async def acquire(self, name: str | None, keep_alive: float | None = None) -> ModelHandle:
        """The handle for `name`, loaded if need be, with one more request in flight (call `release()`).

        `handle.load_seconds` is how long this request waited for a load (0 if it was loaded).
        """
        self._check_open()
        target = await self.target(name)
        started, waited = time.monotonic(), False
        while True:
            self._check_open()
            handle = self._loaded.get(target.key)
            if handle is not None:
                handle.acquire()
                handle.keep_alive = target.keep_alive if keep_alive is None else keep_alive
                handle.last_used = time.monotonic()
                self._cancel_timer(target.key)
                handle.load_seconds = time.monotonic() - started if waited else 0.0
                return handle
            waited = True
            task = self._loading.get(target.key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(target))
                self._loading[target.key] = task
            self._wanted[target.key] += 1
            try:
                await asyncio.shield(task)
            except BaseException:
                self._unwant(target.key, idle_check=True)
                raise
            self._unwant(target.key, idle_check=False)  # and acquire it before anything else runs

    def _unwant(self, key: str, idle_check: bool) -> None:
        self._wanted[key] -= 1
        if self._wanted[key] > 0:
            return
        del self._wanted[key]
        handle = self._loaded.get(key)
        if idle_check and handle is not None and handle.in_flight == 0 and key not in self._timers:
            # Loaded for requests that all went away (clients disconnected): it still gets its timer.
            self._schedule_expiry(handle)

    async def _load(self, target: Target) -> ModelHandle:
        try:
            await self._make_room(target.key)
            try:
                if not Path(target.path).exists():
                    raise model_not_found(target.name)
                log.info("loading %s from %s", target.name, target.path)
                handle = await asyncio.to_thread(load_handle, self.config, target.path, target.name, target.aliases)
            except InferFluxError as exc:
                raise APIError(500, f"cannot load model {target.name}: {exc}", type="server_error") from None
            except OSError as exc:
                if not Path(target.path).exists():
                    raise model_not_found(target.name) from None
                raise APIError(500, f"cannot load model {target.name}: {exc}", type="server_error") from None
            finally:
                self._reserved.discard(target.key)
            if self.draining:
                await asyncio.to_thread(handle.stop)
                raise unavailable("the server is shutting down")
            handle.keep_alive = target.keep_alive
            self._add(handle, target)
            if self.metrics is not None:
                self.metrics.model_loaded()
            return handle
        finally:
            self._loading.pop(target.key, None)
            self._wake()

    def _add(self, handle: ModelHandle, target: Target) -> None:
        handle.on_idle = self._on_idle
        handle.last_used = time.monotonic()
        self._loaded[target.key] = handle

    async def _make_room(self, key: str) -> None:
        """Wait until one more model fits under the cap, unloading idle ones (LRU); reserves the slot."""
        while True:
            self._check_open()
            if self._stops:  # evicted engines free their device memory before the next load
                await asyncio.gather(*list(self._stops), return_exceptions=True)
                continue
            occupied = len(self._loaded) + len(self._reserved) + len(self._retiring_handles)
            if not self.max_loaded or occupied < self.max_loaded:
                self._reserved.add(key)
                return
            idle = [h for k, h in self._loaded.items() if h.in_flight == 0 and not self._wanted.get(k)]
            if idle:
                victim = min(idle, key=lambda h: h.last_used)
                log.info("unloading %s to make room (server.max_loaded_models=%d)", victim.name, self.max_loaded)
                self.unload(victim)
                continue
            await self._changed()

    def _on_idle(self, handle: ModelHandle) -> None:
        """A handle's last request finished: finish unloading it, or start its keep-alive timer."""
        if id(handle) in self._retiring:
            self._finish(handle)
        elif self._loaded.get(_key(handle.path)) is handle:
            self._schedule_expiry(handle)
        self._wake()

    def _schedule_expiry(self, handle: ModelHandle) -> None:
        key = _key(handle.path)
        self._cancel_timer(key)
        if handle.keep_alive == FOREVER or self.draining:
            return
        if handle.keep_alive <= 0:
            if not self._wanted.get(key):
                self.unload(handle)
            return
        self._timers[key] = asyncio.get_running_loop().call_later(handle.keep_alive, self._expire, handle)

    def _expire(self, handle: ModelHandle) -> None:
        key = _key(handle.path)
        self._timers.pop(key, None)
        if self._loaded.get(key) is handle and handle.in_flight == 0 and not self._wanted.get(key):
            log.info("keep-alive of %s expired; unloading it", handle.name)
            self.unload(handle)

    def _cancel_timer(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    # --- unloading ---

    def unload(self, handle: ModelHandle) -> None:
        """Stop serving `handle` now; its engine stops once its running requests are done."""
        key = _key(handle.path)
        if self._loaded.get(key) is handle:
            del self._loaded[key]
            self._cancel_timer(key)
            if self.metrics is not None:
                self.metrics.model_unloaded()
        handle.retired = True
        if handle.in_flight == 0:
            self._finish(handle)
        else:
            self._retiring.add(id(handle))
            self._retiring_handles[id(handle)] = handle
        self._wake()

    def replaced(self, name: str, path: Path) -> None:
        """`name` now means the model at `path` (pulled again): unload what it meant before."""
        for key, handle in list(self._loaded.items()):
            if handle.name == name and key != _key(path):
                self.unload(handle)

    def unload_path(self, path: Path) -> bool:
        """Unload the model loaded from `path` (a deleted or replaced stored model); True if one was."""
        handle = self._loaded.get(_key(path))
        if handle is not None:
            self.unload(handle)
        return handle is not None

    def _finish(self, handle: ModelHandle) -> None:
        """Count the engine's totals as final and stop it in a worker thread (device memory is freed)."""
        self._retiring.discard(id(handle))
        self._retiring_handles.pop(id(handle), None)
        handle.on_idle = None
        stats = handle.stats()
        for field in _TOTALS:
            self._totals[field] += getattr(stats, field)

        def stop() -> None:
            handle.stop(wait=True)
            gc.collect()

        task = asyncio.get_running_loop().create_task(asyncio.to_thread(stop))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)
        task.add_done_callback(lambda _: self._wake())

    async def swap_default(self, new: ModelHandle) -> ModelHandle | None:
        """Serve `new` as the default model from now on (admin reload); the old one finishes its requests."""
        old = self._loaded.get(self.default.key)
        self.default = Target(_key(new.path), new.path, new.name, new.aliases, FOREVER, True)
        previous = self._loaded.get(self.default.key)
        if old is not None:
            self.unload(old)
        if previous is not None and previous is not old:
            self.unload(previous)
        new.keep_alive = FOREVER
        self._add(new, self.default)
        return old

    def rename_default(self, config: Config) -> None:
        """Aliases changed in the config file (admin reload without a model)."""
        aliases = config_aliases(config)
        self.default = dataclasses.replace(self.default, aliases=aliases)
        handle = self._loaded.get(self.default.key)
        if handle is not None:
            handle.aliases = aliases

    async def shutdown(self) -> None:
        """Stop every engine (blocking joins in a thread); what is still running is aborted."""
        self.draining = True
        for key in list(self._timers):
            self._cancel_timer(key)
        handles = self.live()
        def stop_all() -> None:
            for handle in handles:
                handle.stop()

        await asyncio.to_thread(stop_all)
        if self._stops:
            await asyncio.gather(*list(self._stops), return_exceptions=True)

    # --- waiting for changes ---

    def _check_open(self) -> None:
        if self.draining:
            raise unavailable("the server is shutting down")

    async def _changed(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        await future

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
