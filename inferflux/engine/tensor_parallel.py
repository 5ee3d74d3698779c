"""Tensor parallelism on one host (`runtime.tensor_parallel: N`): Megatron layout with `jax.sharding`.

A model too large for one device, or a step too slow on one, is split over N devices of this host:
- column-parallel: `q`, `k`, `v` (and their biases), `gate`, `up` are split by output features, i.e.
  by attention head (whole heads per device) and MLP column;
- row-parallel: `o` and `down` are split by input features, so each device's partial products are
  summed by one all-reduce per projection (two per block: after attention, after the MLP);
- the KV cache is split by KV head (`[kv_heads, pages, page_size, head_dim]`, axis 0), so every
  device attends with its own heads over its own slice of every page;
- embeddings, norms and the LM head are replicated (the sampler sees whole logits rows).

The step programs are the same functions as with one device: their inputs carry `NamedSharding`s on
a 1-D mesh `("tp",)`, and XLA's SPMD partitioner places the all-reduces. So the split needs
`num_heads % N == 0` and `num_kv_heads % N == 0` (heads never straddle devices).

Limits, stated where they are chosen (`ModelRunner`): with N > 1 weights are dense (quantized files
are dequantized at load) and attention uses the `jax.numpy` reference, because the CPU FFI kernels and
the Pallas kernels are custom calls the partitioner cannot split (it would gather their inputs onto
every device). Tested on CPU with `XLA_FLAGS=--xla_force_host_platform_device_count=N`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "tp"
COLUMN_PARALLEL = frozenset({"q", "k", "v", "q_bias", "k_bias", "v_bias", "gate", "up"})
ROW_PARALLEL = frozenset({"o", "down"})

__all__ = ["check_divisible", "make_mesh", "mesh_for", "shard_kv_cache", "shard_weights", "weight_spec"]


def mesh_for(config: Any, num_devices: int) -> Mesh | None:
    """The mesh for `runtime.tensor_parallel` on `config`'s model (a ModelConfig), or None for one device."""
    if num_devices <= 1:
        return None
    check_divisible(config.num_heads, config.num_kv_heads, num_devices)
    return make_mesh(num_devices)


def make_mesh(num_devices: int) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices of the default backend."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"runtime.tensor_parallel={num_devices} needs {num_devices} devices; this host has "
                         f"{len(devices)} {devices[0].platform} device(s)")
    return Mesh(np.asarray(devices[:num_devices]), (AXIS,))


def check_divisible(num_heads: int, num_kv_heads: int, num_devices: int) -> None:
    """Whole heads per device, or a one-line error naming the numbers."""
    if num_heads % num_devices or num_kv_heads % num_devices:
        raise ValueError(f"runtime.tensor_parallel={num_devices} must divide the model's {num_heads} attention "
                         f"heads and {num_kv_heads} KV heads")


def weight_spec(name: str) -> PartitionSpec:
    """The split of weight `name` (`layers.3.q`, `embed`, ...): its leaf name decides."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in COLUMN_PARALLEL:
        return PartitionSpec(AXIS)  # [out, in] (or [out] for a bias): split the outputs
    if leaf in ROW_PARALLEL:
        return PartitionSpec(None, AXIS)  # [out, in]: split the inputs
    return PartitionSpec()


def shard_weights(weights: Mapping[str, Any], mesh: Mesh | None) -> dict[str, Any]:
    """Each dense weight placed on the mesh by `weight_spec` (unchanged without a mesh)."""
    if mesh is None:
        return dict(weights)
    return {name: jax.device_put(value, NamedSharding(mesh, weight_spec(name))) for name, value in weights.items()}


def shard_kv_cache(kv_cache: Any, mesh: Mesh | None) -> Any:
    """Every layer's K and V pages split by KV head (unchanged without a mesh)."""
    if mesh is None:
        return kv_cache
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.tree.map(lambda pages: jax.device_put(pages, sharding), kv_cache)
