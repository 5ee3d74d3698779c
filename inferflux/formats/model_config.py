"""The model's hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

Both file formats describe the same Llama-family network with different key
names; `ModelConfig` is the one shape the runtime sees. Architecture
differences (Qwen2's q/k/v bias, tied embeddings, rope scaling) are fields, not
subclasses, so one model module serves the whole family.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferflux.errors import ModelFormatError
from inferflux.formats.json_file import read_json_object

# Hugging Face `architectures[0]` -> our family name and GGUF `general.architecture`.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # llama.cpp stores Mistral as `llama` too
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling.

    `kind` is "linear" (positions divided by `factor`) or "llama3" (Llama 3.1's
    wavelength-dependent scaling). GGUF files store llama3 scaling as a
    precomputed `rope_freqs` tensor instead; see `ModelConfig.rope_freq_factors`.
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors (length head_dim // 2), as llama.cpp's `rope_freqs`.
    rope_freq_factors: tuple[float, ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], path: str | Path = "config.json") -> ModelConfig:
        """Build from a parsed Hugging Face `config.json`."""
        archs = config.get("architectures") or []
        hf_arch = archs[0] if archs else None
        if hf_arch not in HF_ARCHITECTURES:
            raise ModelFormatError(
                path,
                f"unsupported architecture {hf_arch!r}; supported: {', '.join(HF_ARCHITECTURES)}",
            )
        if config.get("mlp_bias"):
            raise ModelFormatError(path, "mlp_bias=true is not supported")
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            arch = HF_ARCHITECTURES[hf_arch]
            attention_bias = bool(config.get("attention_bias", False))
            return cls(
                architecture=arch,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                max_position=int(config.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_hf_rope_theta(config)),
                rope_scaling=_hf_rope_scaling(config, path),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases and no o bias; Llama's flag covers all four.
                qkv_bias=arch == "qwen2" or attention_bias,
                o_bias=arch == "llama" and attention_bias,
                sliding_window=_hf_sliding_window(config),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(path, f"bad or missing config key: {exc}") from None

    @classmethod
    def from_hf_dir(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        return cls.from_hf_config(read_json_object(path), path)

    @classmethod
    def from_gguf_metadata(
        cls,
        meta: Mapping[str, Any],
        path: str | Path,
        *,
        vocab_size: int,
        tie_word_embeddings: bool,
        qkv_bias: bool,
        o_bias: bool,
        rope_freq_factors: np.ndarray | None = None,
    ) -> ModelConfig:
        """Build from GGUF key/values; tensor-derived facts are passed in by the loader."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelFormatError(
                path, f"unsupported architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise ModelFormatError(path, f"missing metadata key {arch}.{name}")
            return value

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        kv_heads = key("attention.head_count_kv", heads)
        if isinstance(kv_heads, (list, tuple)):  # per-layer counts: we need them uniform
            if len(set(kv_heads)) != 1:
                raise ModelFormatError(path, "per-layer KV head counts are not supported")
            kv_heads = kv_heads[0]
        head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
        scaling = None
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            scaling = RopeScaling("linear", factor=float(key("rope.scaling.factor")))
        elif scaling_type not in (None, "none"):
            raise ModelFormatError(path, f"unsupported rope scaling type {scaling_type!r}")
        factors = None
        if rope_freq_factors is not None:
            factors = tuple(float(f) for f in np.asarray(rope_freq_factors, np.float32).reshape(-1))
            if len(factors) != head_dim // 2:
                raise ModelFormatError(path, f"rope_freqs has {len(factors)} entries, expected {head_dim // 2}")
        return cls(
            architecture=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            max_position=int(key("context_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rope_freq_factors=factors,
            tie_word_embeddings=tie_word_embeddings,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        )

    def rope_base_inv_freq(self) -> np.ndarray:
        """Unscaled inverse rotary frequencies theta^(-2i/d), float64."""
        dim = self.head_dim
        return 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse rotary frequencies (float32, length head_dim // 2) with scaling applied.

        One function for both sources, so a safetensors folder and the GGUF we
        convert from it rotate identically.
        """
        inv_freq = self.rope_base_inv_freq()
        if self.rope_freq_factors is not None:
            inv_freq = inv_freq / np.asarray(self.rope_freq_factors, np.float64)
        elif self.rope_scaling is not None and self.rope_scaling.kind == "llama3":
            inv_freq = inv_freq / llama3_rope_factors(self.rope_scaling, inv_freq)
        elif self.rope_scaling is not None and self.rope_scaling.kind == "linear":
            inv_freq = inv_freq / self.rope_scaling.factor
        return inv_freq.astype(np.float32)


def llama3_rope_factors(scaling: RopeScaling, inv_freq: np.ndarray) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling (what GGUF's `rope_freqs` holds).

    Long wavelengths are divided by `factor`, short ones kept, and the band in
    between interpolated smoothly, as in Meta's reference implementation.
    """
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    factors = np.where(
        wavelen < high_wavelen,
        1.0,
        np.where(wavelen > low_wavelen, scaling.factor, 1.0 / ((1 - smooth) / scaling.factor + smooth)),
    )
    return factors.astype(np.float64)


def _hf_rope_theta(config: Mapping[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return config.get("rope_theta") or params.get("rope_theta") or 10000.0


def _hf_rope_scaling(config: Mapping[str, Any], path: str | Path) -> RopeScaling | None:
    # transformers 5 moved `rope_scaling` into `rope_parameters`; accept both.
    raw = config.get("rope_scaling") or config.get("rope_parameters")
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw["low_freq_factor"]),
            high_freq_factor=float(raw["high_freq_factor"]),
            original_max_position=int(raw["original_max_position_embeddings"]),
        )
    raise ModelFormatError(path, f"unsupported rope scaling type {kind!r}")


def _hf_sliding_window(config: Mapping[str, Any]) -> int | None:
    if config.get("use_sliding_window") is False:
        return None
    window = config.get("sliding_window")
    return int(window) if window else None
