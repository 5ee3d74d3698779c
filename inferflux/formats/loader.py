"""One entry point from a path on disk to everything needed to run a model.

A path is a GGUF file or a Hugging Face safetensors folder; both yield the
same `LoadedModel`: config, weights under our names, tokenizer, chat template.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from inferflux.errors import ModelFormatError
from inferflux.formats.chat_template import ChatTemplate, special_tokens_from_hf_dir, template_from_hf_dir
from inferflux.formats.gguf_file import load_gguf_weights, open_gguf
from inferflux.formats.hf_folder import is_hf_folder, load_hf_weights
from inferflux.formats.model_config import ModelConfig
from inferflux.formats.tokenizer import Tokenizer
from inferflux.formats.weights import Weight


@dataclasses.dataclass
class LoadedModel:
    path: Path
    format: str  # "gguf" or "safetensors"
    config: ModelConfig
    weights: Mapping[str, Weight]
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    metadata: dict[str, Any]  # GGUF key/values, or the HF config.json


def load_model(path: str | Path) -> LoadedModel:
    """Load a GGUF file or a Hugging Face folder; raise `ModelFormatError` naming the file if unreadable."""
    path = Path(path).expanduser()
    if path.is_file():
        return _load_gguf(path)
    if is_hf_folder(path):
        return _load_hf(path)
    if path.is_dir():
        raise ModelFormatError(path, "folder has no config.json (expected a Hugging Face model folder)")
    raise ModelFormatError(path, "no such file or folder")


def _load_gguf(path: Path) -> LoadedModel:
    file = open_gguf(path)
    config = file.model_config()
    tokenizer = Tokenizer.from_gguf(file)
    meta = file.metadata
    special = {
        key: text
        for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
        if token_id is not None and (text := tokenizer.id_to_token(token_id)) is not None
    }
    return LoadedModel(
        path=path,
        format="gguf",
        config=config,
        weights=load_gguf_weights(file, config),
        tokenizer=tokenizer,
        chat_template=ChatTemplate(meta.get("tokenizer.chat_template"), special),
        metadata=meta,
    )


def _load_hf(path: Path) -> LoadedModel:
    config = ModelConfig.from_hf_dir(path)
    return LoadedModel(
        path=path,
        format="safetensors",
        config=config,
        weights=load_hf_weights(path, config),
        tokenizer=Tokenizer.from_hf_dir(path),
        chat_template=ChatTemplate(template_from_hf_dir(path), special_tokens_from_hf_dir(path)),
        metadata=json.loads((path / "config.json").read_text()),
    )
