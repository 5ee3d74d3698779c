"""The model store over Ollama's API: `/api/pull` (streamed progress), `/api/copy`, `/api/delete`."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from quart import Response

from inferflux.errors import InferFluxError
from inferflux.server.errors import APIError, bad_request
from inferflux.server.http import read_body, server_state
from inferflux.server.ollama import bp
from inferflux.server.ollama.bodies import CopyRequest, DeleteRequest, PullRequest
from inferflux.server.ollama.generate import ndjson
from inferflux.server.openapi import documented
from inferflux.store import ModelNotFoundError, StoreError, ollama_store_has, parse_name
from inferflux.store.signing import verifier_from_config

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def pull_source(text: str) -> str:
    """What `/api/pull`'s `model` names, as a `ModelStore.pull` source.

    A URL (`ollama://`, `hf://`) or an existing path as is; a bare `NAME[:TAG]` is the model of that
    name in the local Ollama store (`ollama pull llama3.2` reuses what Ollama downloaded).
    """
    text = text.strip()
    if _URL.match(text):
        return text
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if text.startswith(("/", ".", "~")) or (os.sep in text and path.suffix.lower() in (".gguf", ".safetensors")):
        raise APIError(404, f"{text}: no such file or folder")
    try:
        parse_name(text)
    except StoreError as exc:
        raise bad_request(str(exc)) from None
    return f"ollama://{text}"


class _PullProgress:
    """The store's progress callbacks (in the pull's worker thread) as Ollama progress objects on a queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue = loop, queue
        self.digest: str | None = None
        self._last: dict[str, int] = {}

    def emit(self, obj: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, obj)

    def layer(self, digest: str, size: int) -> None:
        self.digest = digest
        self.emit({"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": 0})

    def progress(self, label: str, done: int, total: int, unit: str) -> None:
        last = self._last.get(label)
        if last is not None and done < total and done - last < max(total // 100, 1):
            return  # at most ~100 objects per phase
        self._last[label] = done
        if self.digest and label.startswith(("copying ", "verifying ")):
            self.emit({"status": f"pulling {self.digest[7:19]}", "digest": self.digest, "total": total,
                       "completed": done})
        else:  # hashing a local file (its digest is not known yet), converting tensors
            self.emit({"status": label, "total": total, "completed": done})


async def _run_with_progress(work: Callable[[_PullProgress], str]) -> AsyncIterator[dict[str, Any]]:
    """Run `work` in a thread, yielding its progress objects as they come; then ("result", value)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    report = _PullProgress(loop, queue)
    task = loop.create_task(asyncio.to_thread(work, report))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a client that left does not log it
    while not task.done() or not queue.empty():
        if not queue.empty():
            yield queue.get_nowait()
            continue
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    yield {"result": task.result()}


def already_here(text: str) -> list[dict[str, Any]] | None:
    """The layers of the model a bare `NAME[:TAG]` pull names when this server has it already and the local
    Ollama store has nothing newer to import (None otherwise; `[]` for the served model given by path).

    Ollama answers a pull of a model it has with success (after checking its registry); tools that pull
    before every use rely on that, so a model InferFlux already has must not be looked up elsewhere.
    """
    pool = server_state().pool
    text = text.strip()
    if _URL.match(text) or Path(text).expanduser().exists() or ollama_store_has(text):
        return None
    if pool.is_default(text) and not pool.store.has(text):
        return []
    if not pool.store.has(text):
        return None
    try:
        return list(pool.store.show(text)["blobs"])
    except (InferFluxError, OSError):  # damaged: let the pull try, and fail with its own message
        return None


async def _present(layers: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Ollama's progress for a model that is up to date: every layer already complete, then success."""
    yield {"status": "pulling manifest"}
    for layer in layers:
        digest, size = str(layer["digest"]), int(layer["size"])
        yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": size}
    for status in ("verifying sha256 digest", "writing manifest", "success"):
        yield {"status": status}


@bp.post("/api/pull")
@documented(PullRequest, "Add a model to the store (Ollama)", ndjson=True)
async def api_pull() -> Any:
    """Add a model to the store (what `inferctl pull` takes), streaming Ollama-style progress objects."""
    req = await read_body(PullRequest, model_keys=())
    text = req.model
    pool = server_state().pool
    present = await asyncio.to_thread(already_here, text)
    source = pull_source(text) if present is None else text
    verifier = verifier_from_config(server_state().config)  # here: the pull itself runs in a worker thread

    async def events() -> AsyncIterator[dict[str, Any]]:
        if present is not None:
            async for obj in _present(present):
                yield obj
            return
        yield {"status": "pulling manifest"}
        try:
            async for obj in _run_with_progress(
                    lambda report: pool.store.pull(source, progress=report.progress, on_layer=report.layer,
                                                   verifier=verifier)):
                if "result" in obj:
                    name = obj["result"]
                else:
                    yield obj
        except ModelNotFoundError as exc:
            raise APIError(404, str(exc)) from None
        except (InferFluxError, OSError) as exc:
            raise APIError(400, f"pull {source}: {exc}") from None
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        pool.replaced(name, await asyncio.to_thread(pool.store.path, name))
        yield {"status": "success"}

    if req.stream:
        return ndjson(events())
    last: dict[str, Any] = {}
    async for obj in events():
        last = obj
    return last


async def store_as(source: str, destination: str, overrides: dict[str, Any] | None, not_found: str) -> str:
    """Store `source` (a stored model, or the model given to `inferctl serve`) under `destination`, with
    `/api/create`'s overrides; the same blobs, nothing copied. Returns the stored name."""
    pool = server_state().pool
    try:
        target = await pool.target(source, strict=True)
    except APIError:
        raise APIError(404, not_found) from None
    stored = pool.store.has(source) and (
        not target.default or await asyncio.to_thread(lambda: str(pool.store.path(source).resolve())) == target.key)
    try:
        if stored:
            return await asyncio.to_thread(pool.store.copy, source, destination, overrides)
        # The model given to `inferctl serve` by path: stored under the new name first.
        await asyncio.to_thread(pool.store.pull, str(target.path), destination)
        if overrides is not None:
            return await asyncio.to_thread(pool.store.copy, destination, destination, overrides)
        return destination
    except ModelNotFoundError:
        raise APIError(404, f"model '{source}' not found") from None
    except (InferFluxError, OSError) as exc:
        raise APIError(500, f"store {source} as {destination}: {exc}") from None


@bp.post("/api/copy")
@documented(CopyRequest, "Store a model under another name (Ollama)", content="text/plain")
async def api_copy() -> Any:
    """Store a model under another name (the same blobs); the served model is stored from its path."""
    req = await read_body(CopyRequest, model_keys=())
    source, destination = req.source, req.destination
    try:
        parse_name(destination)
    except StoreError as exc:
        raise bad_request(str(exc)) from None
    await store_as(source, destination, None, f"model '{source}' not found")
    return Response("", status=200)


@bp.delete("/api/delete")
@documented(DeleteRequest, "Remove a stored model (Ollama)", content="text/plain")
async def api_delete() -> Any:
    """Remove a stored model; if it is loaded it is unloaded first (running requests finish)."""
    req = await read_body(DeleteRequest, model_keys=())
    name = req.model
    pool = server_state().pool
    if not pool.store.has(name):
        if pool.is_default(name):
            raise bad_request(f'model "{name}" is the model given to `inferctl serve` ({pool.default.path}), '
                              "not a stored model; it cannot be deleted")
        raise APIError(404, f"model '{name}' not found")
    try:
        path = await asyncio.to_thread(pool.store.path, name)
    except StoreError:  # damaged: nothing of it can be loaded
        path = None
    if path is not None:
        pool.unload_path(path)
    try:
        await asyncio.to_thread(pool.store.rm, name)
    except ModelNotFoundError:
        raise APIError(404, f"model '{name}' not found") from None
    except (InferFluxError, OSError) as exc:
        raise APIError(500, f"delete {name}: {exc}") from None
    return Response("", status=200)
