"""Compute kernels behind small dispatch points.

- `quant_matmul`: every activation x weight product (dense or packed `QTensor`).
- `paged_attention`: K/V cache writes and attention over paged K/V for ragged
  steps (a `jax.numpy` reference for CPU and prefill, a Pallas kernel for GPU decode).

Modules are imported explicitly (`from inferflux.kernels.paged_attention import ...`)
so that importing one kernel does not pull in the others.
"""
