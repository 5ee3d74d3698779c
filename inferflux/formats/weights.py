"""Parameter names shared by every loader and writer, and the host-side weight types.

A model's tensors go by one set of short names (`layers.3.q`, `embed`, ...)
whatever file they came from. Each name has its Hugging Face and GGUF
spelling in one table, so the safetensors loader, the GGUF loader and the
safetensors-to-GGUF converter cannot drift apart.

Matrices keep the layout both formats use: `[out_features, in_features]`,
row-major, with GGML quant blocks running along `in_features`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path

import gguf
import numpy as np

from inferflux.errors import ModelFormatError
from inferflux.formats.model_config import ModelConfig

# (our name, Hugging Face name, GGUF name); "{i}" is the layer index.
GLOBAL_NAMES: tuple[tuple[str, str, str], ...] = (
    ("embed", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm", "model.norm.weight", "output_norm.weight"),
    ("lm_head", "lm_head.weight", "output.weight"),
)
LAYER_NAMES: tuple[tuple[str, str, str], ...] = (
    ("attn_norm", "input_layernorm.weight", "attn_norm.weight"),
    ("q", "self_attn.q_proj.weight", "attn_q.weight"),
    ("k", "self_attn.k_proj.weight", "attn_k.weight"),
    ("v", "self_attn.v_proj.weight", "attn_v.weight"),
    ("o", "self_attn.o_proj.weight", "attn_output.weight"),
    ("q_bias", "self_attn.q_proj.bias", "attn_q.bias"),
    ("k_bias", "self_attn.k_proj.bias", "attn_k.bias"),
    ("v_bias", "self_attn.v_proj.bias", "attn_v.bias"),
    ("o_bias", "self_attn.o_proj.bias", "attn_output.bias"),
    ("mlp_norm", "post_attention_layernorm.weight", "ffn_norm.weight"),
    ("gate", "mlp.gate_proj.weight", "ffn_gate.weight"),
    ("up", "mlp.up_proj.weight", "ffn_up.weight"),
    ("down", "mlp.down_proj.weight", "ffn_down.weight"),
)
# Present in GGUF files only: llama3 rope scaling stored as per-frequency divisors.
GGUF_ROPE_FREQS = "rope_freqs.weight"


def iter_names(num_layers: int) -> Iterator[tuple[str, str, str]]:
    """Every (ours, hf, gguf) name triple of a model with `num_layers` layers."""
    yield from GLOBAL_NAMES
    for i in range(num_layers):
        for ours, hf, gg in LAYER_NAMES:
            yield f"layers.{i}.{ours}", f"model.layers.{i}.{hf}", f"blk.{i}.{gg}"


def hf_to_ours(num_layers: int) -> dict[str, str]:
    return {hf: ours for ours, hf, _ in iter_names(num_layers)}


def gguf_to_ours(num_layers: int) -> dict[str, str]:
    return {gg: ours for ours, _, gg in iter_names(num_layers)}


def ours_to_gguf(num_layers: int) -> dict[str, str]:
    return {ours: gg for ours, _, gg in iter_names(num_layers)}


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A GGML-quantized matrix as stored in the file, still packed.

    `raw` is uint8, `[rows, bytes_per_row]` (a view into the memory-mapped
    file until something copies it). The runtime decides what to do with it:
    dequantize to float on CPU, or keep it packed on GPU (`formats.quants.QTensor`).
    """

    raw: np.ndarray
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]

    def take_rows(self, index: np.ndarray) -> QuantizedWeight:
        """Reorder rows; blocks run along a row, so this is exact on packed data."""
        return dataclasses.replace(self, raw=self.raw[index])

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)


Weight = np.ndarray | QuantizedWeight


def undo_llama_rope_permutation(weight: Weight, num_heads: int) -> Weight:
    """Undo the Q/K row permutation that llama.cpp's converter applies for `llama`.

    llama.cpp rotates adjacent pairs (GPT-J style, rope type NORM) for the
    `llama` architecture, so its converter interleaves each head's rows:
    HF row (head, half, j) is stored at GGUF row (head, j, half). We undo it
    here and use Hugging Face's rotate-half rotary convention for every
    architecture: one rotary implementation, and a GGUF file and the
    safetensors folder it came from load into identical parameters.
    (`qwen2` GGUF files are written without the permutation: NEOX rope.)
    """
    return _take_rows(weight, llama_rope_row_index(_rows(weight), num_heads))


def apply_llama_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The converter's direction: HF rows -> llama.cpp's interleaved rows."""
    index = llama_rope_row_index(weight.shape[0], num_heads)
    out = np.empty_like(weight)
    out[index] = weight
    return out


def llama_rope_row_index(rows: int, num_heads: int) -> np.ndarray:
    """`index[hf_row] = gguf_row` for the llama Q/K permutation."""
    head_dim = rows // num_heads
    half = head_dim // 2
    head, rest = np.divmod(np.arange(rows), head_dim)
    which_half, j = np.divmod(rest, half)
    return head * head_dim + j * 2 + which_half


def _rows(weight: Weight) -> int:
    return weight.shape[0]


def _take_rows(weight: Weight, index: np.ndarray) -> Weight:
    if isinstance(weight, QuantizedWeight):
        return weight.take_rows(index)
    return weight[index]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a model with this config has, and its shape (`[out, in]` for matrices)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (config.vocab_size, hidden), "norm": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, hidden)
    per_layer: dict[str, tuple[int, ...]] = {
        "attn_norm": (hidden,), "q": (q_rows, hidden), "k": (kv_rows, hidden), "v": (kv_rows, hidden),
        "o": (hidden, q_rows), "mlp_norm": (hidden,), "gate": (inter, hidden), "up": (inter, hidden),
        "down": (hidden, inter),
    }
    if config.qkv_bias:
        per_layer.update(q_bias=(q_rows,), k_bias=(kv_rows,), v_bias=(kv_rows,))
    if config.o_bias:
        per_layer["o_bias"] = (hidden,)
    for i in range(config.num_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def check_complete(weights: Mapping[str, Weight], config: ModelConfig, path: Path) -> None:
    """Every expected weight is present with the shape the config implies."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in weights]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelFormatError(path, f"missing {len(missing)} weight tensor(s): {shown}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ModelFormatError(path, f"weight {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")
