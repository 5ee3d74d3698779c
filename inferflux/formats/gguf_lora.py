"""GGUF LoRA adapters: llama.cpp's format (what its `convert_lora_to_gguf.py` writes and `llama_adapter_lora_init`
reads), read into PEFT's orientation and written from a PEFT folder.

The layout, as llama.cpp defines it:
- metadata `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32) and
  `general.architecture` (llama.cpp refuses an adapter whose architecture differs from the base's);
- per adapted projection `blk.N.<proj>.weight.lora_a` with GGML shape [in, r] and `.lora_b` with [r, out], i.e.
  numpy (row-major, dims reversed) A [r, in] and B [out, r]: PEFT's own lora_A / lora_B matrices;
- the scale llama.cpp applies is `alpha / r` (r read from each tensor; alpha 0 means 1), without rsLoRA: our
  writer stores `alpha * sqrt(r)` for an rsLoRA adapter so llama.cpp and we both apply PEFT's `alpha / sqrt(r)`;
- for `llama`, B of attn_q / attn_k carries the converter's Q/K row interleave (the base's own rows are
  permuted the same way), so reading undoes it, as the base loader does (formats/weights.py).

Kept apart from the runtime (engine/lora.py) so the CLI and the store can read an adapter's facts without JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from inferflux.errors import ModelFormatError
from inferflux.formats.model_config import ModelConfig
from inferflux.formats.weights import LAYER_NAMES, apply_llama_rope_permutation, undo_llama_rope_permutation

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# GGUF projection names (without "blk.N." and ".weight") <-> ours; from the shared name table.
GGUF_TO_TARGET = {gg.removesuffix(".weight"): ours for ours, _, gg in LAYER_NAMES if ours in LORA_TARGETS}
TARGET_TO_GGUF = {ours: gg for gg, ours in GGUF_TO_TARGET.items()}
HF_TO_TARGET = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
OUTPUT_TYPES = ("F32", "F16", "BF16", "Q8_0")
GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class GGUFLora:
    """A GGUF LoRA file's contents: per (layer, target) PEFT-oriented A [r, in] and B [out, r], unscaled."""

    architecture: str
    alpha: float
    tensors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    def scaling(self, rank: int) -> float:
        """llama.cpp's scale for a tensor pair of rank `rank`: alpha / r, or 1 when alpha is 0."""
        return self.alpha / rank if self.alpha else 1.0


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    """An adapter held in memory only (a decrypted stored adapter): its files' bytes by relative name.

    A PEFT folder is `adapter_config.json` + `adapter_model.safetensors`; a GGUF LoRA is one `*.gguf` entry.
    """

    label: str
    files: dict[str, bytes] = dataclasses.field(repr=False)

    @property
    def gguf(self) -> bytes | None:
        """The GGUF file's bytes, when the adapter is one."""
        found = [data for data in self.files.values() if data[:4] == GGUF_MAGIC]
        return found[0] if len(found) == 1 and len(self.files) == 1 else None


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic (an adapter file, not a PEFT folder)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """One tensor as float32 in numpy order (GGML dims reversed), dequantized if stored quantized."""
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.asarray(tensor.data, np.float32).reshape(shape)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.asarray(tensor.data).view(np.float16).astype(np.float32).reshape(shape)
    return np.asarray(gguf.quants.dequantize(tensor.data, qtype), np.float32).reshape(shape)


