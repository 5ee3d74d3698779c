"""Reading Hugging Face model folders: `config.json` plus single or sharded safetensors.

Tensors are read one at a time through the `safetensors` library (which
memory-maps each file), so the whole model is never held twice. bf16 weights
come back as `ml_dtypes.bfloat16` arrays (numpy has no bf16 of its own).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, which safetensors needs
import numpy as np
from safetensors import SafetensorError, safe_open

from inferflux.errors import ModelFormatError
from inferflux.formats.model_config import ModelConfig
from inferflux.formats.weights import check_complete, hf_to_ours

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (from the index if sharded)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFormatError(index, f"bad shard index: {exc}") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelFormatError(shard, f"missing shard listed in {INDEX_FILE}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise ModelFormatError(folder, f"no {SINGLE_FILE} or {INDEX_FILE} in the folder")
    return {name: single for name in _keys(single)}


class SafetensorsFolder:
    """The tensors of a Hugging Face folder, by name, wherever their shard is.

    Shapes come from the safetensors headers alone; `read` loads one tensor.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = weight_files(self.folder)

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(self.files[name]) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        file = self.files[name]
        with self._open(file) as handle:
            if name not in handle.keys():
                raise ModelFormatError(file, f"tensor {name!r} listed in the index is not in this shard")
            try:
                return handle.get_tensor(name)
            except (SafetensorError, TypeError, ValueError) as exc:
                raise ModelFormatError(file, f"cannot read tensor {name!r} ({exc})") from None

    @staticmethod
    def _open(file: Path) -> Any:
        try:
            return safe_open(file, framework="numpy")
        except (SafetensorError, OSError) as exc:
            raise ModelFormatError(file, f"not a readable safetensors file ({exc})") from None


def load_hf_weights(folder: str | Path, config: ModelConfig) -> dict[str, np.ndarray]:
    """All model weights under our names (see `formats.weights`)."""
    tensors = SafetensorsFolder(folder)
    names = hf_to_ours(config.num_layers)
    weights = {names[hf]: tensors.read(hf) for hf in tensors.names if hf in names}
    check_complete(weights, config, Path(folder))
    return weights


def _keys(file: Path) -> list[str]:
    with SafetensorsFolder._open(file) as handle:
        return list(handle.keys())
