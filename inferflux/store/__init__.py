"""The local model store: `inferctl pull NAME`, then serve or show the model by that name.

Layout under `home/models/` (Ollama-like, so the idea carries over):

    blobs/sha256-<hex>                   content-addressed files; the same bytes are stored once
    manifests/<name>/<tag>.json          what a name means: format, layers (digest, size, role), facts
    folders/<layers-digest>/             a safetensors model materialized as a folder (hard links to blobs)
    .lock                                shared by pulls, exclusive for garbage collection

One module per concern: `names` (parse_name, references, errors), `blobs`
(content-addressed files, hashing, materialized folders), `manifests`,
`sources` (GGUF file, safetensors folder, `ollama://`, `hf://`, the local Ollama
store), `conversion` (`--quantize`), and `model_store` (`ModelStore`, which ties
them together under one lock). Files are published through `inferflux.files`.
The public names are re-exported here, so callers import from `inferflux.store`.
"""

from __future__ import annotations

from inferflux.store.blobs import CHUNK_SIZE, LayerHook, Progress
from inferflux.store.conversion import QUANTIZE_TYPES
from inferflux.store.manifests import MODEL_ROLE, ModelEntry, merge_overrides
from inferflux.store.model_store import ModelStore, open_store
from inferflux.store.names import (
    DEFAULT_TAG,
    ModelNotFoundError,
    ModelRef,
    StoreError,
    default_name,
    parse_name,
)
from inferflux.store.sources import (
    HF_ALLOW_PATTERNS,
    OLLAMA_MODEL_MEDIA_TYPE,
    OLLAMA_REGISTRY,
    ollama_store_has,
)

__all__ = [
    "CHUNK_SIZE", "DEFAULT_TAG", "HF_ALLOW_PATTERNS", "MODEL_ROLE", "OLLAMA_MODEL_MEDIA_TYPE", "OLLAMA_REGISTRY",
    "QUANTIZE_TYPES", "LayerHook", "ModelEntry", "ModelNotFoundError", "ModelRef", "ModelStore", "Progress",
    "StoreError", "default_name", "merge_overrides", "open_store", "ollama_store_has", "parse_name",
]
