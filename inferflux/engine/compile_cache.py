"""JAX's persistent compilation cache, so a restart does not recompile every bucket.

JAX writes an entry with one plain `write_bytes` (not to a temporary file and
renamed), so a process killed mid-write leaves a truncated entry; and JAX never
replaces an existing entry, so that program would be recompiled, with a
warning, on every later start. `enable_persistent_cache` therefore first drops
entries that are not complete (each is a zlib or zstd stream, whose end and
checksum say whether it is whole). JAX's cache key already includes the jax,
jaxlib and backend versions, so entries of another version are never loaded.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import jax

log = logging.getLogger(__name__)

_enabled: Path | None = None
_CACHE_SUFFIX = "-cache"  # jax/_src/lru_cache.py names entries <key>-cache


def enable_persistent_cache(directory: str | Path) -> Path:
    """Store compiled XLA programs under `directory` (e.g. $INFERFLUX_HOME/xla-cache).

    Every program is cached, however quick to compile: a server compiles
    dozens of buckets and each one saved is start-up time saved. The first
    directory wins for the life of the process (JAX reads it once).
    """
    global _enabled
    if _enabled is not None:
        return _enabled
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    dropped = drop_incomplete_entries(path)
    if dropped:
        log.warning("removed %d incomplete XLA cache entries from %s (a process stopped while writing them)",
                    len(dropped), path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = path
    return path


def drop_incomplete_entries(directory: str | Path) -> list[Path]:
    """Delete cache entries that are not a whole compressed stream (truncated or empty); return them."""
    dropped = []
    for entry in Path(directory).glob(f"*{_CACHE_SUFFIX}"):
        try:
            complete = _is_complete(entry.read_bytes())
        except OSError:
            continue  # another process removed or is replacing it
        if not complete:
            entry.unlink(missing_ok=True)
            dropped.append(entry)
    return dropped


def _is_complete(data: bytes) -> bool:
    if data[:4] == b"\x28\xb5\x2f\xfd":  # a zstd frame (JAX uses zstd when it is available)
        try:
            from compression import zstd  # Python 3.14+
            decompress = zstd.decompress
        except ImportError:
            try:
                import zstandard
            except ImportError:
                return True  # cannot check: keep it (JAX could not read it either, and warns)
            decompress = zstandard.ZstdDecompressor().decompress
        try:
            decompress(data)
            return True
        except Exception:  # noqa: BLE001 - any decoder error means the entry is damaged
            return False
    stream = zlib.decompressobj()
    try:
        for start in range(0, len(data), 1 << 20):  # chunked: no full copy of a large program in memory
            stream.decompress(data[start:start + (1 << 20)], 1 << 16)
            while stream.unconsumed_tail:
                stream.decompress(stream.unconsumed_tail, 1 << 16)
    except zlib.error:
        return False
    return stream.eof
