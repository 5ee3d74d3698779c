"""The CPU kernel library: C++ XLA FFI handlers built by `pip install` (setup.py), loaded here.

One shared library, `_inferflux_cpu*.so` next to this file, holds every handler (quantized matmul on GGUF
blocks, paged attention, ...). It is loaded with ctypes on first use and each handler is registered with
`jax.ffi` for `platform="cpu"` only, under a versioned target name (`inferflux_qmatmul_v2`): the persistent
compilation cache stores programs by target name, so a handler whose ABI changes gets a new name.

The library is optional. Where it was not built (no compiler at install time), cannot be loaded, or
`INFERFLUX_CPU_KERNELS=off` is set, `available()` is False, one log line says why, and callers keep the
float32 XLA path. See docs/runtime.md, "CPU kernels".
"""

from __future__ import annotations

import ctypes
import enum
import functools
import importlib.machinery
import logging
import os
import platform
import threading
from pathlib import Path

import jax

log = logging.getLogger(__name__)

ENV_SWITCH = "INFERFLUX_CPU_KERNELS"
_HERE = Path(__file__).resolve().parent
_LIB_STEM = "_inferflux_cpu"
_registered: set[str] = set()
_lock = threading.Lock()


class Isa(enum.IntEnum):
    """Instruction-set paths of the kernels (the values the handlers take as their `isa` attribute)."""

    AUTO = 0
    SCALAR = 1
    AVX2 = 2
    AVX_VNNI = 3
    AVX512_VNNI = 4


def library_path() -> Path | None:
    """Where the built library is, or None if the install did not build it.

    `INFERFLUX_CPU_KERNELS_LIB` names another build of it (kernel development: test a library built by
    hand without reinstalling).
    """
    if override := os.environ.get("INFERFLUX_CPU_KERNELS_LIB"):
        return Path(override)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _HERE / f"{_LIB_STEM}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def switched_off() -> bool:
    """`INFERFLUX_CPU_KERNELS=off` (or 0/false/no) is set."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("off", "0", "false", "no")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not); logs the reason once."""
    if switched_off():
        reason = f"{ENV_SWITCH}=off"
    elif (path := library_path()) is None:
        reason = "the library was not built at install time (no C++ compiler?)"
    else:
        try:
            return ctypes.CDLL(str(path)), ""
        except OSError as exc:
            reason = f"cannot load {path.name}: {exc}"
    # A deliberate switch-off is news only at info level; a missing or broken build is worth a warning.
    log.log(logging.INFO if switched_off() else logging.WARNING,
            "CPU kernels unavailable (%s): quantized weights are dequantized to float32 at load", reason)
    return None, reason


def available() -> bool:
    """True when the kernel library is loaded (and not switched off)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _load()[1]


def best_isa() -> Isa:
    """The instruction set the kernels use on this CPU (`Isa.AUTO` resolves to it)."""
    lib = _load()[0]
    if lib is None:
        return Isa.SCALAR
    fn = lib.inferflux_cpu_best_isa
    fn.restype = ctypes.c_int64
    return Isa(int(fn()))


@functools.cache
def fast_path() -> bool:
    """Kernels loaded and vectorised for this CPU (the scalar build is a test oracle, not faster than XLA)."""
    if not available():
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or best_isa() < Isa.AVX2:
        log.info("CPU kernels loaded but not vectorised for this CPU (%s): quantized weights are dequantized "
                 "to float32 at load", platform.machine())
        return False
    return True


def register(symbol: str, target_name: str | None = None) -> str:
    """Register the library's FFI handler `symbol` for XLA:CPU (once) and return its target name.

    `symbol` is the C name given to `XLA_FFI_DEFINE_HANDLER_SYMBOL`, e.g. `inferflux_qmatmul_v2`; the target
    name defaults to it. Raises RuntimeError when the library is unavailable.
    """
    name = target_name or symbol
    with _lock:
        if name in _registered:
            return name
        lib, reason = _load()
        if lib is None:
            raise RuntimeError(f"CPU kernels unavailable: {reason}")
        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _registered.add(name)
    return name


def pool_threads() -> int:
    """Threads of the XLA:CPU intra-op pool the kernels run on (as the handlers see it)."""
    import jax.numpy as jnp

    name = register("inferflux_cpu_threads_v1")
    return int(jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((1,), jnp.int32))()[0])
