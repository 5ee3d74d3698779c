"""Warm-up: every step program built before the first request; on a warm restart, most of them loaded after.

Why the split: a restart with the stored executables (`runtime.cache_executables`, engine/executable_cache.py)
traces and compiles nothing, but loading the 1.1B file's 20 step programs still took ~2.3 s of a warm start's
CPU on this 2-core machine, against the issue's 5 s to ready (benchmarks/RESULTS.md, "Restarts"). So with
`runtime.warmup_background` only the programs of the smallest token bucket (every decode step) and any program
that must really be compiled are built before the engine reports ready; the other stored ones load on one
background thread while requests run. A step that needs one of those first loads it itself (a per-bucket lock
in the runner, so it is loaded once): ~0.1 s, a load from disk, never a compile. On a cold start nothing is
stored, so everything is compiled before ready, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferflux.engine.model_runner import Bucket, ModelRunner

log = logging.getLogger(__name__)


def warm_up(runner: ModelRunner, buckets: Sequence[Bucket] | None = None, background: bool = False) -> int:
    """Build `buckets` (default: all) now, or with `background` the stored ones past the smallest token bucket
    later; returns how many were built now.

    Never more than fit in the program cache (`runtime.max_compiled_programs`), smallest first, and it stops
    early when the process nears its memory-map budget: warm-up must not evict its own programs.
    """
    todo = [b for b in (buckets or runner.all_buckets()) if b not in runner.compiled_buckets]
    room = runner.programs.room()
    if len(todo) > room:
        log.warning("warm-up compiles %d of %d buckets (runtime.max_compiled_programs=%d); the rest compile "
                    "on first use", room, len(todo), runner.programs.capacity)
        todo = todo[:room]
    later: list[Bucket] = []
    if background and todo:
        smallest = min(bucket[0] for bucket in todo)
        later = [b for b in todo if b[0] != smallest and runner.is_stored(b)]
        todo = [b for b in todo if b not in later]
    done = build(runner, todo, runner.runtime.warmup_threads)
    if later:
        log.info("%d stored step programs load in the background", len(later))
        threading.Thread(target=build, args=(runner, later, 1), name="inferflux-warmup", daemon=True).start()
    return done


def build(runner: ModelRunner, buckets: Sequence[Bucket], threads: int) -> int:
    """Load or compile each bucket's program on `threads` threads; returns how many were built."""
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in pool.map(runner.program, buckets):
            if runner.programs.over_map_budget():
                log.warning("warm-up stopped after %d programs: the process holds over %d memory maps",
                            done, runner.programs.map_budget)
                pool.shutdown(wait=True, cancel_futures=True)
                break
            done += 1
    log.info("built %d step programs", done)
    return done
