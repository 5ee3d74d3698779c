"""Per-backend choices, in one table: compute dtype and how quantized weights are laid out.

On XLA:CPU a float32 GEMV streams at memory speed while bf16 and int8 dots
ran 20-50x slower (measured, see ARCHITECTURE.md), so XLA alone would need
quantized weights dequantized to float32 at load (4x-8x their file size, and
as many bytes read per token). CPU therefore keeps them as the file's raw GGUF
blocks and multiplies them with our C++ FFI kernels (kernels/cpu), falling
back to float32 where the kernels are unavailable. GPUs compute in bfloat16
and keep quantized weights packed as `QTensor`, dequantized inside the step.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

# Layouts of quantized GGUF weights on a backend (prepare_weights in engine/model_runner.py builds them).
DENSE = "dense"  # dequantized at load to the compute dtype
QTENSOR = "qtensor"  # formats.quants.QTensor: packed quant bits + unpacked scales
GGUF_BLOCKS = "gguf_blocks"  # kernels.cpu.qmatmul.GGUFBlocks: the file's bytes, read by the CPU kernels


@dataclasses.dataclass(frozen=True)
class BackendDefaults:
    dtype: jnp.dtype
    weight_layout: str

    @property
    def keep_quantized_packed(self) -> bool:
        return self.weight_layout != DENSE


BACKEND_DEFAULTS: dict[str, BackendDefaults] = {
    "cpu": BackendDefaults(jnp.dtype(jnp.float32), weight_layout=GGUF_BLOCKS),
    "gpu": BackendDefaults(jnp.dtype(jnp.bfloat16), weight_layout=QTENSOR),  # CUDA and ROCm
    "metal": BackendDefaults(jnp.dtype(jnp.float32), weight_layout=DENSE),
    "tpu": BackendDefaults(jnp.dtype(jnp.bfloat16), weight_layout=QTENSOR),
}


def backend() -> str:
    return jax.default_backend()


def backend_defaults(name: str | None = None) -> BackendDefaults:
    return BACKEND_DEFAULTS.get(name or backend(), BACKEND_DEFAULTS["cpu"])


def weight_layout(cpu_kernels: str = "auto", name: str | None = None) -> str:
    """The layout quantized weights get here, given `runtime.cpu_kernels` ("auto", "exact" or "off").

    CPU uses raw GGUF blocks when the kernel library is loaded and vectorised for this CPU ("exact" needs
    no kernels: it dequantizes inside the step), else float32; `INFERFLUX_CPU_KERNELS=off` forces float32.
    """
    layout = backend_defaults(name).weight_layout
    if layout != GGUF_BLOCKS:
        return layout
    from inferflux.kernels import cpu  # imported here: loading the library is only a CPU concern

    if cpu_kernels == "off" or cpu.switched_off():
        return DENSE
    if cpu_kernels == "exact" or cpu.fast_path():
        return GGUF_BLOCKS
    return DENSE


def compute_dtype(requested: str = "auto", name: str | None = None) -> jnp.dtype:
    """The activation dtype: the backend's default unless the config names one."""
    if requested == "auto":
        return backend_defaults(name).dtype
    if requested not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"runtime.dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
    return jnp.dtype(requested)


def free_memory_bytes() -> int:
    """Free memory of the default device (host RAM on CPU: Linux's MemAvailable, which counts the page cache
    the kernel can reclaim; plain free pages shrink as soon as a model file has been read once)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def coarse_count(n: int, bits: int = 4) -> int:
    """`n` rounded down to its `bits` leading binary digits (less than 1/2**(bits-1) less: 12.5% for 4).

    Why: a KV cache sized from free memory changes shape whenever free memory moves a little, and a new shape
    is a new program for every bucket, so a restart would find nothing in the compilation caches (measured:
    3 of 24 programs hit on a warm start of the 1.1B file). Coarse steps keep the shape across restarts.
    """
    if n < 1 << bits:
        return n
    step = 1 << (n.bit_length() - bits)
    return n // step * step
