"""A cache of parsed GGUF headers (metadata and tensor table), so a restart does not parse the file again.

Why: gguf-py's reader builds a numpy part for every element of every metadata array, so the header of the
1.1B Q4_K_M file (a 32k-token vocabulary: ~130k parts) takes 3.4 s to parse on this 2-core machine, most of a
warm restart's budget (benchmarks/RESULTS.md, "Restarts"). The parsed result is small and plain: the decoded
metadata values and, per tensor, its name, type, dimensions and data offset. It is kept as JSON (no pickle:
loading it runs no code) under `$INFERFLUX_HOME/cache/gguf/`, one file per GGUF file version, named by a hash
of the file's resolved path, size, modification time and inode and of the gguf package's version, so a
rewritten or replaced file, or another gguf-py, misses. Loading it takes ~30 ms.

Only little-endian files whose every metadata value decodes are cached; anything else is parsed each time,
exactly as before. A torn or unreadable entry is a miss (and is overwritten). Writes go to a temporary file
renamed into place. The directory is process-wide (`set_directory`, from `enable_home_caches`); none set means
no cache (tests, one-off tools).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the entry's layout changes
KEEP_ENTRIES = 32  # newest entries kept; each is the size of a model's vocabulary as JSON (0.5-5 MB)

_directory: Path | None = None

TensorRow = tuple[str, int, list[int], int]  # name, GGML type, dims (GGUF order), absolute data offset


def set_directory(directory: str | Path | None) -> None:
    """Use `directory` for cached headers from now on (None: no cache)."""
    global _directory
    _directory = None if directory is None else Path(directory)


def directory() -> Path | None:
    return _directory


def _gguf_version() -> str:
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def _entry(path: Path) -> tuple[Path, dict[str, Any]] | None:
    if _directory is None:
        return None
    stat = path.stat()
    key = {"format": FORMAT, "path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "inode": stat.st_ino, "gguf": _gguf_version()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return _directory / f"{name}.json", key


def load(path: Path) -> tuple[dict[str, Any], list[TensorRow]] | None:
    """The cached metadata and tensor table of `path` (resolved), or None on a miss."""
    entry = _entry(path)
    if entry is None:
        return None
    file, key = entry
    try:
        data = json.loads(file.read_bytes())
        if data.get("key") != key:
            return None
        rows = [(str(n), int(t), [int(d) for d in dims], int(o)) for n, t, dims, o in data["tensors"]]
        return dict(data["metadata"]), rows
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # torn or foreign: parse the file instead
        log.info("ignoring the cached GGUF header %s (%s)", file.name, type(exc).__name__)
        return None


def store(path: Path, metadata: dict[str, Any], tensors: list[TensorRow]) -> None:
    """Write the entry for `path` (resolved); failures only cost the next start a parse."""
    entry = _entry(path)
    if entry is None:
        return
    file, key = entry
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"key": key, "metadata": metadata, "tensors": tensors}, ensure_ascii=False)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=".partial")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(body)
            os.replace(tmp, file)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _prune(file.parent)
    except (OSError, TypeError, ValueError) as exc:  # a read-only home, or a value JSON cannot hold
        log.info("not caching the GGUF header of %s (%s)", path.name, exc)


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_ENTRIES:]:
        old.unlink(missing_ok=True)
