"""JAX's persistent compilation cache, so a restart does not recompile every bucket."""

from __future__ import annotations

from pathlib import Path

import jax

_enabled: Path | None = None


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
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = path
    return path
