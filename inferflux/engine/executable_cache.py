"""Compiled step programs kept on disk whole, so a warm restart skips tracing and lowering too.

JAX's persistent compilation cache (compile_cache.py) saves the XLA compile, but every start still
traces each bucket's step function and lowers it to HLO to compute that cache's key: measured on
the demo model, 29 s of a 22.9 s warm start's work (four threads) went to tracing and lowering, and
the 1.1B Q4_K_M file took 313 s to become ready warm (benchmarks/RESULTS.md, "Restarts"). Here the
executable itself is serialized (`jax.experimental.serialize_executable`) under a key that names
everything the program depends on, so a restart deserializes it without building the program again.

The key (`identity` + the program's own parts) covers: the inferflux source and the CPU kernel
library (a hash of the package's files: any code change is a new key), jax and jaxlib versions,
the backend and its devices, the environment switches that pick kernels (`INFERFLUX_*`, `XLA_FLAGS`),
the model's configuration and the shapes, dtypes, shardings and static fields of its parameters,
and the runtime configuration. Weights are inputs of the programs, never part of them, so two files
of the same architecture share programs, as they share XLA's cache.

Only programs really compiled are stored: an executable JAX loaded from its own persistent cache, when
serialized again, fails at run time on XLA:CPU (jax 0.10.2: "NOT_FOUND: Function bitcast_gather_fusion not
found"; reproduced across three processes). A hit is seen through JAX's monitoring event, recorded in the
compiling thread. That is why, with this on, XLA's cache is kept per code version (compile_cache.py): a new
version's first start compiles for real and stores both, instead of hitting the old entries forever. A
loaded executable is kept for the life of the process (`_RESIDENT`, by file), bounded by the model's
buckets: an LRU miss then costs no disk read.

A file that fails to load (truncated, another build) is removed and the program compiled again.
Files are written atomically. They live in `<xla cache>/executables/` and only when the XLA cache is
on (`enable_persistent_cache`); `runtime.cache_executables: false` turns this off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.experimental import serialize_executable

from inferflux.engine import compile_cache
from inferflux.engine.compile_cache import code_fingerprint
from inferflux.files import atomic_write

log = logging.getLogger(__name__)

SUBDIR = "executables"


def environment_fingerprint() -> str:
    """jax/jaxlib versions, the devices, and the environment switches that choose kernels or XLA options."""
    import jaxlib

    switches = sorted((k, v) for k, v in os.environ.items() if k.startswith(("INFERFLUX_", "XLA_", "JAX_"))
                      and k not in ("INFERFLUX_HOME", "INFERFLUX_URL", "INFERFLUX_API_KEY", "INFERFLUX_MASTER_KEY"))
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    return repr((jax.__version__, jaxlib.__version__, devices, switches))


def tree_fingerprint(tree: Any) -> str:
    """Structure, static fields, shapes, dtypes and shardings of a pytree of arrays (not their values)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shapes = [(getattr(x, "shape", None), str(getattr(x, "dtype", type(x).__name__)), str(getattr(x, "sharding", "")))
              for x in leaves]
    return repr((str(treedef), shapes))


@functools.lru_cache(maxsize=1)
def register_kernels() -> None:
    """Register the CPU FFI handlers a stored program may call: tracing registers them, loading does not."""
    from inferflux.kernels import cpu

    if jax.default_backend() == "cpu" and cpu.available():
        from inferflux.kernels.cpu.attention import ATTENTION_TARGET
        from inferflux.kernels.cpu.qmatmul import QMATMUL_TARGET

        for target in (ATTENTION_TARGET, QMATMUL_TARGET):
            cpu.register(target)


_local = threading.local()  # JAX persistent-cache hits seen by this thread's current compile


def _count_cache_hits(event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":  # recorded in the compiling thread (jax/_src/compiler.py)
        _local.hits = getattr(_local, "hits", 0) + 1


jax.monitoring.register_event_listener(_count_cache_hits)

_RESIDENT: dict[Path, Any] = {}  # every executable loaded from disk in this process (see the module docstring)
_RESIDENT_LOCK = threading.Lock()


class ExecutableCache:
    """Serialized executables under one identity; `get` loads one or compiles and stores it."""

    def __init__(self, identity: str, directory: Path | None) -> None:
        self.identity = hashlib.sha256(
            (code_fingerprint() + environment_fingerprint() + identity).encode()).hexdigest()
        self.directory = directory
        self.loaded = 0
        self.compiled = 0
        self._lock = threading.Lock()

    @classmethod
    def for_home(cls, identity: str, enabled: bool = True) -> ExecutableCache:
        """Next to XLA's cache when that is on (and `enabled`); otherwise a cache that only compiles."""
        root = compile_cache.enabled_directory() if enabled else None
        return cls(identity, None if root is None else root / SUBDIR)

    def get(self, parts: Any, lower: Callable[[], Any]) -> Any:
        """The executable for `parts` (the program's own key parts): from disk, or `lower().compile()`."""
        path = self._path(parts)
        with _RESIDENT_LOCK:
            resident = _RESIDENT.get(path) if path is not None else None
        if resident is not None:
            with self._lock:
                self.loaded += 1
            return resident
        if path is not None and path.is_file():
            try:
                register_kernels()
                serialized, in_tree, out_tree = pickle.loads(path.read_bytes())
                exe = serialize_executable.deserialize_and_load(serialized, in_tree, out_tree)
                with _RESIDENT_LOCK:
                    exe = _RESIDENT.setdefault(path, exe)  # a racing loader's copy wins; ours is dropped unused
                with self._lock:
                    self.loaded += 1
                return exe
            except Exception as exc:  # another build's or a damaged file: compile again and replace it
                log.warning("dropping cached executable %s: %s", path.name, str(exc).splitlines()[0][:200])
                path.unlink(missing_ok=True)
        _local.hits = 0
        exe = lower().compile()
        with self._lock:
            self.compiled += 1
        if getattr(_local, "hits", 0):  # JAX loaded it from its cache: serializing that copy breaks (see above)
            log.debug("not storing %s: it came from XLA's cache", "a program" if path is None else path.name)
        elif path is not None:
            try:
                data = pickle.dumps(serialize_executable.serialize(exe))
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, data)
            except Exception as exc:  # a program that cannot be serialized still runs; only the restart is slower
                log.debug("not caching executable %s: %s", path.name, exc)
        return exe

    def has(self, parts: Any) -> bool:
        """Whether the executable for `parts` is resident or on disk (`get` would load it, not compile it)."""
        path = self._path(parts)
        with _RESIDENT_LOCK:
            if path is not None and path in _RESIDENT:
                return True
        return path is not None and path.is_file()

    def _path(self, parts: Any) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / (hashlib.sha256((self.identity + repr(parts)).encode()).hexdigest()[:40] + ".exe")


__all__ = ["ExecutableCache", "code_fingerprint", "environment_fingerprint", "tree_fingerprint"]