def read_gguf_lora(path: str | Path, config: ModelConfig | None = None) -> GGUFLora:
    """Read a GGUF LoRA file; with the base's `config`, Q/K B rows of a `llama` adapter are un-permuted.

    A file that is not a LoRA adapter (a model, a control vector, an aLoRA) is a `ModelFormatError`.
    """
    p = Path(path)
    try:
        reader = gguf.GGUFReader(p, "r")
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as exc:  # the reader raises ValueError, KeyError, IndexError, ...
        raise ModelFormatError(p, f"not a readable GGUF file ({str(exc).strip()[:200] or type(exc).__name__})") \
            from None
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise ModelFormatError(p, f"not a GGUF LoRA adapter (general.type={meta.get('general.type')!r}, "
                                  f"adapter.type={meta.get('adapter.type')!r}; expected 'adapter' and 'lora')")
    if meta.get("adapter.alora.invocation_tokens") is not None:
        raise ModelFormatError(p, "activated LoRA (aLoRA) adapters are not supported")
    arch = str(meta.get("general.architecture", ""))
    alpha = float(meta.get("adapter.lora.alpha", 0.0) or 0.0)
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        name = tensor.name
        stem, _, which = name.rpartition(".weight.lora_")
        fields = stem.split(".")
        if which not in ("a", "b") or len(fields) != 3 or fields[0] != "blk" or not fields[1].isdigit() \
                or fields[2] not in GGUF_TO_TARGET:
            raise ModelFormatError(p, f"unsupported tensor {name!r} (only blk.N.<q/k/v/o/gate/up/down>.weight."
                                      "lora_a/lora_b)")
        parts.setdefault((int(fields[1]), GGUF_TO_TARGET[fields[2]]), {})[which] = _tensor(tensor)
    tensors = {}
    for key, ab in sorted(parts.items()):
        if set(ab) != {"a", "b"}:
            raise ModelFormatError(p, f"layer {key[0]} {key[1]}: lora_a and lora_b must come in pairs")
        a, b = ab["a"], ab["b"]
        if config is not None and arch == "llama" and key[1] in ("q", "k"):
            heads = config.num_heads if key[1] == "q" else config.num_kv_heads
            b = np.asarray(undo_llama_rope_permutation(b, heads))
        tensors[key] = (a, b)
    return GGUFLora(arch, alpha, tensors)


def _gguf_type(array: np.ndarray, out_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The array as `out_type` stores it; Q8_0 rows that are not whole blocks fall back to F16 (as llama.cpp's)."""
    if out_type == "F32":
        return array.astype(np.float32), None
    if out_type == "Q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    if out_type == "BF16":
        qtype = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    return array.astype(np.float16), None


def base_config(base: str | Path) -> ModelConfig:
    """The base model's config, from a Hugging Face folder or a GGUF model file."""
    from inferflux.formats.gguf_file import GGUFFile

    path = Path(base)
    return ModelConfig.from_hf_dir(path) if path.is_dir() else GGUFFile(path).model_config()


def convert_peft_to_gguf(adapter: str | Path, base: str | Path, dst: str | Path, out_type: str = "F32") -> Path:
    """Write the PEFT adapter folder `adapter` (of the model at `base`) as a GGUF LoRA file at `dst`."""
    from safetensors import safe_open

    from inferflux.files import atomic_write

    out_type = out_type.upper()
    if out_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown GGUF LoRA type {out_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    folder, dst, config = Path(adapter), Path(dst), base_config(base)
    try:
        meta: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(folder, f"not a PEFT adapter folder (adapter_config.json: {exc})") from None
    if meta.get("use_dora"):
        raise ModelFormatError(folder, "DoRA adapters have no GGUF LoRA form")
    rank, alpha = int(meta.get("r", 0)), float(meta.get("lora_alpha", meta.get("r", 0)))
    if meta.get("use_rslora"):  # llama.cpp applies alpha / r: store the alpha that makes that PEFT's alpha / sqrt(r)
        alpha *= math.sqrt(rank)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
        for name in f.keys():
            fields = name.split(".")
            try:
                layer = int(fields[fields.index("layers") + 1])
                target = HF_TO_TARGET[fields[fields.index(next(x for x in fields if x.startswith("lora_"))) - 1]]
            except (ValueError, KeyError, IndexError, StopIteration):
                raise ModelFormatError(folder, f"unsupported tensor {name!r} (only q/k/v/o/gate/up/down LoRA A/B)") \
                    from None
            which = "a" if ".lora_A." in name else "b"
            pairs.setdefault((layer, target), {})[which] = np.asarray(f.get_tensor(name), np.float32)
    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, config.architecture)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            for (layer, target), ab in sorted(pairs.items()):
                a, b = ab["a"], ab["b"]
                if config.architecture == "llama" and target in ("q", "k"):  # the base's rows are interleaved too
                    b = apply_llama_rope_permutation(b, config.num_heads if target == "q" else config.num_kv_heads)
                for which, array in (("a", a), ("b", b)):
                    data, qtype = _gguf_type(array, out_type)
                    writer.add_tensor(f"blk.{layer}.{TARGET_TO_GGUF[target]}.weight.lora_{which}", data,
                                      raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(dst, write)
    return dst
