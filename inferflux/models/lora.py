"""LoRA deltas inside the compiled step: fixed adapter slots, per-sequence coefficients, no gathers.

Each targeted projection of each layer holds A [max_loras, max_rank, in] and B [max_loras, out, max_rank]
(zero-padded to max_rank, the adapter's scaling folded into B). A step carries `lora_coef [S, max_loras]`,
one row of adapter coefficients per sequence (0: that adapter is not used). A token's delta is

    y += sum_l coef[seq(t), l] * B_l (A_l x_t)

computed as two einsums over all slots. Why every slot, not a gather of each token's adapter (Punica/S-LoRA):
the cost is proportional to the slot count, which is small (runtime.max_loras); one program serves every mix
of adapters, including none; and several nonzero coefficients in one row are adapter *stacking* (a scaled sum
of deltas, no merged weights) at no extra cost. An empty slot is all zeros, so it adds nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from inferflux.formats.model_config import ModelConfig

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def target_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA target projection of a layer."""
    hidden, heads = config.hidden_size, config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    return {"q": (hidden, heads), "k": (hidden, kv), "v": (hidden, kv), "o": (heads, hidden),
            "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}


def empty_slots(config: ModelConfig, target: str, max_loras: int, max_rank: int,
                dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """All-zero A [L, R, in] and B [L, out, R] for one target of one layer."""
    fan_in, fan_out = target_shapes(config)[target]
    return (jnp.zeros((max_loras, max_rank, fan_in), dtype), jnp.zeros((max_loras, fan_out, max_rank), dtype))


def token_coef(inputs: Any) -> jax.Array | None:
    """Each token's adapter coefficients [T, L] (its sequence's row), None when LoRA is off."""
    if inputs.lora_coef is None:
        return None
    return jnp.take(inputs.lora_coef, inputs.token_seq, axis=0)


def add_delta(y: jax.Array, x: jax.Array, a: Any, b: Any, coef: jax.Array | None) -> jax.Array:
    """y [T, out] + the coefficient-weighted LoRA deltas of x [T, in]; y unchanged when LoRA is off."""
    if coef is None or a is None:
        return y
    xa = jnp.einsum("ti,lri->tlr", x.astype(a.dtype), a)
    delta = jnp.einsum("tl,tlr,lor->to", coef.astype(a.dtype), xa, b)
    return y + delta.astype(y.dtype)
