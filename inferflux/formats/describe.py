"""A model file's facts for people: what `inferctl show` prints (and, later, Ollama's `/api/show`).

Reads headers only (GGUF metadata and tensor table, safetensors headers), so
describing a large model costs no weight reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from inferflux.errors import ModelFormatError
from inferflux.formats.chat_template import template_from_hf_dir
from inferflux.formats.gguf_file import GGUFFile
from inferflux.formats.hf_folder import SafetensorsFolder, is_hf_folder
from inferflux.formats.json_file import read_json_object
from inferflux.formats.model_config import ModelConfig


def describe_model(path: str | Path) -> dict[str, Any]:
    """Architecture, size, context length, quantization, template and license of a model path.

    BERT-family embedding models (a sentence-transformers folder, a `bert` GGUF) are described too,
    without a chat template: `serve` handles them, so `show` must not refuse them.
    """
    path = Path(path).expanduser()
    if path.is_file():
        file = GGUFFile(path)
        if file.metadata.get("general.architecture") == "bert":
            return _describe_encoder(path, file)
        return _describe_gguf(path, file)
    if is_hf_folder(path):
        if _is_bert_folder(path):
            return _describe_encoder(path)
        return _describe_hf(path)
    raise ModelFormatError(path, "no such model file or folder")


def _is_bert_folder(path: Path) -> bool:
    config = read_json_object(path / "config.json", missing_ok=True)
    archs = config.get("architectures") or []
    return config.get("model_type") == "bert" or any(str(a).startswith("Bert") for a in archs)


def _describe_encoder(path: Path, file: GGUFFile | None = None) -> dict[str, Any]:
    """An embedding model's summary: the encoder's shape, parameters and size; no chat template."""
    from inferflux.formats.encoder import read_encoder_config

    config = read_encoder_config(path)
    if file is not None:
        parameters = sum(int(t.n_elements) for t in file.tensors.values())
        quantization = _gguf_quantization(file)
        size = path.stat().st_size
    else:
        tensors = SafetensorsFolder(path)
        parameters = sum(int(np.prod(tensors.shape(name))) for name in tensors.names)
        quantization = "none"
        size = sum(f.stat().st_size for f in set(tensors.files.values()))
    return {
        "path": str(path), "format": "gguf" if file is not None else "safetensors", "architecture": "bert",
        "parameters": parameters, "parameter_size": human_parameter_count(parameters),
        "context_length": config.max_position, "embedding_length": config.hidden_size,
        "layers": config.num_layers, "heads": config.num_heads, "kv_heads": config.num_heads,
        "vocab_size": config.vocab_size, "quantization": quantization, "tensor_types": {}, "size_bytes": size,
        "license": None, "note": "embedding model: served on /v1/embeddings and /api/embed, not for chat",
    }


def _gguf_quantization(file: GGUFFile) -> str:
    counts: dict[str, int] = {}
    for tensor in file.tensors.values():
        name = gguf.GGMLQuantizationType(tensor.tensor_type).name
        counts[name] = counts.get(name, 0) + int(tensor.n_elements)
    try:
        return gguf.LlamaFileType(file.metadata.get("general.file_type")).name.removeprefix("MOSTLY_") \
            .removeprefix("ALL_")
    except ValueError:
        return max(counts, key=counts.get) if counts else "unknown"


def _describe_gguf(path: Path, file: GGUFFile) -> dict[str, Any]:
    config = file.model_config()
    meta = file.metadata
    counts: dict[str, int] = {}
    for tensor in file.tensors.values():
        name = gguf.GGMLQuantizationType(tensor.tensor_type).name
        counts[name] = counts.get(name, 0) + int(tensor.n_elements)
    file_type = meta.get("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quantization = max(counts, key=counts.get)
    return _summary(
        path, "gguf", config,
        parameters=sum(int(t.n_elements) for t in file.tensors.values() if t.name != "rope_freqs.weight"),
        quantization=quantization,
        tensor_types=counts,
        template=meta.get("tokenizer.chat_template"),
        license=meta.get("general.license"),
        size_bytes=path.stat().st_size,
    )


def _describe_hf(path: Path) -> dict[str, Any]:
    config = ModelConfig.from_hf_dir(path)
    tensors = SafetensorsFolder(path)
    parameters = sum(int(np.prod(tensors.shape(name))) for name in tensors.names)
    return _summary(
        path, "safetensors", config,
        parameters=parameters,
        quantization="none",
        tensor_types={},
        template=template_from_hf_dir(path),
        license=None,
        size_bytes=sum(f.stat().st_size for f in set(tensors.files.values())),
    )


def _summary(path: Path, fmt: str, config: ModelConfig, *, parameters: int, quantization: str,
             tensor_types: dict[str, int], template: str | None, license: str | None,
             size_bytes: int) -> dict[str, Any]:
    return {
        "path": str(path),
        "format": fmt,
        "architecture": config.architecture,
        "parameters": parameters,
        "parameter_size": human_parameter_count(parameters),
        "context_length": config.max_position,
        "embedding_length": config.hidden_size,
        "layers": config.num_layers,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "vocab_size": config.vocab_size,
        "quantization": quantization,
        "tensor_types": tensor_types,
        "size_bytes": size_bytes,
        "chat_template": template,
        "license": license,
    }


def human_parameter_count(count: int) -> str:
    """"1.1B", "68M", "950K": the way Ollama labels model sizes."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(count)
