"""What a model is, read once from its headers: `ModelFacts`, and `describe_model` for `inferctl show`.

Reads headers only (GGUF metadata and tensor table, safetensors headers), so
describing a large model costs no weight reads. `ModelFacts` is the one answer
to "what kind of model is this" (generative or encoder, format, size, context,
template, capabilities): the store writes it into a model's manifest at pull, so
listing routes read no model files, and loaded handles carry it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from inferflux.errors import ModelFormatError
from inferflux.formats.chat_template import template_from_hf_dir
from inferflux.formats.gguf_file import GGUFFile, open_gguf
from inferflux.formats.hf_folder import SafetensorsFolder, is_hf_folder
from inferflux.formats.json_file import read_json_object
from inferflux.formats.model_config import ModelConfig

KINDS = ("llm", "encoder")
FACTS_VERSION = 1  # bumped when a field is added, so manifests written before are recomputed


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """A model's identity as every API reports it; frozen and cached (one read of the headers per file version)."""

    kind: str  # "llm" (generates; served by the engine) or "encoder" (embeddings only; served by the embedder)
    format: str  # "gguf" or "safetensors"
    architecture: str
    parameters: int
    parameter_size: str  # "1.1B", as Ollama labels it
    quantization: str  # the GGUF file type ("Q4_K_M", "F16"), or "none" for safetensors
    context_length: int  # what the model was trained for; a server may cap it (runtime.max_model_len)
    embedding_length: int
    chat_template: str | None = None
    license: str | None = None
    capabilities: tuple[str, ...] = ()  # Ollama's words: "completion", "tools", "embedding"

    @property
    def generative(self) -> bool:
        return self.kind == "llm"

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (JSON), with the version that wrote it."""
        return {"version": FACTS_VERSION, **dataclasses.asdict(self), "capabilities": list(self.capabilities)}

    @classmethod
    def from_dict(cls, data: Any) -> ModelFacts | None:
        """Facts recorded in a manifest, or None when they are absent, older or malformed (recompute them)."""
        if not isinstance(data, dict) or data.get("version") != FACTS_VERSION:
            return None
        try:
            fields = {f.name: data[f.name] for f in dataclasses.fields(cls)}
            fields["capabilities"] = tuple(str(c) for c in fields["capabilities"])
            facts = cls(**fields)
        except (KeyError, TypeError):
            return None
        return facts if facts.kind in KINDS else None

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> ModelFacts:
        """The facts in a `describe_model` summary."""
        encoder = summary.get("kind") == "encoder"
        template = None if encoder else summary.get("chat_template")
        return cls(
            kind="encoder" if encoder else "llm", format=summary["format"], architecture=summary["architecture"],
            parameters=int(summary["parameters"]), parameter_size=summary["parameter_size"],
            quantization=summary["quantization"], context_length=int(summary["context_length"]),
            embedding_length=int(summary["embedding_length"]), chat_template=template,
            license=summary.get("license"), capabilities=capabilities(encoder, template),
        )


def capabilities(encoder: bool, template: str | None) -> tuple[str, ...]:
    """Ollama's capability list: an encoder embeds; a generator completes, and takes tools if its template does."""
    if encoder:
        return ("embedding",)
    return ("completion", "tools") if template and "tools" in template else ("completion",)


def model_facts(path: str | Path) -> ModelFacts:
    """The facts of a model file or folder, cached per file version (path, sizes and mtimes)."""
    path = Path(path).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        raise ModelFormatError(path, "no such model file or folder")
    version = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _cached_facts(path, version)


@functools.lru_cache(maxsize=256)
def _cached_facts(path: Path, _version: tuple[tuple[str, int, int], ...]) -> ModelFacts:
    return ModelFacts.from_summary(describe_model(path))


def describe_model(path: str | Path) -> dict[str, Any]:
    """Architecture, size, context length, quantization, template and license of a model path.

    BERT-family embedding models (a sentence-transformers folder, a `bert` GGUF) are described too,
    without a chat template: `serve` handles them, so `show` must not refuse them.
    """
    path = Path(path).expanduser()
    if path.is_file():
        file = open_gguf(path)
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
        "license": file.metadata.get("general.license") if file is not None else None,
        "kind": "encoder", "capabilities": list(capabilities(True, None)),
        "note": _encoder_note(path, file),
    }


def _encoder_note(path: Path, file: GGUFFile | None) -> str:
    """What an encoder is served for: a cross-encoder (folder head or GGUF rank pooling) also reranks."""
    from inferflux.formats.cross_encoder import is_cross_encoder
    from inferflux.formats.gguf_rerank import is_gguf_reranker

    if is_gguf_reranker(file) if file is not None else is_cross_encoder(path):
        return "cross-encoder: served on /v1/rerank, /v2/rerank and /v1/score (and /v1/embeddings), not for chat"
    return "embedding model: served on /v1/embeddings and /api/embed, not for chat"


def _tensor_types(file: GGUFFile) -> dict[str, int]:
    """Elements per GGML type: what the file's weights are stored as."""
    counts: dict[str, int] = {}
    for tensor in file.tensors.values():
        name = gguf.GGMLQuantizationType(tensor.tensor_type).name
        counts[name] = counts.get(name, 0) + int(tensor.n_elements)
    return counts


def _gguf_quantization(file: GGUFFile, counts: dict[str, int] | None = None) -> str:
    """The file type the file declares ("Q4_K_M"), else the type most of its weights use."""
    try:
        return gguf.LlamaFileType(int(file.metadata["general.file_type"])).name.removeprefix("MOSTLY_") \
            .removeprefix("ALL_")
    except (KeyError, ValueError, TypeError):
        types = _tensor_types(file) if counts is None else counts
        return max(types, key=lambda name: types[name]) if types else "unknown"


def _describe_gguf(path: Path, file: GGUFFile) -> dict[str, Any]:
    config = file.model_config()
    meta = file.metadata
    counts = _tensor_types(file)
    quantization = _gguf_quantization(file, counts)
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
        "kind": "llm",
        "capabilities": list(capabilities(False, template)),
    }


def human_parameter_count(count: int) -> str:
    """"1.1B", "68M", "950K": the way Ollama labels model sizes."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(count)
