"""Build the optional C++ XLA FFI library for the CPU kernels (see docs/runtime.md, "CPU kernels").

Everything else lives in pyproject.toml. Every `.cc` file under `inferflux/kernels/cpu/csrc/` goes into one
shared library, `inferflux/kernels/cpu/_inferflux_cpu*.so`, loaded at run time with ctypes (it is not a Python
module). ISA-specific code uses per-function `target` attributes and runtime dispatch, so no `-march` flag is
passed. The extension is optional: without a compiler (or without jax's FFI headers) pip warns and the install
succeeds; the runtime then falls back to the float32 path.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("inferflux", "kernels", "cpu", "csrc")


class OptionalBuildExt(build_ext):
    """Never fail the install because the kernels did not compile; say so once instead."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers, unsupported platform
            _warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            _warn(exc)


def _warn(exc: BaseException) -> None:
    print(f"WARNING: inferflux CPU kernels not built ({exc}); the CPU path will use float32 weights.",
          file=sys.stderr)


def _extensions() -> list[Extension]:
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cc"), root_dir=HERE))
    if not sources or os.environ.get("INFERFLUX_CPU_KERNELS", "").lower() == "off":
        return []
    try:
        import jax.ffi

        include = jax.ffi.include_dir()
    except Exception as exc:  # jax missing in the build environment
        _warn(exc)
        return []
    return [Extension(
        "inferflux.kernels.cpu._inferflux_cpu",
        sources=sources,
        include_dirs=[include, CSRC],
        depends=sorted(glob.glob(os.path.join(CSRC, "*.h"), root_dir=HERE)
                       + glob.glob(os.path.join(CSRC, "*.inc"), root_dir=HERE)),
        language="c++",
        # -ffp-contract=off: float epilogues must round exactly as the numpy reference does (no FMA fusion).
        extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off"],
        optional=True,
    )]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
