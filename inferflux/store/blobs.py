"""Content-addressed files: `blobs/sha256-<hex>`, and safetensors folders materialized from them.

A blob's name is the hash of its bytes, so the same file pulled twice (or
under two names) is stored once, and a blob is trusted only when its size and
hash both match its name. Bytes reach a blob name only through
`inferflux.files` (temp file, fsync, rename), after their hash checked out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inferflux.files import publish, publish_folder, temp_path
from inferflux.store.names import StoreError

# progress(label, done, total, unit): unit is "B" for bytes hashed or copied, "tensors" for conversion.
Progress = Callable[[str, int, int, str], None]
# on_layer("sha256:<hex>", size): a file's digest is known (it is verified or copied next).
LayerHook = Callable[[str, int], None]

CHUNK_SIZE = 8 << 20


class Blobs:
    """The `blobs/` and `folders/` directories of one store."""

    def __init__(self, blobs: Path, folders: Path, chunk_size: int = CHUNK_SIZE) -> None:
        self.root = blobs
        self.folders = folders
        self.chunk_size = max(1, int(chunk_size))

    def path(self, digest: str) -> Path:
        """Where the blob of `sha256:<hex>` lives; a clear error for a digest a manifest should not hold."""
        algo, _, hex_ = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hex_):
            raise StoreError(f"bad layer digest {digest!r} in a manifest")
        return self.root / f"sha256-{hex_}"

    def checked(self, model: str, layer: dict[str, Any]) -> Path:
        """A layer's blob, after a cheap check that it is there at its recorded size."""
        blob = self.path(layer["digest"])
        if not blob.is_file() or blob.stat().st_size != int(layer["size"]):
            raise StoreError(f"model '{model}': blob {blob.name} is missing or damaged; pull the model again")
        return blob

    def store_file(self, path: Path, label: str, progress: Progress | None,
                   expected_hex: str | None = None, on_layer: LayerHook | None = None) -> dict[str, Any]:
        """Put one file's bytes in `blobs/`, unless a verified blob with its digest is already there.

        The file is hashed before it is copied (as `ollama create` does), so a model
        already in the store costs no copy and no temporary disk space.
        """
        size = path.stat().st_size
        digest_hex = expected_hex or hash_file(path, self.chunk_size, f"hashing {label}", progress)
        if on_layer is not None:
            on_layer(f"sha256:{digest_hex}", size)
        if not self.is_valid(digest_hex, size, label, progress):
            self._copy_in(path, digest_hex, size, label, progress)
        return {"digest": f"sha256:{digest_hex}", "size": size}

    def adopt(self, tmp: Path, label: str, progress: Progress | None,
              on_layer: LayerHook | None = None) -> dict[str, Any]:
        """Make a finished temp file in `blobs/` (a conversion's output) a blob by renaming it (no copy)."""
        size = tmp.stat().st_size
        digest_hex = hash_file(tmp, self.chunk_size, f"hashing {label}", progress)
        if on_layer is not None:
            on_layer(f"sha256:{digest_hex}", size)
        if not self.is_valid(digest_hex, size, label, progress):
            publish(tmp, self.root / f"sha256-{digest_hex}")
        return {"digest": f"sha256:{digest_hex}", "size": size}

    def is_valid(self, digest_hex: str, size: int, label: str, progress: Progress | None) -> bool:
        """An existing blob is trusted only when its size and hash both match its name."""
        blob = self.root / f"sha256-{digest_hex}"
        if not blob.is_file() or blob.stat().st_size != size:
            return False
        return hash_file(blob, self.chunk_size, f"verifying {label}", progress) == digest_hex

    def _copy_in(self, path: Path, digest_hex: str, size: int, label: str, progress: Progress | None) -> None:
        """Stream `path` into a temp file while hashing it; publish it only if the hash is the expected one."""
        with temp_path(self.root) as tmp:
            hasher, done = hashlib.sha256(), 0
            with open(path, "rb") as reader, open(tmp, "wb") as writer:
                while chunk := reader.read(self.chunk_size):
                    writer.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(f"copying {label}", done, size, "B")
            if hasher.hexdigest() != digest_hex:
                raise StoreError(
                    f"{path}: content does not match its digest sha256:{digest_hex} "
                    "(the file changed while it was copied, or its source store is damaged)"
                )
            publish(tmp, self.root / f"sha256-{digest_hex}")

    def materialize(self, model: str, layers: list[dict[str, Any]]) -> Path:
        """`folders/<layers digest>/` with every layer at its relative name (hard links to the blobs);
        rebuilt when missing or incomplete. The caller holds the store lock shared."""
        final = self.folders / layers_digest(layers)
        if folder_complete(final, layers):
            return final
        blobs = [(safe_relative(layer["role"]), self.checked(model, layer)) for layer in layers]
        with temp_path(self.folders, folder=True) as tmp:
            for rel, blob in blobs:
                _link_or_copy(blob, tmp / rel)
            if final.exists() and not folder_complete(final, layers):
                shutil.rmtree(final)
            publish_folder(tmp, final)
        if not folder_complete(final, layers):
            raise StoreError(f"model '{model}': could not materialize {final}")
        return final


def layers_digest(layers: list[dict[str, Any]]) -> str:
    """sha256 of the (role, digest) list: the identity of a model's content, whatever its name."""
    canonical = json.dumps(sorted((str(layer["role"]), str(layer["digest"])) for layer in layers),
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def hash_file(path: Path, chunk_size: int, label: str, progress: Progress | None) -> str:
    """sha256 hex of a file, read in chunks (models are larger than memory), reporting progress."""
    hasher, done, total = hashlib.sha256(), 0, path.stat().st_size
    with open(path, "rb") as reader:
        while chunk := reader.read(chunk_size):
            hasher.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(label, done, total, "B")
    return hasher.hexdigest()


def safe_relative(role: str) -> Path:
    """A layer role as a relative path that stays inside the folder (manifests are files users can edit)."""
    rel = Path(role)
    if rel.is_absolute() or not rel.parts or any(part in ("", ".", "..") for part in rel.parts):
        raise StoreError(f"unsafe file name {role!r} in a store manifest")
    return rel


def folder_complete(folder: Path, layers: list[dict[str, Any]]) -> bool:
    """Whether a materialized folder has every layer at its recorded size."""
    try:
        return folder.is_dir() and all(
            (folder / layer["role"]).stat().st_size == int(layer["size"]) for layer in layers
        )
    except OSError:
        return False


def _link_or_copy(blob: Path, dest: Path) -> None:
    """Hard link (no extra disk); copy where the filesystem cannot link."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)
