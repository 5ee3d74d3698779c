"""What `pull --quantize TYPE` does: convert a safetensors folder to a GGUF blob at that type.

The converter writes into a temp file beside the blobs, which is then hashed
and renamed onto its blob name: a quantized pull costs one write of the GGUF,
no copy, and an interrupted one leaves only a temp file the next pull removes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferflux.files import temp_path
from inferflux.store.blobs import Blobs, LayerHook, Progress
from inferflux.store.names import StoreError

QUANTIZE_TYPES = ("Q4_K", "Q6_K", "Q8_0", "F16", "F32", "BF16", "Q4_0")


def check_quantize(quantize: str | None) -> str | None:
    """A `--quantize` value normalized ("q4_k" -> "Q4_K"), refused before any work if unsupported."""
    if quantize is None:
        return None
    key = str(quantize).upper()
    if key not in QUANTIZE_TYPES:
        raise StoreError(f"unsupported quantization {quantize!r}; choose one of {', '.join(QUANTIZE_TYPES)}")
    return key


def convert_to_blob(blobs: Blobs, folder: Path, quant: str, progress: Progress | None,
                    on_layer: LayerHook | None = None) -> dict[str, Any]:
    """Convert `folder` to a `quant` GGUF stored as a blob; returns its layer (digest, size)."""
    from inferflux.convert.hf_to_gguf import convert_hf_to_gguf

    def on_tensor(_tensor: str, done: int, total: int) -> None:
        if progress is not None:
            progress(f"converting to {quant}", done, total, "tensors")

    with temp_path(blobs.root, suffix=".gguf") as tmp:
        convert_hf_to_gguf(folder, tmp, quant, progress=on_tensor)
        return blobs.adopt(tmp, f"{quant} GGUF", progress, on_layer)
