"""`ModelStore`: pull, list, show, path, copy and rm over the blobs and manifests of one store.

Why it is built this way:
- Blobs are written to a temp file in `blobs/` and renamed into place only after
  their hash checks out, and a manifest is written (atomically) only after all
  its blobs exist. An interrupted pull therefore never shows up in `list`, and
  the next pull reuses every blob that completed (after verifying its size and
  hash) and removes the dead process's temp files (their names carry its pid).
- Garbage collection (in `rm`, and after a pull replaced a name) takes the lock
  exclusively; pulls hold it shared from their first blob to their manifest, so
  a blob that is stored but not yet referenced is never collected.
- A safetensors folder is stored file by file under its relative names and
  materialized back as a folder of hard links when something needs a path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferflux.errors import InferFluxError, ModelFormatError
from inferflux.files import TMP_PREFIX, is_abandoned, remove_path
from inferflux.store.blobs import CHUNK_SIZE, Blobs, LayerHook, Progress, folder_complete, layers_digest
from inferflux.store.conversion import check_quantize, convert_to_blob
from inferflux.store.manifests import (
    MODEL_ROLE,
    Manifests,
    ModelEntry,
    entry,
    merge_overrides,
    new_manifest,
)
from inferflux.store.names import ModelNotFoundError, ModelRef, StoreError, looks_like_path, parse_name
from inferflux.store.signing import Verifier, keep_signature, verify_source
from inferflux.store.sources import Source, check_gguf, folder_files, open_source

if TYPE_CHECKING:
    from inferflux.formats.describe import ModelFacts

_LOCK_WAIT_S = 10.0


def open_store(home: str | Path | None = None) -> ModelStore:
    """The store under `home`, or under the configured home ($INFERFLUX_HOME or ~/.inferflux)."""
    if home is None:
        from inferflux.config import Config

        home = Config().home_path
    return ModelStore(Path(home).expanduser())


class ModelStore:
    """Named models under `home/models/`; see the package docstring for the layout and its guarantees."""

    def __init__(self, home: Path, chunk_size: int = CHUNK_SIZE) -> None:
        self.home = Path(home)
        self.root = self.home / "models"
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.folders = self.root / "folders"
        self._blobs = Blobs(self.blobs, self.folders, chunk_size)
        self._manifests = Manifests(self.manifests)

    @property
    def chunk_size(self) -> int:
        return self._blobs.chunk_size

    # ------------------------------------------------------------------ pull

    def pull(self, source: str, name: str | None = None, quantize: str | None = None,
             progress: Progress | None = None, on_layer: LayerHook | None = None,
             verifier: Verifier | None = None) -> str:
        """Store `source` under `name` (default: its stem or Ollama name); return the stored `name:tag`.

        Sources: a GGUF file; a safetensors folder (converted to GGUF when `quantize`
        is given, else stored file by file); `ollama://NAME[:TAG]` from the local
        Ollama store; `hf://ORG/REPO[/FILE]` through huggingface_hub. `on_layer(digest, size)`
        is called as soon as each file's digest is known, before it is verified or copied
        (the HTTP pull reports progress per digest, as Ollama's does). With a `verifier`
        (`security.require_signed_models`), the source must carry a signature by a trusted key
        (store/signing.py); it is kept beside the stored copy and checked again at every load.
        """
        quant = check_quantize(quantize)
        ref = parse_name(name) if name is not None else None
        with self._lock(exclusive=False):
            self._remove_stale_temps()
            src = open_source(str(source), progress, self.home)
            ref = ref or parse_name(src.default_name)
            signature = verify_source(src.path, verifier, quant)
            if src.path.is_file():
                manifest = self._pull_gguf(src, quant, progress, on_layer)
            else:
                manifest = self._pull_folder(src, quant, progress, on_layer)
            if signature is not None:
                keep_signature(self.home, self._stored_path(manifest), signature)
            replaced = self._manifests.write(ref, manifest)
        if replaced:
            self._try_collect_garbage()
        return str(ref)

    def _pull_gguf(self, src: Source, quant: str | None, progress: Progress | None,
                   on_layer: LayerHook | None = None) -> dict[str, Any]:
        if quant is not None:
            raise StoreError(
                f"{src.label}: --quantize converts safetensors folders; this is already a GGUF file"
            )
        check_gguf(src.path)
        facts = _facts(src.path)
        layer = self._blobs.store_file(src.path, src.path.name, progress, src.expected_digest, on_layer)
        return new_manifest("gguf", [dict(layer, role=MODEL_ROLE)], src.label, facts)

    def _pull_folder(self, src: Source, quant: str | None, progress: Progress | None,
                     on_layer: LayerHook | None = None) -> dict[str, Any]:
        from inferflux.formats.hf_folder import is_hf_folder

        if not is_hf_folder(src.path):
            raise StoreError(f"{src.label}: not a model folder (no config.json)")
        if quant is not None:
            layer = convert_to_blob(self._blobs, src.path, quant, progress, on_layer)
            facts = _facts(self._blobs.path(layer["digest"]))
            return new_manifest("gguf", [dict(layer, role=MODEL_ROLE)], src.label, facts)
        facts = _facts(src.path)
        layers = [dict(self._blobs.store_file(path, rel, progress, on_layer=on_layer), role=rel)
                  for rel, path in folder_files(src.path)]
        return new_manifest("safetensors", layers, src.label, facts)

    def _stored_path(self, manifest: dict[str, Any]) -> Path:
        """The blob (GGUF) or folder a manifest's model is read from (`path` without materializing it)."""
        if manifest["format"] == "gguf":
            layer = next(layer for layer in manifest["layers"] if layer.get("role") == MODEL_ROLE)
            return self._blobs.path(layer["digest"])
        return self.folders / layers_digest(manifest["layers"])

    def _remove_stale_temps(self) -> None:
        """Delete temp files and folders left by pulls whose process is gone."""
        candidates = []
        for folder in (self.blobs, self.folders):
            if folder.is_dir():
                candidates += [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
        if self.manifests.is_dir():
            candidates += list(self.manifests.rglob(f"{TMP_PREFIX}*"))
        for path in candidates:
            if is_abandoned(path):
                remove_path(path)

    # ------------------------------------------------------------ read side

    def list(self) -> list[ModelEntry]:
        """Every stored model, sorted by name; read from the manifests alone (a manifest written before
        facts were recorded gets them computed and written back once, see `facts`)."""
        from inferflux.formats.describe import ModelFacts

        entries = []
        for ref, manifest in self._manifests.all():
            facts = ModelFacts.from_dict(manifest.get("facts")) or self._computed_facts(ref, manifest)
            entries.append(entry(ref, manifest, facts))
        return sorted(entries, key=lambda e: e.name)

    def facts(self, name: str) -> ModelFacts | None:
        """What a stored model is (kind, format, context, template, capabilities), from its manifest.

        None only for a model whose headers cannot be read (it was stored anyway). Facts missing
        from an older manifest are computed from the model's headers and recorded in it.
        """
        from inferflux.formats.describe import ModelFacts

        ref = self._lookup(str(name))
        manifest = self._manifests.read(ref)
        return ModelFacts.from_dict(manifest.get("facts")) or self._computed_facts(ref, manifest)

    def _computed_facts(self, ref: ModelRef, manifest: dict[str, Any]) -> ModelFacts | None:
        """Facts read from the model's headers, written into its manifest if no pull or rm is running
        (and the name still means the same layers), so the next listing reads no model file."""
        from inferflux.formats.describe import model_facts

        try:
            facts = model_facts(self.path(str(ref)))
        except InferFluxError:  # unreadable or missing blob: list it with what the manifest says
            return None
        with contextlib.suppress(StoreError, OSError), self._lock(exclusive=True, wait_s=0):  # OSError: read-only
            current = self._manifests.read(ref)
            if layers_digest(current["layers"]) == layers_digest(manifest["layers"]):
                self._manifests.write(ref, {**current, "facts": facts.to_dict()})
        return facts

    def show(self, name: str) -> dict[str, Any]:
        """`describe_model` of the stored model, plus the store's fields (name, source, dates, digest, blobs)."""
        from inferflux.formats.describe import describe_model

        ref = self._lookup(str(name))
        manifest = self._manifests.read(ref)
        path = self.path(str(ref))
        try:
            info = describe_model(path)
        except ModelFormatError as exc:  # e.g. an embedding model describe_model does not cover
            info = {"path": str(path), "format": manifest["format"], "architecture": manifest.get("architecture"),
                    "parameters": manifest.get("parameters"), "quantization": manifest.get("quantization"),
                    "size_bytes": sum(int(layer["size"]) for layer in manifest["layers"]),
                    "note": exc.reason}
        return {
            **info,
            "name": str(ref),
            "source": manifest.get("source"),
            "created": manifest.get("created"),
            "modified": manifest.get("modified"),
            "digest": layers_digest(manifest["layers"]),
            "blobs": manifest["layers"],  # not "layers": describe_model's "layers" is the layer count
        }

    def has(self, name: str) -> bool:
        """Whether `name[:tag]` is a stored model (its manifest exists; not checked for damage)."""
        try:
            return self._manifests.exists(parse_name(name))
        except StoreError:
            return False

    def path(self, name: str) -> Path:
        """Where the runtime can read the model: the GGUF blob, or the materialized folder."""
        ref = parse_name(name)
        manifest = self._manifests.read(ref)
        if manifest["format"] == "gguf":
            layer = next((layer for layer in manifest["layers"] if layer.get("role") == MODEL_ROLE), None)
            if layer is None:
                raise StoreError(f"model '{ref}': manifest has no model layer; pull it again")
            return self._blobs.checked(str(ref), layer)
        folder = self.folders / layers_digest(manifest["layers"])
        if folder_complete(folder, manifest["layers"]):
            return folder
        with self._lock(exclusive=False):
            return self._blobs.materialize(str(ref), manifest["layers"])

    def resolve(self, name_or_path: str) -> Path:
        """An existing file or folder as is; otherwise the path of a stored model by that name."""
        path = Path(str(name_or_path)).expanduser()
        if path.exists():
            return path
        return self.path(str(self._lookup(str(name_or_path))))

    def _lookup(self, text: str) -> ModelRef:
        """A stored model's ref; what the user most likely meant when it is not one (a path, or a name)."""
        try:
            ref = parse_name(text)
        except StoreError:
            raise ModelNotFoundError(f"{text}: no such model file or folder") from None
        if not self._manifests.exists(ref):
            if looks_like_path(text):
                raise ModelNotFoundError(f"{text}: no such model file or folder")
            raise ModelNotFoundError(f"model '{ref}' not found; try `inferctl list` or `inferctl pull`")
        return ref

    # ----------------------------------------------------------------- copy

    def copy(self, source: str, destination: str, overrides: dict[str, Any] | None = None) -> str:
        """Give a stored model a second name (`ollama cp`): a new manifest, the same blobs. Returns it.

        `overrides` (what Ollama's `/api/create` sets over an existing model: `system`, `template`,
        `parameters`, `license`) are recorded in the new manifest on top of the source's own, so a
        model made from a made model inherits what that one set; the blobs stay shared.
        """
        src = self._lookup(str(source))
        dst = parse_name(destination)
        with self._lock(exclusive=False):
            manifest = self._manifests.read(src)
            manifest = {k: v for k, v in manifest.items() if k not in ("name", "tag")}
            manifest["modified"] = datetime.now(UTC).isoformat(timespec="seconds")
            if overrides:
                manifest["overrides"] = merge_overrides(manifest.get("overrides") or {}, overrides)
            replaced = self._manifests.write(dst, manifest)
        if replaced:
            self._try_collect_garbage()
        return str(dst)

    def overrides(self, name: str) -> dict[str, Any]:
        """What `/api/create` recorded for a stored name: {} for a pulled model or an unknown name."""
        try:
            manifest = self._manifests.read(parse_name(name))
        except StoreError:
            return {}
        found = manifest.get("overrides")
        return dict(found) if isinstance(found, dict) else {}

    # ------------------------------------------------------------------- rm

    def rm(self, name: str) -> int:
        """Remove a name; delete blobs and folders no other manifest references. Returns bytes freed."""
        ref = parse_name(name)
        if not self._manifests.exists(ref):
            raise ModelNotFoundError(f"model '{ref}' not found; try `inferctl list`")
        with self._lock(exclusive=True, wait_s=_LOCK_WAIT_S):
            self._manifests.remove(ref)
            return self._collect_garbage()

    def _try_collect_garbage(self) -> None:
        """After a pull replaced a name: collect its old blobs now if no other pull is running."""
        with contextlib.suppress(StoreError), self._lock(exclusive=True, wait_s=0):
            self._collect_garbage()

    def _collect_garbage(self) -> int:
        """Delete unreferenced blobs and folders. Caller holds the lock exclusively (no pull in flight)."""
        manifests = [m for _, m in self._manifests.all()]
        blobs = {self._blobs.path(layer["digest"]).name for m in manifests for layer in m["layers"]}
        folders = {layers_digest(m["layers"]) for m in manifests if m["format"] == "safetensors"}
        freed = 0
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                if blob.name.startswith("sha256-") and blob.name not in blobs:
                    freed += blob.stat().st_size
                    blob.unlink()
        if self.folders.is_dir():
            for folder in self.folders.iterdir():
                if not folder.name.startswith(TMP_PREFIX) and folder.name not in folders:
                    remove_path(folder)
        self._remove_stale_temps()
        return freed

    @contextlib.contextmanager
    def _lock(self, exclusive: bool, wait_s: float | None = None) -> Iterator[None]:
        """flock on `models/.lock`: shared for pulls, exclusive for garbage collection.

        `wait_s=None` blocks; otherwise give up after that long with a clear error.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        with open(self.root / ".lock", "a+") as handle:
            deadline = None if wait_s is None else time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(handle, mode | (0 if deadline is None else fcntl.LOCK_NB))
                    break
                except OSError as exc:
                    if deadline is None or exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise StoreError(
                            f"{self.root}: the model store is busy (a pull is running); try again when it ends"
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _facts(path: Path) -> dict[str, Any]:
    """The manifest's facts: `ModelFacts` under "facts" (what every listing reads), plus the top-level
    architecture/parameters/quantization that manifests carried before facts existed (older readers)."""
    from inferflux.formats.describe import model_facts

    try:
        facts = model_facts(path)
    except ModelFormatError:  # a model describe_model cannot read can still be stored, with no facts
        return {"architecture": None, "parameters": None, "parameter_size": None, "quantization": None}
    return {"architecture": facts.architecture, "parameters": facts.parameters,
            "parameter_size": facts.parameter_size, "quantization": facts.quantization, "facts": facts.to_dict()}
