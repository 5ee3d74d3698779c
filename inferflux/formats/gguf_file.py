"""Reading GGUF files (llama.cpp's and Ollama's format) into a config and weights.

The `gguf` package's reader memory-maps the file, so listing a 4 GB model
touches only its header; tensor data is read when a weight is used. Every
failure a broken file can cause is reported as one `ModelFormatError` that
names the file.
"""

from __future__ import annotations

import functools
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import ml_dtypes
import numpy as np

from inferflux.errors import ModelFormatError
from inferflux.formats import gguf_header_cache
from inferflux.formats.model_config import ModelConfig
from inferflux.formats.weights import (
    GGUF_ROPE_FREQS,
    QuantizedWeight,
    Weight,
    check_complete,
    gguf_to_ours,
    undo_llama_rope_permutation,
)

_FLOAT_TYPES = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
}


def open_gguf(path: str | Path) -> GGUFFile:
    """The process's one open `GGUFFile` for `path` while the file is unchanged (same size and mtime).

    Why: parsing a GGUF's metadata builds every field (a 32k-token vocabulary is ~130k parts), 3-4 s for the
    1.1B file on this machine, and `serve` read it twice (describing the model, then loading it).
    """
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return GGUFFile(resolved)  # raises the "file not found" error
    return _open_cached(resolved, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_cached(path: Path, _size: int, _mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file: what gguf-py's `ReaderTensor` says of it, its data a view of the mapped file."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: np.ndarray  # dimensions in GGUF order (innermost first), as gguf-py gives them
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


_ITEM_TYPES = {
    gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


class GGUFFile:
    """An open GGUF file: its metadata as plain Python values and its tensors.

    The header comes from `gguf_header_cache` when this version of the file was parsed before (a restart),
    else from gguf-py's reader (and is then cached); both give the same values and the same tensor views.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(self.path, "file not found")
        resolved = self.path.resolve()
        self._fields: dict[str, gguf.ReaderField] = {}
        self._values: dict[str, Any] | None = None
        self.tensors: dict[str, GGUFTensor]
        cached = gguf_header_cache.load(resolved)
        if cached is not None:
            self._values = cached[0]
            self.tensors = _tensors_from_rows(np.memmap(self.path, mode="r"), cached[1])
            self._check_tensor_extents()
            return
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # the reader raises ValueError, KeyError, IndexError, ...
            raise ModelFormatError(self.path, f"not a readable GGUF file ({_describe(exc)})") from None
        self._fields = dict(reader.fields)
        self.tensors = {t.name: _tensor_of(t) for t in reader.tensors}
        self._check_tensor_extents()
        if reader.byte_order == "I":  # a big-endian file is parsed each time
            self._cache_header(resolved)

    def _cache_header(self, resolved: Path) -> None:
        if gguf_header_cache.directory() is None:
            return
        try:
            values = {name: field.contents() for name, field in self._fields.items()}
        except (UnicodeDecodeError, ValueError, IndexError):  # an unreadable value is reported when it is read
            return
        rows = [(t.name, int(t.tensor_type), [int(d) for d in t.shape.tolist()], t.data_offset)
                for t in self.tensors.values()]
        gguf_header_cache.store(resolved, values, rows)

    def _check_tensor_extents(self) -> None:
        """A truncated download maps fine but ends early: catch it before any read."""
        size = self.path.stat().st_size
        for tensor in self.tensors.values():
            end = tensor.data_offset + tensor.n_bytes
            if end > size:
                raise ModelFormatError(
                    self.path,
                    f"file is truncated: tensor {tensor.name!r} ends at byte {end} but the file has {size}",
                )

    def keys(self) -> list[str]:
        """Every metadata key, in the file's order."""
        return list(self._values) if self._values is not None else list(self._fields)

    def value(self, key: str, default: Any = None) -> Any:
        """One metadata value, decoded; `default` when the file lacks the key; a value that does not decode
        is a `ModelFormatError` naming the key."""
        if self._values is not None:
            return self._values.get(key, default)
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as err:
            raise ModelFormatError(self.path, f"metadata {key!r} is unreadable: {err}") from err

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Key/value metadata, decoded (strings, numbers, lists)."""
        return {name: self.value(name) for name in self.keys()}

    def weight(self, name: str) -> Weight:
        """One tensor in GGUF naming, as a float array view or still-packed quant blocks."""
        tensor = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if qtype == gguf.GGMLQuantizationType.BF16:
            return tensor.data.view(ml_dtypes.bfloat16).reshape(shape)
        if qtype in _FLOAT_TYPES:
            return tensor.data.reshape(shape)
        return QuantizedWeight(raw=tensor.data.reshape(shape[0], -1) if len(shape) > 1 else tensor.data,
                               qtype=qtype, shape=shape)

    def model_config(self) -> ModelConfig:
        meta = self.metadata
        tokens = meta.get("tokenizer.ggml.tokens")
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise ModelFormatError(self.path, "missing tensor 'token_embd.weight'")
        vocab = int(embed.shape[1]) if len(embed.shape) > 1 else len(tokens or [])
        rope_freqs = self.tensors.get(GGUF_ROPE_FREQS)
        return ModelConfig.from_gguf_metadata(
            meta,
            self.path,
            vocab_size=vocab,
            tie_word_embeddings="output.weight" not in self.tensors,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            o_bias="blk.0.attn_output.bias" in self.tensors,
            rope_freq_factors=None if rope_freqs is None else np.asarray(rope_freqs.data, np.float32),
        )


def load_gguf_weights(file: GGUFFile, config: ModelConfig) -> dict[str, Weight]:
    """All model weights under our names, Q/K rows in Hugging Face order.

    Tensors we do not use (e.g. `rope_freqs`, already folded into the config)
    are skipped; a missing one is an error naming the tensor.
    """
    names = gguf_to_ours(config.num_layers)
    weights: dict[str, Weight] = {}
    for gguf_name, ours in names.items():
        if gguf_name not in file.tensors:
            continue
        weight = file.weight(gguf_name)
        if config.architecture == "llama":
            if ours.endswith((".q", ".q_bias")):
                weight = undo_llama_rope_permutation(weight, config.num_heads)
            elif ours.endswith((".k", ".k_bias")):
                weight = undo_llama_rope_permutation(weight, config.num_kv_heads)
        weights[ours] = weight
    check_complete(weights, config, file.path)
    return weights


def _tensor_of(t: gguf.ReaderTensor) -> GGUFTensor:
    return GGUFTensor(t.name, gguf.GGMLQuantizationType(t.tensor_type), t.shape, int(t.n_elements),
                      int(t.n_bytes), int(t.data_offset), t.data)


def _tensors_from_rows(data: np.memmap, rows: list[gguf_header_cache.TensorRow]) -> dict[str, GGUFTensor]:
    """The tensor views gguf-py's reader builds (`GGUFReader._build_tensors`), from a cached table."""
    tensors = {}
    for name, raw_type, dims, offset in rows:
        qtype = gguf.GGMLQuantizationType(raw_type)
        n_elems = int(np.prod(dims))
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = n_elems * type_size // block_size
        np_dims: tuple[int, ...] = tuple(reversed(dims))
        item = _ITEM_TYPES.get(qtype)
        if item is None:
            item, count = np.uint8, n_bytes
            np_dims = gguf.quant_shape_to_byte_shape(np_dims, qtype)
        else:
            count = n_elems
        view = data[offset:offset + count * np.dtype(item).itemsize].view(item)[:count].reshape(np_dims)
        tensors[name] = GGUFTensor(name, qtype, np.array(dims, np.uint64), n_elems, n_bytes, offset, view)
    return tensors


def _describe(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
