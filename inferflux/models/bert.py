"""BERT-family encoders (BERT, MiniLM, BGE, E5, GTE, ...) as Flax NNX modules, plus pooling.

An encoder sees the whole input at once, so there is no KV cache and no
paging: a forward pass is one padded batch `[B, T]` of token ids with a
boolean mask of the real tokens. Padding keys are masked out of attention
with the most negative float32 (not -inf), so a batch row that is nothing but
padding (the batch bucket's filler) still gives finite numbers instead of NaN,
while for real rows the masked weights are exactly zero: a sentence embeds to
the same vector alone or padded inside any batch.

The layout is the original post-LN BERT: embeddings (word + absolute position +
token type 0) -> LayerNorm, then per layer `LN(x + attn(x))` and
`LN(h + down(gelu(up(h))))`. GELU is the exact erf form BERT was trained with
(`hidden_act: gelu`); the tanh approximation is used only where the config asks
for it. Everything runs in float32: encoders are small, and cosine parity with
the reference implementation matters more than bf16 speed.

Pooling (mean over real tokens, [CLS], last real token) and L2 normalization
are plain functions so the embedder can fuse them into the compiled program
and only `[B, H]` leaves the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from inferflux.formats.encoder import EncoderConfig, PoolingMode
from inferflux.kernels.quant_matmul import linear

_MASKED = float(jnp.finfo(jnp.float32).min)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis (biased variance, as torch computes it)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps) * weight + bias


def activation(name: str, x: jax.Array) -> jax.Array:
    """The config's `hidden_act`; the loader has already refused names not listed here."""
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    if name in ("silu", "swish"):
        return jax.nn.silu(x)
    raise ValueError(f"unsupported hidden_act {name!r}")


class EncoderLayer(nnx.Module):
    """Self-attention and feed-forward, each followed by a residual LayerNorm (post-LN)."""

    def __init__(self, config: EncoderConfig, w: Mapping[str, jax.Array]) -> None:
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.eps = config.layer_norm_eps
        self.hidden_act = config.hidden_act
        self.q, self.q_bias = nnx.Param(w["q"]), nnx.Param(w["q_bias"])
        self.k, self.k_bias = nnx.Param(w["k"]), nnx.Param(w["k_bias"])
        self.v, self.v_bias = nnx.Param(w["v"]), nnx.Param(w["v_bias"])
        self.o, self.o_bias = nnx.Param(w["o"]), nnx.Param(w["o_bias"])
        self.attn_norm, self.attn_norm_bias = nnx.Param(w["attn_norm"]), nnx.Param(w["attn_norm_bias"])
        self.up, self.up_bias = nnx.Param(w["up"]), nnx.Param(w["up_bias"])
        self.down, self.down_bias = nnx.Param(w["down"]), nnx.Param(w["down_bias"])
        self.out_norm, self.out_norm_bias = nnx.Param(w["out_norm"]), nnx.Param(w["out_norm_bias"])

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = layer_norm(x + self._attention(x, mask), self.attn_norm.get_value(), self.attn_norm_bias.get_value(),
                       self.eps)
        ffn = linear(activation(self.hidden_act, linear(h, self.up.get_value(), self.up_bias.get_value())),
                     self.down.get_value(), self.down_bias.get_value())
        return layer_norm(h + ffn, self.out_norm.get_value(), self.out_norm_bias.get_value(), self.eps)

    def _attention(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        split = (b, t, self.num_heads, self.head_dim)
        q = linear(x, self.q.get_value(), self.q_bias.get_value()).reshape(split)
        k = linear(x, self.k.get_value(), self.k_bias.get_value()).reshape(split)
        v = linear(x, self.v.get_value(), self.v_bias.get_value()).reshape(split)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None, :], scores / math.sqrt(self.head_dim), _MASKED)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
        return linear(out.reshape(b, t, self.num_heads * self.head_dim), self.o.get_value(), self.o_bias.get_value())


class BertModel(nnx.Module):
    """A BERT encoder built from already-loaded weights (our short names, see formats/encoder.py)."""

    def __init__(self, config: EncoderConfig, weights: Mapping[str, jax.Array]) -> None:
        self.config = config
        self.embed = nnx.Param(weights["embed"])
        self.pos_embed = nnx.Param(weights["pos_embed"])
        self.type_embed = nnx.Param(weights["type_embed"])
        self.embed_norm = nnx.Param(weights["embed_norm"])
        self.embed_norm_bias = nnx.Param(weights["embed_norm_bias"])
        self.layers = nnx.List([EncoderLayer(config, _layer_weights(weights, i)) for i in range(config.num_layers)])

    def __call__(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Last hidden states `[B, T, H]` (float32) for ids `[B, T]` and a mask `[B, T]` of real tokens.

        Positions count from 0 at the first column (inputs are right-padded); every
        token has type 0, the single-sentence segment.
        """
        t = token_ids.shape[1]
        x = (jnp.take(self.embed.get_value(), token_ids, axis=0)
             + self.pos_embed.get_value()[None, :t]
             + self.type_embed.get_value()[0][None, None, :])
        x = layer_norm(x, self.embed_norm.get_value(), self.embed_norm_bias.get_value(), self.config.layer_norm_eps)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# --- pooling -------------------------------------------------------------------------------------


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Average of the real tokens' states ([CLS] and [SEP] included, as sentence-transformers does)."""
    weights = mask.astype(hidden.dtype)[..., None]
    total = jnp.sum(hidden * weights, axis=1)
    return total / jnp.clip(jnp.sum(weights, axis=1), 1e-9)


def cls_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """The first token's state ([CLS])."""
    del mask
    return hidden[:, 0]


def last_token_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """The last real token's state (inputs are right-padded, so it sits at length - 1)."""
    last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


POOLERS = {"mean": mean_pool, "cls": cls_pool, "lasttoken": last_token_pool}


def pool(hidden: jax.Array, mask: jax.Array, mode: PoolingMode) -> jax.Array:
    """`[B, T, H]` -> `[B, H]` by the model's pooling mode."""
    return POOLERS[mode](hidden, mask)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit-length rows; `eps` bounds the divisor as torch's F.normalize does, so a zero row stays zero."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _layer_weights(weights: Mapping[str, jax.Array], i: int) -> dict[str, jax.Array]:
    prefix = f"layers.{i}."
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}
