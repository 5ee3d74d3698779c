"""Manifests: what a name means. `manifests/<name>/<tag>.json` lists a model's layers and its facts.

A manifest is written (atomically) only after all its blobs exist, so an
interrupted pull never shows up in `list`. It is a file users can read and edit,
so reading one checks its shape and names the file when it is damaged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferflux.errors import InferFluxError
from inferflux.files import atomic_write
from inferflux.store.blobs import layers_digest
from inferflux.store.names import ModelNotFoundError, ModelRef, StoreError, first_line

if TYPE_CHECKING:
    from inferflux.formats.describe import ModelFacts

MODEL_ROLE = "model"
FORMATS = ("gguf", "safetensors")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One row of `list()`: what `inferctl list` (and Ollama's /api/tags) shows."""

    name: str  # "name:tag"
    size: int  # bytes, all layers
    format: str  # "gguf" or "safetensors"
    quantization: str | None
    modified: datetime
    architecture: str | None = None
    parameter_size: str | None = None
    digest: str = ""  # sha256 of the layer list: same digest = same model content
    facts: ModelFacts | None = None  # what the model is, recorded at pull (None: its headers were unreadable)


class Manifests:
    """The `manifests/` tree of one store."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, ref: ModelRef) -> Path:
        return self.root.joinpath(*ref.name.split("/"), f"{ref.tag}.json")

    def exists(self, ref: ModelRef) -> bool:
        return self.path(ref).is_file()

    def read(self, ref: ModelRef) -> dict[str, Any]:
        path = self.path(ref)
        if not path.is_file():
            raise ModelNotFoundError(f"model '{ref}' not found; try `inferctl list` or `inferctl pull`")
        return load_manifest(path)

    def write(self, ref: ModelRef, manifest: dict[str, Any]) -> bool:
        """Write atomically, keeping `created` of a name pulled before; True if it replaced other content."""
        path = self.path(ref)
        old = None
        if path.is_file():
            with contextlib.suppress(InferFluxError):
                old = load_manifest(path)
        manifest = {"name": ref.name, "tag": ref.tag, **manifest}
        if old is not None:
            manifest["created"] = old.get("created", manifest["created"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(manifest, indent=2) + "\n")
        return old is not None and layers_digest(old.get("layers", [])) != layers_digest(manifest["layers"])

    def all(self) -> list[tuple[ModelRef, dict[str, Any]]]:
        """Every manifest with its name, sorted by path; temp files (hidden names) are skipped."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.rglob("*.json")):
            rel = path.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            ref = ModelRef("/".join(rel.parts[:-1]), path.stem)
            found.append((ref, load_manifest(path)))
        return found

    def remove(self, ref: ModelRef) -> None:
        """Delete a name's manifest and the folders it leaves empty."""
        path = self.path(ref)
        path.unlink()
        folder = path.parent
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


def new_manifest(fmt: str, layers: list[dict[str, Any]], source: str, facts: dict[str, Any]) -> dict[str, Any]:
    """A manifest's content before `Manifests.write` adds its name (facts are top-level keys)."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {"schema": 1, "format": fmt, "layers": layers, "source": source, "created": now, "modified": now,
            **facts}


def load_manifest(path: Path) -> dict[str, Any]:
    """A manifest file's content, checked enough that the rest of the store can index it safely."""
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
            raise ValueError("unknown format")
        for layer in manifest["layers"]:
            layer["digest"], int(layer["size"]), layer["role"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: damaged store manifest ({first_line(exc)}); remove the file") from None
    return manifest


def entry(ref: ModelRef, manifest: dict[str, Any], facts: ModelFacts | None = None) -> ModelEntry:
    """A manifest as a `list()` row: read from the manifest alone, no model file is opened."""
    return ModelEntry(
        name=str(ref),
        size=sum(int(layer["size"]) for layer in manifest["layers"]),
        format=manifest["format"],
        quantization=facts.quantization if facts else manifest.get("quantization"),
        modified=parse_time(manifest.get("modified")),
        architecture=facts.architecture if facts else manifest.get("architecture"),
        parameter_size=facts.parameter_size if facts else manifest.get("parameter_size"),
        digest=entry_digest(manifest),
        facts=facts,
    )


def merge_overrides(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` over `base`; `parameters` merge key by key (a derived model keeps its parent's other options)."""
    merged = {**base, **new}
    if isinstance(base.get("parameters"), dict) and isinstance(new.get("parameters"), dict):
        merged["parameters"] = {**base["parameters"], **new["parameters"]}
    return merged


def entry_digest(manifest: dict[str, Any]) -> str:
    """The listed digest: the layers', mixed with the overrides when `/api/create` recorded some (as
    Ollama's digest of a derived model differs from its parent's, since it answers differently)."""
    digest = layers_digest(manifest["layers"])
    overrides = manifest.get("overrides")
    if not overrides:
        return digest
    return hashlib.sha256(f"{digest}\0{json.dumps(overrides, sort_keys=True)}".encode()).hexdigest()


def parse_time(text: str | None) -> datetime:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)
