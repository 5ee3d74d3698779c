"""The model pool on its own (`inferflux/server/model_pool.py`), with stand-in engines so it runs in milliseconds.

What the HTTP tests see from outside (test_ollama_store.py) is checked here at the edges: one load for
concurrent first requests, LRU eviction under the cap and waiting while every model is busy, keep-alive
timers, nothing unloaded under a running request, freed handles, and counters that survive unloading.
"""

from __future__ import annotations

import asyncio
import gc
import math
import weakref
from pathlib import Path

import pytest

from inferflux.config import Config
from inferflux.engine.request import EngineStats
from inferflux.server import model_pool
from inferflux.server.errors import APIError
from inferflux.server.handle import ModelHandle
from inferflux.server.keep_alive import FOREVER, parse_keep_alive
from inferflux.server.model_pool import ModelPool
from inferflux.store import ModelNotFoundError


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (0, 0.0), ("0", 0.0), (300, 300.0), (2.5, 2.5), ("300", 300.0), ("5m", 300.0),
    ("1h30m", 5400.0), ("1.5h", 5400.0), ("250ms", 0.25), ("10s", 10.0), ("-1", FOREVER), (-1, FOREVER),
    ("-5m", FOREVER), ("1m30s500ms", 90.5),
])
def test_parse_keep_alive(value, seconds) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("bad", ["soon", "5 m", "m", "", "1d", "5m-", True, [1], {"s": 1}, "nan", math.nan])
def test_parse_keep_alive_refuses(bad) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(bad)


class _Engine:
    def __init__(self) -> None:
        self.running = True
        self.generated = 5

    @property
    def is_running(self) -> bool:
        return self.running

    def stats(self) -> EngineStats:
        return EngineStats(generation_tokens=self.generated, num_running=1 if self.running else 0)

    def stop(self, timeout=None) -> None:
        self.running = False


class _Store:
    """Stored models are files under `root`; nothing else is there."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.files = {}
        for name in names:
            path = root / name
            path.write_text(name)
            self.files[f"{name}:latest"] = path

    def path(self, name: str) -> Path:
        try:
            return self.files[name]
        except KeyError:
            raise ModelNotFoundError(name) from None

    def list(self) -> list:
        return []


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every load, by name; a load takes 50 ms in a worker thread, as a real one takes longer."""
    seen: list[str] = []

    def fake_load(config, path, name, aliases=()):
        import time

        time.sleep(0.05)
        seen.append(name)
        return ModelHandle(name=name, aliases=aliases, path=Path(path), model=None, engine=_Engine())

    monkeypatch.setattr(model_pool, "load_handle", fake_load)
    return seen


def make_pool(tmp_path: Path, max_loaded: int = 1, keep_alive: str = "5m") -> ModelPool:
    config = Config(home=str(tmp_path))
    config.server.max_loaded_models = max_loaded
    config.server.keep_alive = keep_alive
    default_path = tmp_path / "served"
    default_path.write_text("served")
    default = ModelHandle(name="served", aliases=("alias",), path=default_path, model=None, engine=_Engine())
    return ModelPool(config, default, None, _Store(tmp_path, ["a", "b"]))


def names(pool: ModelPool) -> set[str]:
    return {h.name for h in pool.loaded()}


def test_concurrent_first_requests_share_one_load(tmp_path, loads) -> None:
    async def main():
        pool = make_pool(tmp_path, max_loaded=0)
        handles = await asyncio.gather(*[pool.acquire("a") for _ in range(5)])
        assert loads == ["a:latest"] and len({id(h) for h in handles}) == 1
        assert handles[0].in_flight == 5 and all(h.load_seconds > 0 for h in handles)
        for h in handles:
            h.release()
        again = await pool.acquire("a:latest")
        assert again is handles[0] and again.load_seconds == 0 and loads == ["a:latest"]
        again.release()
        assert (await pool.acquire("alias")).name == "served"  # the default model's names
        with pytest.raises(APIError) as info:
            await pool.acquire("missing")
        assert info.value.status == 404

    asyncio.run(main())


def test_lru_eviction_frees_the_handle_and_waits_for_busy_models(tmp_path, loads) -> None:
    async def main():
        pool = make_pool(tmp_path, max_loaded=1)
        served = weakref.ref(pool.default_handle())
        a = await pool.acquire("a")  # the idle served model makes room
        assert names(pool) == {"a:latest"}
        for _ in range(500):  # its engine stops in a worker thread
            gc.collect()
            if served() is None:
                break
            await asyncio.sleep(0.01)
        assert served() is None, "an unloaded handle must not stay referenced"
        waiting = asyncio.ensure_future(pool.acquire("b"))  # "a" is busy: the load waits
        await asyncio.sleep(0.2)
        assert not waiting.done() and names(pool) == {"a:latest"}
        a.release()
        b = await asyncio.wait_for(waiting, 5)
        assert names(pool) == {"b:latest"} and loads == ["a:latest", "b:latest"]
        b.release()
        # Two allowed: the least recently used idle one goes when a third is needed.
        pool.config.server.max_loaded_models = 2
        (await pool.acquire("served")).release()
        (await pool.acquire("b")).release()
        (await pool.acquire("a")).release()
        assert names(pool) == {"b:latest", "a:latest"}  # "served" was used least recently
        assert pool.stats().generation_tokens == 5 * 5  # four loads and the first served engine, none lost

    asyncio.run(main())


def test_keep_alive_timers(tmp_path, loads) -> None:
    async def main():
        pool = make_pool(tmp_path, max_loaded=0, keep_alive="100ms")
        (await pool.acquire("a")).release()  # the default keep-alive
        assert "a:latest" in names(pool)
        await asyncio.sleep(0.3)
        assert "a:latest" not in names(pool)
        first = await pool.acquire("a", keep_alive=0)
        second = await pool.acquire("a", keep_alive=0)
        first.release()
        assert "a:latest" in names(pool), "never unloaded under a running request"
        second.release()
        assert "a:latest" not in names(pool)
        held = await pool.acquire("b", keep_alive=0.1)
        await asyncio.sleep(0.3)
        assert "b:latest" in names(pool), "the timer starts when the last request finishes"
        held.release()
        await asyncio.sleep(0.3)
        assert "b:latest" not in names(pool)
        (await pool.acquire("served")).release()  # the served model stays by default
        await asyncio.sleep(0.3)
        assert "served" in names(pool) and pool.expires_at(pool.default_handle()) == FOREVER
        (await pool.acquire("served", keep_alive=0)).release()  # unless a request says otherwise
        assert "served" not in names(pool)
        pool.draining = True
        with pytest.raises(APIError) as info:
            await pool.acquire("a")
        assert info.value.status == 503

    asyncio.run(main())
