"""Errors that InferFlux raises on purpose.

Every failure a user can cause by pointing us at a bad file or a bad request
surfaces as one of these, with a message that names the file (or the field)
and says what is wrong. Callers at the edges (CLI, HTTP) turn them into a
one-line message or a 4xx body; nothing deeper should leak a library traceback.
"""

from __future__ import annotations

from pathlib import Path


class InferFluxError(Exception):
    """Base class for errors meant to be shown to users as they are."""


class ModelFormatError(InferFluxError):
    """A model file or folder cannot be read: corrupt, truncated, or unsupported."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedQuantError(ModelFormatError):
    """A tensor uses a GGML quantization type we cannot dequantize."""

    def __init__(self, path: str | Path, tensor: str, qtype: str) -> None:
        self.tensor = tensor
        self.qtype = qtype
        super().__init__(path, f"tensor {tensor!r} has unsupported quantization type {qtype}")
