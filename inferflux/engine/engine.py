"""The serving engine: one thread owns the device and runs the step loop; asyncio callers stream results.

`await engine.submit(request)` validates the request at once (a bad one
raises there), hands it to the step-loop thread, and returns an async
iterator of `StreamOutput` deltas for that request. The two sides exchange
only plain Python objects: requests and aborts go in through a locked inbox,
outputs come back through each request's `asyncio.Queue` via
`loop.call_soon_threadsafe`. The asyncio side never calls JAX.

A consumer that stops iterating (it broke out, or its task was cancelled)
aborts its request; the pages are free before the next step. `embed` is
`submit` too: one embedding request per input, scheduled with the
generations in flight (docs/engine.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import numpy as np

from inferflux.config import Config
from inferflux.engine.core import EngineCore
from inferflux.engine.request import EngineStats, Pooling, Request, StreamOutput
from inferflux.formats.loader import LoadedModel

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The step loop stopped on an error; requests in flight end with it."""


class Engine:
    def __init__(self, model: LoadedModel, config: Config) -> None:
        self.core = EngineCore(model, config)
        self.tokenizer = self.core.tokenizer
        self._cond = threading.Condition()
        self._inbox: list[tuple[Request, asyncio.Queue, asyncio.AbstractEventLoop]] = []
        self._aborts: list[str] = []
        # Read-only looks at the core (the /debug page): run on the engine thread between two steps.
        self._probes: list[tuple[Callable[[EngineCore], Any], asyncio.Future, asyncio.AbstractEventLoop]] = []
        # request id -> (its queue, the caller's loop, samples whose final output is not delivered yet)
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop, int]] = {}
        self._stats = self.core.stats()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="inferflux-engine", daemon=True)

    # --- lifecycle ---

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort whatever is in flight and end the step loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # --- requests ---

    async def submit(self, request: Request) -> AsyncIterator[StreamOutput]:
        """Queue a request; iterate the result for its outputs (the last one of each sample is finished)."""
        if self._error is not None or self._stopping:
            raise EngineDeadError(f"the engine is not running: {self._error or 'stopped'}")
        # Validate in the caller, so bad input is an immediate error and never reaches the loop.
        self.core.validate(request)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._cond:
            self._inbox.append((request, queue, loop))
            self._cond.notify()
        return self._stream(request, queue)

    async def _stream(self, request: Request, queue: asyncio.Queue) -> AsyncIterator[StreamOutput]:
        remaining = request.params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if remaining:
                self.abort(request.request_id)

    async def embed(self, token_lists: list[list[int]], pooling: Pooling = "mean") -> np.ndarray:
        """Pooled final hidden states `[N, hidden]` (float32, not normalized) of the inputs, in order.

        Each input is one `Request(kind="embed")` through `submit`, so embeddings share steps with the
        generations in flight. Every input is checked before any is queued: bad input raises here.
        """
        requests = [Request(list(tokens), kind="embed", pooling=pooling) for tokens in token_lists]
        for request in requests:
            self.core.validate(request)
        streams = [await self.submit(request) for request in requests]
        vectors = []
        try:
            for stream in streams:
                async for out in stream:
                    if out.embedding is None:  # aborted: the engine stopped before computing it
                        raise EngineDeadError(f"the engine is not running: {self._error or 'stopped'}")
                    vectors.append(out.embedding)
        finally:
            for request in requests[len(vectors):]:  # a caller that went away frees the rest now
                self.abort(request.request_id)
        return np.stack(vectors) if vectors else np.zeros((0, self.core.model.config.hidden_size), np.float32)

    def abort(self, request_id: str) -> None:
        """Stop a request; safe from any thread, a no-op for unknown or finished ones."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    async def inspect(self, probe: Callable[[EngineCore], T], timeout: float = 120.0) -> T:
        """`probe(core)`'s result, run on the engine thread between two steps, so it sees the scheduler and KV
        cache in a consistent state without a lock on the step path. The probe must only read (and be quick)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._cond:
            if not self._thread.is_alive():  # no step loop running: nothing else touches the core
                return probe(self.core)
            self._probes.append((probe, future, loop))
            self._cond.notify()
        return await asyncio.wait_for(future, timeout)

    def stats(self) -> EngineStats:
        """The latest statistics (a snapshot the loop refreshes after every step)."""
        return self._stats

    # --- the step loop (engine thread) ---

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._aborts or self._stopping or self._probes
                               or self.core.has_unfinished):
                        self._cond.wait()
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                    probes, self._probes = self._probes, []
                    stopping = self._stopping
                for probe, future, loop in probes:
                    _answer(probe, self.core, future, loop)
                for request, queue, loop in inbox:
                    self._admit(request, queue, loop)
                for request_id in aborts:
                    for output in self.core.abort(request_id):
                        self._deliver(output)
                    self._streams.pop(request_id, None)
                if stopping:
                    break
                for output in self.core.step():
                    self._deliver(output)
                self._stats = self.core.stats()
        except BaseException as exc:  # noqa: BLE001 - every request must hear about it
            log.exception("engine step loop failed")
            self._error = exc
            for queue, loop, _ in self._streams.values():
                loop.call_soon_threadsafe(queue.put_nowait, EngineDeadError(str(exc)))
        finally:
            for request_id in list(self._streams):
                for output in self.core.abort(request_id):
                    self._deliver(output)
            self._streams.clear()
            self._stats = self.core.stats()

    def _admit(self, request: Request, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.core.add_request(request)
        except Exception as exc:  # noqa: BLE001 - reported to the one caller it concerns
            loop.call_soon_threadsafe(queue.put_nowait, exc)
            return
        self._streams[request.request_id] = (queue, loop, request.params.n)

    def _deliver(self, output: StreamOutput) -> None:
        """Hand one output to its caller; the stream closes after the last sample's final output.

        Counted per stream, not read from the core: the core forgets a request as soon as its
        last sample finishes, which is before the outputs of that step (possibly several
        samples' final ones) are delivered.
        """
        target = self._streams.get(output.request_id)
        if target is None:
            return
        queue, loop, remaining = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, output)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self.core.abort(output.request_id)
        if output.finished:
            if remaining <= 1:
                self._streams.pop(output.request_id, None)
            else:
                self._streams[output.request_id] = (queue, loop, remaining - 1)


def _answer(probe: Callable[[EngineCore], Any], core: EngineCore, future: asyncio.Future,
            loop: asyncio.AbstractEventLoop) -> None:
    """Run one `inspect` probe and hand its result (or error) to the waiting caller's loop."""
    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    try:
        result: tuple[bool, Any] = (True, probe(core))
    except Exception as exc:  # noqa: BLE001 - the caller's problem, not the step loop's
        result = (False, exc)
    try:
        loop.call_soon_threadsafe(settle, *result)
    except RuntimeError:  # the caller's loop is closed
        pass
