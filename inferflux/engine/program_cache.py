"""A bounded, least-recently-used cache of compiled XLA programs, whose evictions really free memory.

Why it exists: on XLA:CPU every compiled program maps its JIT-compiled kernels into
the process one by one (three memory maps per kernel: ~360 maps for the 4-layer
demo model, growing with the number of layers). Linux refuses new maps past
`vm.max_map_count` (65,530 by default) and LLVM then aborts the process
("Unable to allocate section memory"). A server that keeps every program it
ever compiled is therefore one unusual workload away from that abort.

Two things bound it here:

- `ProgramCache` keeps at most `runtime.max_compiled_programs` programs, and
  also evicts (least recently used first) while the process holds more than
  half of `vm.max_map_count` maps, so bigger models, whose programs need more
  maps each, stay under the limit too.
- `FreshJit` lowers every program through a new `jax.jit` of a new function
  object. JAX's in-memory caches are keyed on the function (weakly), and they
  keep every executable ever compiled through one long-lived `jax.jit`; a
  fresh wrapper per program means that once the cache drops an executable
  nothing else holds it, and its maps are unmapped at once (measured:
  benchmarks/RESULTS.md).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, cast

import jax

log = logging.getLogger(__name__)

MAP_BUDGET_FRACTION = 0.5  # evict while the process holds more than this share of vm.max_map_count
MAPS_PER_PROGRAM_BOUND = 1024  # a compiled XLA:CPU step program maps ~356 regions (benchmarks/RESULTS.md)
RECOUNT_SECONDS = 5.0  # other growth (models, threads) is seen at least this often while programs change


def process_map_count() -> int | None:
    """Memory maps this process holds now (Linux), else None."""
    try:
        with open("/proc/self/maps", "rb") as maps:  # one read and a byte count, not a Python loop per map
            return maps.read().count(b"\n")
    except OSError:
        return None


def max_map_count() -> int | None:
    """The kernel's per-process limit on memory maps (Linux), else None."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


class FreshJit:
    """`jax.jit(fn)` whose every `lower` goes through a new wrapper of a new function object.

    Used exactly like the jitted function for `.lower(*args).compile()`; the resulting executable is
    then referenced only by its caller (see the module docstring for why that matters).
    """

    def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any) -> None:
        self.fn = fn
        self.jit_kwargs = jit_kwargs

    def lower(self, *args: Any) -> Any:
        fn = self.fn

        def program(*call_args: Any) -> Any:
            return fn(*call_args)

        # Same name as the wrapped function: the HLO module name, hence the persistent cache key, is stable.
        program.__name__ = getattr(fn, "__name__", "program")
        program.__qualname__ = getattr(fn, "__qualname__", program.__name__)
        return jax.jit(program, **self.jit_kwargs).lower(*args)


class ProgramCache:
    """Compiled programs by key, least recently used evicted first past `capacity` or the map budget.

    Thread-safe: warm-up inserts from a thread pool while nothing runs; steps look up from one thread.
    """

    def __init__(self, capacity: int, map_budget: int | None = None) -> None:
        self.capacity = max(1, int(capacity))
        limit = max_map_count()
        self.map_budget = map_budget if map_budget is not None else (
            int(limit * MAP_BUDGET_FRACTION) if limit else None)
        self._programs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        self.evictions = 0
        self._counted: tuple[int, int, float] | None = None  # maps, programs held, monotonic time of the count

    def get(self, key: Hashable, compile_fn: Callable[[], Any] | None = None) -> Any:
        """The program for `key` (now the most recently used); compiled with `compile_fn` when absent."""
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
                return program
        if compile_fn is None:
            return None
        program = compile_fn()
        self.put(key, program)
        return program

    def put(self, key: Hashable, program: Any) -> None:
        with self._lock:
            self._programs[key] = program
            self._programs.move_to_end(key)
            self.compiles += 1
            self._evict()

    def resize(self, capacity: int) -> None:
        """Change the cap, evicting the least recently used programs past it now."""
        with self._lock:
            self.capacity = max(1, int(capacity))
            self._evict()

    def _evict(self) -> None:
        while len(self._programs) > self.capacity or (len(self._programs) > 1 and self.over_map_budget()):
            evicted, _ = self._programs.popitem(last=False)
            self.evictions += 1
            log.info("evicted compiled program %s (%d kept)", evicted, len(self._programs))

    def over_map_budget(self) -> bool:
        """Whether the process holds more memory maps than the budget (never, where maps are not counted).

        /proc/self/maps is read again only once the programs added since the last count could have crossed the
        budget at MAPS_PER_PROGRAM_BOUND each, or RECOUNT_SECONDS have passed: reading it with thousands of
        maps took 20-40 ms while warm-up threads loaded programs, twice per program (a restart's 1.5 s).
        """
        if self.map_budget is None:
            return False
        held, now = len(self._programs), time.monotonic()
        if self._counted is not None:
            count, at, when = self._counted
            if (count + max(0, held - at) * MAPS_PER_PROGRAM_BOUND <= self.map_budget
                    and now - when < RECOUNT_SECONDS):
                return False
        counted = process_map_count()
        if counted is None:
            return False
        self._counted = (counted, held, now)
        return counted > self.map_budget

    def room(self) -> int:
        """How many more programs fit before the count cap evicts."""
        return max(0, self.capacity - len(self._programs))

    def view(self, kind: str) -> ProgramView:
        return ProgramView(self, kind)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._programs)

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._programs


class ProgramView:
    """One kind of program (step, score, hidden) in a shared `ProgramCache`, as a small dict-like object.

    Keys are buckets; entries are stored under `(kind, bucket)` so all kinds share one bound.
    """

    def __init__(self, cache: ProgramCache, kind: str) -> None:
        self.cache = cache
        self.kind = kind

    def get(self, bucket: Hashable, default: Any = None) -> Any:
        program = self.cache.get((self.kind, bucket))
        return default if program is None else program

    def __getitem__(self, bucket: Hashable) -> Any:
        program = self.cache.get((self.kind, bucket))
        if program is None:
            raise KeyError(bucket)
        return program

    def __setitem__(self, bucket: Hashable, program: Any) -> None:
        self.cache.put((self.kind, bucket), program)

    def __contains__(self, bucket: object) -> bool:
        return (self.kind, bucket) in self.cache

    def __iter__(self) -> Iterator[Hashable]:
        keys = cast(list[tuple[str, Hashable]], self.cache.keys())  # this cache's keys are (kind, bucket)
        return iter([bucket for kind, bucket in keys if kind == self.kind])

    def __len__(self) -> int:
        return sum(1 for _ in self)
