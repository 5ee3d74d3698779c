"""Model names (`name[:tag]`) and the store's errors.

A name becomes a path under `manifests/`, so it is validated before anything
touches the disk: only characters a path component can hold safely, no part
that could be mistaken for a manifest file, bounded lengths.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from inferflux.errors import InferFluxError

DEFAULT_TAG = "latest"

_COMPONENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MAX_NAME = 200
_MAX_TAG = 128


class StoreError(InferFluxError):
    """A store operation cannot be done as asked (bad name, unknown model, failed download)."""


class ModelNotFoundError(StoreError):
    """A name is not in the store (the HTTP layer can map this to 404)."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A validated `name:tag`."""

    name: str
    tag: str = DEFAULT_TAG

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_name(text: str) -> ModelRef:
    """`name[:tag]` -> ModelRef; a clear error for anything a path on disk could not safely hold."""
    name, sep, tag = str(text).strip().partition(":")
    tag = tag if sep else DEFAULT_TAG
    if not name or len(name) > _MAX_NAME or not _NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid model name {text!r}: use letters, digits, '-', '_', '.' and '/' between parts "
            f"(e.g. 'llama3', 'me/llama3:8b-q4'), at most {_MAX_NAME} characters"
        )
    if any(part.endswith(".json") for part in name.split("/")):
        raise StoreError(f"invalid model name {text!r}: a name part may not end in '.json'")
    if not tag or len(tag) > _MAX_TAG or not _TAG_RE.fullmatch(tag):
        raise StoreError(
            f"invalid tag in {text!r}: use letters, digits, '-', '_' and '.', at most {_MAX_TAG} characters"
        )
    return ModelRef(name, tag)


def default_name(stem: str) -> str:
    """A file or folder stem made into a valid name (spaces and odd characters become '-')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")
    return cleaned or "model"


def looks_like_path(text: str) -> bool:
    """Whether an unknown name was probably meant as a path (so the error says "no such file")."""
    model_suffix = Path(text).suffix.lower() in (".gguf", ".safetensors")
    return text.startswith(("/", ".", "~")) or (os.sep in text and model_suffix)


def first_line(exc: BaseException) -> str:
    """An exception as one short line, for errors that quote a library's message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
