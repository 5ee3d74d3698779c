"""JAX's persistent compilation cache, so a restart does not recompile every bucket.

JAX writes an entry with one plain `write_bytes` (not to a temporary file and
renamed), so a process killed mid-write leaves a truncated entry; and JAX never
replaces an existing entry, so that program would be recompiled, with a
warning, on every later start. `enable_persistent_cache` therefore first drops
entries that are not complete (each is a zlib or zstd stream, whose end and
checksum say whether it is whole). JAX's cache key already includes the jax,
jaxlib and backend versions, so entries of another version are never loaded.

With `per_code` (runtime.cache_executables) the cache lives in a subdirectory named by a hash of the
package's code, `code-<hash>/`, and only the two newest such directories are kept. Why: on XLA:CPU an
executable JAX loaded from this cache cannot be serialized again whole (the copy fails at run time,
"Function bitcast_gather_fusion not found"), so engine/executable_cache.py stores only programs really
compiled; if a new version found the old version's entries, every step would be a cache hit and its
executables would never be stored. Per code version, a new version's first start compiles for real and
stores both.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import zlib
from pathlib import Path

import jax

from inferflux.formats import gguf_header_cache

log = logging.getLogger(__name__)

_enabled: Path | None = None
_CACHE_SUFFIX = "-cache"  # jax/_src/lru_cache.py names entries <key>-cache
_PACKAGE = Path(__file__).resolve().parents[1]  # inferflux/
KEEP_CODE_VERSIONS = 2


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of every file of the inferflux package that can shape a program (.py and built libraries)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*")):
        if path.suffix in (".py", ".so") and "__pycache__" not in path.parts and path.is_file():
            digest.update(str(path.relative_to(_PACKAGE)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def enabled_directory() -> Path | None:
    """The directory `enable_persistent_cache` turned on in this process, or None."""
    return _enabled


def enable_home_caches(home: str | Path, per_code: bool = False) -> Path:
    """Turn on every start-up cache under `$INFERFLUX_HOME`: XLA's programs (`xla-cache/`, returned) and parsed
    GGUF headers (`cache/gguf/`, formats/gguf_header_cache.py)."""
    home = Path(home).expanduser()
    gguf_header_cache.set_directory(home / "cache" / "gguf")
    return enable_persistent_cache(home / "xla-cache", per_code)


def enable_persistent_cache(directory: str | Path, per_code: bool = False) -> Path:
    """Store compiled XLA programs under `directory` (e.g. $INFERFLUX_HOME/xla-cache).

    Every program is cached, however quick to compile: a server compiles
    dozens of buckets and each one saved is start-up time saved. The first
    directory wins for the life of the process (JAX reads it once).
    """
    global _enabled
    if _enabled is not None:
        return _enabled
    path = Path(directory).expanduser()
    if per_code:
        path = path / f"code-{code_fingerprint()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    if per_code:
        _prune_code_versions(path.parent, keep=path)
    dropped = drop_incomplete_entries(path)
    if dropped:
        log.warning("removed %d incomplete XLA cache entries from %s (a process stopped while writing them)",
                    len(dropped), path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = path
    return path


def _prune_code_versions(root: Path, keep: Path) -> None:
    """Remove all but the newest KEEP_CODE_VERSIONS `code-*` directories (`keep` always stays)."""
    versions = sorted((d for d in root.glob("code-*") if d.is_dir() and d != keep),
                      key=lambda d: d.stat().st_mtime, reverse=True)
    for old in versions[KEEP_CODE_VERSIONS - 1:]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed the XLA cache of an older code version: %s", old.name)


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
