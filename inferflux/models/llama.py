"""The Llama family (Llama 2/3, Mistral, Qwen2) as Flax NNX modules over a paged KV cache.

The family differs only in config fields: grouped-query attention
(`num_kv_heads`), q/k/v biases (Qwen2), tied embeddings, rope scaling and
sliding windows. One module tree serves them all.

A forward pass is one *ragged step*: T tokens (padded to a bucket) that are
prefill chunks of some sequences and single decode tokens of others, each
with its sequence slot, position and KV slot. K/V of the step are written into
their pages first, then every token attends through its sequence's block
table, so tokens of a chunk see each other causally. Logits are computed only
for the rows named by `logits_index` (one per sequence slot), because only
those get sampled.

Rotary embeddings use Hugging Face's rotate-half convention for every
architecture; the GGUF loader undoes llama.cpp's Q/K row interleaving so both
file formats give the same parameters (see formats/weights.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from inferflux.formats.model_config import ModelConfig
from inferflux.kernels.paged_attention import paged_attention, paged_attention_reference, write_kv
from inferflux.kernels.quant_matmul import Weight, embed, linear, linear_many
from inferflux.models import lora

# Per layer: (K pages, V pages), each [num_kv_heads, num_pages, page_size, head_dim].
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


@struct.dataclass
class StepInputs:
    """Device arrays describing one ragged step (all shapes come from the bucket)."""

    # numpy arrays when the runner packs them on the host, traced jax.Arrays inside the step.
    tokens: Any  # [T] int32
    positions: Any  # [T] int32, -1 for padding tokens
    token_seq: Any  # [T] int32, the token's sequence slot
    slot_mapping: Any  # [T] int32, page_id * page_size + offset (page 0 for padding)
    block_tables: Any  # [S, P] int32
    logits_index: Any  # [S] int32, the row of T whose logits each slot samples from
    lora_coef: Any = None  # [S, max_loras] float32 adapter coefficients per slot; None: LoRA off (models/lora.py)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, then scaled: Hugging Face's order of operations."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding; x is [T, heads, head_dim], angles in float32."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, head_dim/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


LoraSpec = tuple[int, int, Any]  # (max_loras, max_rank, dtype); max_loras 0 = LoRA off: no parameters at all


def _init_lora(module: nnx.Module, config: ModelConfig, targets: tuple[str, ...], spec: LoraSpec) -> None:
    """Zeroed adapter slots `lora_a_<t>`, `lora_b_<t>` for each target (engine/lora.py writes them)."""
    if spec[0]:
        for target in targets:
            a, b = lora.empty_slots(config, target, spec[0], spec[1], spec[2])
            setattr(module, f"lora_a_{target}", nnx.Param(a))
            setattr(module, f"lora_b_{target}", nnx.Param(b))


def _lora(module: nnx.Module, target: str, y: jax.Array, x: jax.Array, coef: jax.Array | None) -> jax.Array:
    """y plus the target's coefficient-weighted adapter deltas (y itself when LoRA is off)."""
    if coef is None or not hasattr(module, f"lora_a_{target}"):
        return y
    return lora.add_delta(y, x, _value(getattr(module, f"lora_a_{target}")),
                          _value(getattr(module, f"lora_b_{target}")), coef)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, w: Mapping[str, Weight], kernels: bool = True,
                 lora_spec: LoraSpec = (0, 0, None)) -> None:
        # False: always the jax.numpy reference (tensor parallel: custom-call kernels can't be partitioned).
        self.kernels = kernels
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.q = nnx.Param(w["q"])
        self.k = nnx.Param(w["k"])
        self.v = nnx.Param(w["v"])
        self.o = nnx.Param(w["o"])
        self.q_bias = nnx.Param(w["q_bias"]) if "q_bias" in w else None
        self.k_bias = nnx.Param(w["k_bias"]) if "k_bias" in w else None
        self.v_bias = nnx.Param(w["v_bias"]) if "v_bias" in w else None
        self.o_bias = nnx.Param(w["o_bias"]) if "o_bias" in w else None
        _init_lora(self, config, lora.ATTENTION_TARGETS, lora_spec)

    def __call__(
        self, x: jax.Array, inputs: StepInputs, inv_freq: jax.Array, kv: tuple[jax.Array, jax.Array],
        decode_only: bool,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        t = x.shape[0]
        coef = lora.token_coef(inputs)
        q, k, v = linear_many(x, [_value(self.q), _value(self.k), _value(self.v)],
                              [_value(self.q_bias), _value(self.k_bias), _value(self.v_bias)])
        q, k, v = (_lora(self, name, y, x, coef) for name, y in (("q", q), ("k", k), ("v", v)))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, inputs.positions, inv_freq)
        k = apply_rope(k, inputs.positions, inv_freq)
        k_pages, v_pages = write_kv(kv[0], kv[1], k, v, inputs.slot_mapping)
        attend = paged_attention if self.kernels else _reference_attention
        out = attend(
            q, k_pages, v_pages, inputs.block_tables, inputs.token_seq, inputs.positions,
            scale=1.0 / math.sqrt(self.head_dim), sliding_window=self.sliding_window, decode_only=decode_only,
        )
        out = out.reshape(t, self.num_heads * self.head_dim).astype(x.dtype)
        out = _lora(self, "o", linear(out, _value(self.o), _value(self.o_bias)), out, coef)
        return out, (k_pages, v_pages)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, w: Mapping[str, Weight], lora_spec: LoraSpec = (0, 0, None)) -> None:
        self.gate = nnx.Param(w["gate"])
        self.up = nnx.Param(w["up"])
        self.down = nnx.Param(w["down"])
        _init_lora(self, config, lora.MLP_TARGETS, lora_spec)

    def __call__(self, x: jax.Array, coef: jax.Array | None = None) -> jax.Array:
        gate, up = linear_many(x, [_value(self.gate), _value(self.up)])
        hidden = jax.nn.silu(_lora(self, "gate", gate, x, coef)) * _lora(self, "up", up, x, coef)
        return _lora(self, "down", linear(hidden, _value(self.down)), hidden, coef)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, w: Mapping[str, Weight], kernels: bool = True,
                 lora_spec: LoraSpec = (0, 0, None)) -> None:
        self.eps = config.rms_norm_eps
        self.attn_norm = nnx.Param(w["attn_norm"])
        self.mlp_norm = nnx.Param(w["mlp_norm"])
        self.attn = Attention(config, w, kernels, lora_spec)
        self.mlp = MLP(config, w, lora_spec)

    def __call__(
        self, x: jax.Array, inputs: StepInputs, inv_freq: jax.Array, kv: tuple[jax.Array, jax.Array],
        decode_only: bool,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        attn_out, kv = self.attn(rms_norm(x, _value(self.attn_norm), self.eps), inputs, inv_freq, kv,
                                 decode_only)
        x = x + attn_out
        x = x + self.mlp(rms_norm(x, _value(self.mlp_norm), self.eps), lora.token_coef(inputs))
        return x, kv


class LlamaModel(nnx.Module):
    """A Llama-family decoder built from already-loaded weights (no random init)."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, Weight], dtype: jnp.dtype,
                 kernels: bool = True, lora_spec: LoraSpec = (0, 0, None)) -> None:
        """`kernels=False` keeps attention on the jax.numpy reference (engine/tensor_parallel.py says why);
        `lora_spec` (max_loras, max_rank, dtype) adds zeroed adapter slots to every layer (models/lora.py)."""
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed = nnx.Param(weights["embed"])
        self.norm = nnx.Param(weights["norm"])
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(weights["lm_head"])
        self.inv_freq = nnx.Variable(jnp.asarray(config.rope_inv_freq(), jnp.float32))
        self.layers = nnx.List([
            DecoderLayer(config, _layer_weights(weights, i), kernels, lora_spec) for i in range(config.num_layers)
        ])

    def __call__(self, inputs: StepInputs, kv_cache: KVCache, decode_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Logits `[S, vocab]` (float32) for each sequence slot, and the updated cache.

        `decode_only` (static) promises one token per slot, token t in slot t, so
        attention may use the GPU decode kernel.
        """
        x, new_cache = self._trunk(inputs, kv_cache, decode_only)
        last = jnp.take(x, inputs.logits_index, axis=0)
        last = rms_norm(last, _value(self.norm), self.config.rms_norm_eps)
        head = _value(self.embed) if self.lm_head is None else _value(self.lm_head)
        return linear(last, head, out_dtype=jnp.float32), new_cache

    def token_logits(self, inputs: StepInputs, kv_cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits `[T, vocab]` (float32) of every token of the step: what scoring a prompt needs."""
        x, new_cache = self._trunk(inputs, kv_cache, False)
        x = rms_norm(x, _value(self.norm), self.config.rms_norm_eps)
        head = _value(self.embed) if self.lm_head is None else _value(self.lm_head)
        return linear(x, head, out_dtype=jnp.float32), new_cache

    def hidden_states(self, inputs: StepInputs, kv_cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Final-norm hidden states `[T, hidden]` (float32) of every token: what embeddings pool."""
        x, new_cache = self._trunk(inputs, kv_cache, False)
        return rms_norm(x, _value(self.norm), self.config.rms_norm_eps).astype(jnp.float32), new_cache

    def _trunk(self, inputs: StepInputs, kv_cache: KVCache, decode_only: bool) -> tuple[jax.Array, KVCache]:
        x = embed(_value(self.embed), inputs.tokens, self.dtype)
        inv_freq = _value(self.inv_freq)
        new_cache = []
        for layer, kv in zip(self.layers, kv_cache):
            x, kv = layer(x, inputs, inv_freq, kv, decode_only)
            new_cache.append(kv)
        return x, tuple(new_cache)


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype) -> KVCache:
    """Zeroed K/V pages for every layer; page 0 is the null page padding writes go to."""
    shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def kv_bytes_per_page(config: ModelConfig, page_size: int, dtype: jnp.dtype) -> int:
    """Device bytes one page costs across all layers (K and V)."""
    return 2 * config.num_layers * config.num_kv_heads * page_size * config.head_dim * jnp.dtype(dtype).itemsize


def _layer_weights(weights: Mapping[str, Weight], i: int) -> dict[str, Weight]:
    prefix = f"layers.{i}."
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}


def _value(param: nnx.Variable | None) -> Any:
    """A parameter's array (or packed weight), None for an absent optional one; Any because nnx.Param is untyped."""
    return None if param is None else param.get_value()


def _reference_attention(*args: Any, decode_only: bool = False, **kwargs: Any) -> jax.Array:
    """`paged_attention_reference` with `paged_attention`'s signature (decode_only changes nothing there)."""
    del decode_only
    return paged_attention_reference(*args, **kwargs)
