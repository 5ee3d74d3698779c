"""The local model store: `inferctl pull NAME`, then serve or show the model by that name.

Layout under `home/models/` (Ollama-like, so the idea carries over):

    blobs/sha256-<hex>                   content-addressed files; the same bytes are stored once
    manifests/<name>/<tag>.json          what a name means: format, layers (digest, size, role), facts
    folders/<layers-digest>/             a safetensors model materialized as a folder (hard links to blobs)
    .lock                                shared by pulls, exclusive for garbage collection

Why it is built this way:
- Blobs are written to a temp file in `blobs/` and renamed into place only after
  their hash checks out, and a manifest is written (atomically) only after all
  its blobs exist. An interrupted pull therefore never shows up in `list`, and
  the next pull reuses every blob that completed (after verifying its size and
  hash) and removes the dead process's temp files (their names carry its pid).
- A local file is hashed before it is copied (as `ollama create` does), so a
  model already in the store costs no copy and no temporary disk space.
- Garbage collection (in `rm`, and after a pull replaced a name) takes the lock
  exclusively; pulls hold it shared from their first blob to their manifest, so
  a blob that is stored but not yet referenced is never collected.
- A safetensors folder is stored file by file under its relative names and
  materialized back as a folder of hard links when something needs a path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inferflux.errors import InferFluxError, ModelFormatError

# progress(label, done, total, unit): unit is "B" for bytes hashed or copied, "tensors" for conversion.
Progress = Callable[[str, int, int, str], None]
# on_layer("sha256:<hex>", size): a file's digest is known (it is verified or copied next).
LayerHook = Callable[[str, int], None]

DEFAULT_TAG = "latest"
CHUNK_SIZE = 8 << 20
QUANTIZE_TYPES = ("Q4_K", "Q6_K", "Q8_0", "F16", "F32", "BF16", "Q4_0")
MODEL_ROLE = "model"
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
# Files of a Hugging Face download we fetch; other weight formats duplicate the safetensors.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.md"]
DUPLICATE_WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".ot", ".gguf"}

_COMPONENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_MAX_NAME = 200
_MAX_TAG = 128
_TMP_PREFIX = ".tmp-"
_LOCK_WAIT_S = 10.0
# Temp files are created 0600; stored files are readable like any file a user saves (shared stores).
_FILE_MODE = 0o644
_DIR_MODE = 0o755


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


def open_store(home: str | Path | None = None) -> ModelStore:
    """The store under `home`, or under the configured home ($INFERFLUX_HOME or ~/.inferflux)."""
    if home is None:
        from inferflux.config import Config

        home = Config().home_path
    return ModelStore(Path(home).expanduser())


@dataclasses.dataclass
class _Source:
    """What a source string turned into: a local file or folder, plus how to name and record it."""

    path: Path
    default_name: str
    label: str  # recorded as the manifest's "source"
    expected_digest: str | None = None  # hex, when the source already names its content (Ollama)


class ModelStore:
    """Named models under `home/models/`; see the module docstring for the layout and its guarantees."""

    def __init__(self, home: Path, chunk_size: int = CHUNK_SIZE) -> None:
        self.home = Path(home)
        self.root = self.home / "models"
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.folders = self.root / "folders"
        self.chunk_size = max(1, int(chunk_size))

    # ------------------------------------------------------------------ pull

    def pull(self, source: str, name: str | None = None, quantize: str | None = None,
             progress: Progress | None = None, on_layer: LayerHook | None = None) -> str:
        """Store `source` under `name` (default: its stem or Ollama name); return the stored `name:tag`.

        Sources: a GGUF file; a safetensors folder (converted to GGUF when `quantize`
        is given, else stored file by file); `ollama://NAME[:TAG]` from the local
        Ollama store; `hf://ORG/REPO[/FILE]` through huggingface_hub. `on_layer(digest, size)`
        is called as soon as each file's digest is known, before it is verified or copied
        (the HTTP pull reports progress per digest, as Ollama's does).
        """
        quant = _check_quantize(quantize)
        ref = parse_name(name) if name is not None else None
        with self._lock(exclusive=False):
            self._remove_stale_temps()
            src = self._open_source(str(source), progress)
            ref = ref or parse_name(src.default_name)
            if src.path.is_file():
                manifest = self._pull_gguf(src, quant, progress, on_layer)
            else:
                manifest = self._pull_folder(src, quant, progress, on_layer)
            replaced = self._write_manifest(ref, manifest)
        if replaced:
            self._try_collect_garbage()
        return str(ref)

    def _open_source(self, source: str, progress: Progress | None) -> _Source:
        if source.startswith("ollama://"):
            return _ollama_source(source[len("ollama://"):])
        if source.startswith("hf://"):
            return _hf_source(source[len("hf://"):], progress)
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source):
            raise StoreError(f"{source}: unsupported source; use a local path, ollama://NAME:TAG or hf://ORG/REPO")
        path = Path(source).expanduser()
        if not path.exists():
            raise StoreError(f"{source}: no such file or folder")
        stem = path.stem if path.is_file() else path.name
        if stem in ("", ".", ".."):
            stem = path.resolve().name
        return _Source(path.resolve(), default_name(stem), str(path.resolve()))

    def _pull_gguf(self, src: _Source, quant: str | None, progress: Progress | None,
                   on_layer: LayerHook | None = None) -> dict[str, Any]:
        if quant is not None:
            raise StoreError(
                f"{src.label}: --quantize converts safetensors folders; this is already a GGUF file"
            )
        _check_gguf(src.path)
        facts = _facts(src.path)
        layer = self._store_file(src.path, src.path.name, progress, src.expected_digest, on_layer)
        return _manifest("gguf", [dict(layer, role=MODEL_ROLE)], src.label, facts)

    def _pull_folder(self, src: _Source, quant: str | None, progress: Progress | None,
                     on_layer: LayerHook | None = None) -> dict[str, Any]:
        from inferflux.formats.hf_folder import is_hf_folder

        if not is_hf_folder(src.path):
            raise StoreError(f"{src.label}: not a model folder (no config.json)")
        if quant is not None:
            layer = self._store_converted(src.path, quant, progress, on_layer)
            facts = _facts(self._blob_path(layer["digest"]))
            return _manifest("gguf", [dict(layer, role=MODEL_ROLE)], src.label, facts)
        facts = _facts(src.path)
        layers = [dict(self._store_file(path, rel, progress, on_layer=on_layer), role=rel)
                  for rel, path in _folder_files(src.path)]
        return _manifest("safetensors", layers, src.label, facts)

    # ----------------------------------------------------------------- blobs

    def _store_file(self, path: Path, label: str, progress: Progress | None,
                    expected_hex: str | None = None, on_layer: LayerHook | None = None) -> dict[str, Any]:
        """Put one file's bytes in `blobs/`, unless a verified blob with its digest is already there."""
        size = path.stat().st_size
        digest_hex = expected_hex or _hash_file(path, self.chunk_size, f"hashing {label}", progress)
        if on_layer is not None:
            on_layer(f"sha256:{digest_hex}", size)
        if not self._blob_is_valid(digest_hex, size, label, progress):
            self._copy_into_blob(path, digest_hex, size, label, progress)
        return {"digest": f"sha256:{digest_hex}", "size": size}

    def _blob_is_valid(self, digest_hex: str, size: int, label: str, progress: Progress | None) -> bool:
        """An existing blob is trusted only when its size and hash both match its name."""
        blob = self.blobs / f"sha256-{digest_hex}"
        if not blob.is_file() or blob.stat().st_size != size:
            return False
        return _hash_file(blob, self.chunk_size, f"verifying {label}", progress) == digest_hex

    def _copy_into_blob(self, path: Path, digest_hex: str, size: int, label: str,
                        progress: Progress | None) -> None:
        """Stream `path` into a temp file while hashing it, then rename it onto its blob name."""
        with self._temp_file() as tmp:
            hasher, done = hashlib.sha256(), 0
            with open(path, "rb") as reader, open(tmp, "wb") as writer:
                while chunk := reader.read(self.chunk_size):
                    writer.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(f"copying {label}", done, size, "B")
                writer.flush()
                os.fsync(writer.fileno())
            os.chmod(tmp, _FILE_MODE)
            if hasher.hexdigest() != digest_hex:
                raise StoreError(
                    f"{path}: content does not match its digest sha256:{digest_hex} "
                    "(the file changed while it was copied, or its source store is damaged)"
                )
            os.replace(tmp, self.blobs / f"sha256-{digest_hex}")

    def _store_converted(self, folder: Path, quant: str, progress: Progress | None,
                         on_layer: LayerHook | None = None) -> dict[str, Any]:
        """Convert into a temp file beside the blobs, then rename it into place (no copy)."""
        from convert.hf_to_gguf import convert_hf_to_gguf

        def on_tensor(_tensor: str, done: int, total: int) -> None:
            if progress is not None:
                progress(f"converting to {quant}", done, total, "tensors")

        with self._temp_file(suffix=".gguf") as tmp:
            convert_hf_to_gguf(folder, tmp, quant, progress=on_tensor)
            size = tmp.stat().st_size
            digest_hex = _hash_file(tmp, self.chunk_size, f"hashing {quant} GGUF", progress)
            if on_layer is not None:
                on_layer(f"sha256:{digest_hex}", size)
            if not self._blob_is_valid(digest_hex, size, f"{quant} GGUF", progress):
                os.chmod(tmp, _FILE_MODE)
                os.replace(tmp, self.blobs / f"sha256-{digest_hex}")
        return {"digest": f"sha256:{digest_hex}", "size": size}

    @contextlib.contextmanager
    def _temp_file(self, suffix: str = "") -> Iterator[Path]:
        """A temp path in `blobs/` named with our pid (so a later pull can tell it is abandoned)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.blobs, prefix=f"{_TMP_PREFIX}{os.getpid()}-", suffix=suffix)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)
            Path(name + ".partial").unlink(missing_ok=True)  # the converter's own temp name

    def _blob_path(self, digest: str) -> Path:
        algo, _, hex_ = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hex_):
            raise StoreError(f"bad layer digest {digest!r} in a manifest")
        return self.blobs / f"sha256-{hex_}"

    def _remove_stale_temps(self) -> None:
        """Delete temp files and folders left by pulls whose process is gone."""
        candidates = []
        for folder in (self.blobs, self.folders):
            if folder.is_dir():
                candidates += [p for p in folder.iterdir() if p.name.startswith(_TMP_PREFIX)]
        if self.manifests.is_dir():
            candidates += [p for p in self.manifests.rglob(f"{_TMP_PREFIX}*")]
        for path in candidates:
            pid = path.name[len(_TMP_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove_path(path)

    # ------------------------------------------------------------- manifests

    def _manifest_path(self, ref: ModelRef) -> Path:
        return self.manifests.joinpath(*ref.name.split("/"), f"{ref.tag}.json")

    def _read_manifest(self, ref: ModelRef) -> dict[str, Any]:
        path = self._manifest_path(ref)
        if not path.is_file():
            raise ModelNotFoundError(f"model '{ref}' not found; try `inferctl list` or `inferctl pull`")
        return _load_manifest(path)

    def _write_manifest(self, ref: ModelRef, manifest: dict[str, Any]) -> bool:
        """Write atomically, keeping `created` of a name pulled before; True if it replaced other content."""
        path = self._manifest_path(ref)
        old = None
        if path.is_file():
            with contextlib.suppress(InferFluxError):
                old = _load_manifest(path)
        manifest = {"name": ref.name, "tag": ref.tag, **manifest}
        if old is not None:
            manifest["created"] = old.get("created", manifest["created"])
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
        return old is not None and _layers_digest(old.get("layers", [])) != _layers_digest(manifest["layers"])

    def _all_manifests(self) -> list[tuple[ModelRef, dict[str, Any]]]:
        if not self.manifests.is_dir():
            return []
        found = []
        for path in sorted(self.manifests.rglob("*.json")):
            rel = path.relative_to(self.manifests)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            ref = ModelRef("/".join(rel.parts[:-1]), path.stem)
            found.append((ref, _load_manifest(path)))
        return found

    # ------------------------------------------------------------ read side

    def list(self) -> list[ModelEntry]:
        """Every stored model, sorted by name."""
        entries = []
        for ref, manifest in self._all_manifests():
            entries.append(ModelEntry(
                name=str(ref),
                size=sum(int(layer["size"]) for layer in manifest["layers"]),
                format=manifest["format"],
                quantization=manifest.get("quantization"),
                modified=_parse_time(manifest.get("modified")),
                architecture=manifest.get("architecture"),
                parameter_size=manifest.get("parameter_size"),
                digest=_entry_digest(manifest),
            ))
        return sorted(entries, key=lambda e: e.name)

    def show(self, name: str) -> dict[str, Any]:
        """`describe_model` of the stored model, plus the store's fields (name, source, dates, digest, blobs)."""
        from inferflux.formats.describe import describe_model

        ref = self._lookup(str(name))
        manifest = self._read_manifest(ref)
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
            "digest": _layers_digest(manifest["layers"]),
            "blobs": manifest["layers"],  # not "layers": describe_model's "layers" is the layer count
        }

    def has(self, name: str) -> bool:
        """Whether `name[:tag]` is a stored model (its manifest exists; not checked for damage)."""
        try:
            return self._manifest_path(parse_name(name)).is_file()
        except StoreError:
            return False

    def path(self, name: str) -> Path:
        """Where the runtime can read the model: the GGUF blob, or the materialized folder."""
        ref = parse_name(name)
        manifest = self._read_manifest(ref)
        if manifest["format"] == "gguf":
            layer = next((layer for layer in manifest["layers"] if layer.get("role") == MODEL_ROLE), None)
            if layer is None:
                raise StoreError(f"model '{ref}': manifest has no model layer; pull it again")
            return self._checked_blob(ref, layer)
        return self._materialize(ref, manifest["layers"])

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
        if not self._manifest_path(ref).is_file():
            if _looks_like_path(text):
                raise ModelNotFoundError(f"{text}: no such model file or folder")
            raise ModelNotFoundError(f"model '{ref}' not found; try `inferctl list` or `inferctl pull`")
        return ref

    def _checked_blob(self, ref: ModelRef, layer: dict[str, Any]) -> Path:
        blob = self._blob_path(layer["digest"])
        if not blob.is_file() or blob.stat().st_size != int(layer["size"]):
            raise StoreError(f"model '{ref}': blob {blob.name} is missing or damaged; pull the model again")
        return blob

    def _materialize(self, ref: ModelRef, layers: list[dict[str, Any]]) -> Path:
        """`folders/<digest>/` with every layer at its relative name; rebuilt if missing or incomplete."""
        final = self.folders / _layers_digest(layers)
        if _folder_complete(final, layers):
            return final
        blobs = [(_safe_relative(layer["role"]), self._checked_blob(ref, layer)) for layer in layers]
        with self._lock(exclusive=False):
            self.folders.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.folders, prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
            try:
                os.chmod(tmp, _DIR_MODE)
                for rel, blob in blobs:
                    _link_or_copy(blob, tmp / rel)
                if final.exists() and not _folder_complete(final, layers):
                    shutil.rmtree(final)
                with contextlib.suppress(OSError):
                    os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        if not _folder_complete(final, layers):
            raise StoreError(f"model '{ref}': could not materialize {final}")
        return final

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
            manifest = self._read_manifest(src)
            manifest = {k: v for k, v in manifest.items() if k not in ("name", "tag")}
            manifest["modified"] = datetime.now(UTC).isoformat(timespec="seconds")
            if overrides:
                manifest["overrides"] = merge_overrides(manifest.get("overrides") or {}, overrides)
            replaced = self._write_manifest(dst, manifest)
        if replaced:
            self._try_collect_garbage()
        return str(dst)

    def overrides(self, name: str) -> dict[str, Any]:
        """What `/api/create` recorded for a stored name: {} for a pulled model or an unknown name."""
        try:
            manifest = self._read_manifest(parse_name(name))
        except StoreError:
            return {}
        found = manifest.get("overrides")
        return dict(found) if isinstance(found, dict) else {}

    # ------------------------------------------------------------------- rm

    def rm(self, name: str) -> int:
        """Remove a name; delete blobs and folders no other manifest references. Returns bytes freed."""
        ref = parse_name(name)
        path = self._manifest_path(ref)
        if not path.is_file():
            raise ModelNotFoundError(f"model '{ref}' not found; try `inferctl list`")
        with self._lock(exclusive=True, wait_s=_LOCK_WAIT_S):
            path.unlink()
            _remove_empty_parents(path.parent, self.manifests)
            return self._collect_garbage()

    def _try_collect_garbage(self) -> None:
        """After a pull replaced a name: collect its old blobs now if no other pull is running."""
        with contextlib.suppress(StoreError), self._lock(exclusive=True, wait_s=0):
            self._collect_garbage()

    def _collect_garbage(self) -> int:
        """Delete unreferenced blobs and folders. Caller holds the lock exclusively (no pull in flight)."""
        manifests = [m for _, m in self._all_manifests()]
        blobs = {self._blob_path(layer["digest"]).name for m in manifests for layer in m["layers"]}
        folders = {_layers_digest(m["layers"]) for m in manifests if m["format"] == "safetensors"}
        freed = 0
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                if blob.name.startswith("sha256-") and blob.name not in blobs:
                    freed += blob.stat().st_size
                    blob.unlink()
        if self.folders.is_dir():
            for folder in self.folders.iterdir():
                if not folder.name.startswith(_TMP_PREFIX) and folder.name not in folders:
                    _remove_path(folder)
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


# ---------------------------------------------------------------- sources


def ollama_store_has(name: str) -> bool:
    """Whether the local Ollama store ($OLLAMA_MODELS or ~/.ollama/models) has a manifest for NAME[:TAG]."""
    try:
        return _ollama_manifest_path(parse_name(name))[1].is_file()
    except StoreError:
        return False


def _ollama_manifest_path(ref: ModelRef) -> tuple[Path, Path]:
    """(the Ollama store's root, where NAME:TAG's manifest is in it): `llama3` is registry.ollama.ai/library/."""
    root = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()
    parts = ref.name.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    return root, root.joinpath("manifests", *parts, ref.tag)


def _ollama_source(ref_text: str) -> _Source:
    """`NAME[:TAG]` in the local Ollama store ($OLLAMA_MODELS or ~/.ollama/models) -> its GGUF blob."""
    ref = parse_name(ref_text)
    root, manifest_path = _ollama_manifest_path(ref)
    label = f"ollama://{ref}"
    if not manifest_path.is_file():
        raise StoreError(f"{label}: not in the Ollama store at {root} (no {manifest_path})")
    try:
        manifest = json.loads(manifest_path.read_text())
        layers = manifest["layers"]
        layer = next(lay for lay in layers if lay.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE)
        algo, _, digest_hex = layer["digest"].partition(":")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise StoreError(f"{manifest_path}: not an Ollama manifest with a model layer") from None
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", digest_hex):
        raise StoreError(f"{manifest_path}: unexpected layer digest {layer['digest']!r}")
    blob = root / "blobs" / f"sha256-{digest_hex}"
    if not blob.is_file():
        raise StoreError(f"{label}: blob {blob} is missing from the Ollama store")
    return _Source(blob, str(ref) if ref.tag != DEFAULT_TAG else ref.name, label, expected_digest=digest_hex)


def _hf_source(spec: str, progress: Progress | None) -> _Source:
    """`ORG/REPO[/FILE]` fetched through huggingface_hub (its cache, resume and auth); any failure is one line."""
    parts = [p for p in spec.strip("/").split("/") if p]
    label = f"hf://{spec}"
    if len(parts) < 2:
        raise StoreError(f"{label}: expected hf://ORG/REPO or hf://ORG/REPO/FILE")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        import huggingface_hub
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )
    except ImportError:
        raise StoreError(f"{label}: needs the huggingface_hub package (pip install huggingface_hub)") from None
    quiet = progress is None and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        if filename:
            path = Path(huggingface_hub.hf_hub_download(repo_id, filename))
        else:
            path = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HF_ALLOW_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types (HTTP, offline, auth, not found)
        raise StoreError(f"{label}: download failed: {_first_line(exc)}{_offline_hint()}") from None
    finally:
        if quiet:
            enable_progress_bars()
    stem = Path(filename).stem if filename else parts[1]
    return _Source(path, default_name(stem), label)


def _offline_hint() -> str:
    return " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
        else ""


# ------------------------------------------------------------------ helpers


def _check_quantize(quantize: str | None) -> str | None:
    if quantize is None:
        return None
    key = str(quantize).upper()
    if key not in QUANTIZE_TYPES:
        raise StoreError(f"unsupported quantization {quantize!r}; choose one of {', '.join(QUANTIZE_TYPES)}")
    return key


def _check_gguf(path: Path) -> None:
    """Refuse what is not a readable GGUF before copying a byte of it."""
    from inferflux.formats.gguf_file import GGUFFile

    GGUFFile(path)


def _facts(path: Path) -> dict[str, Any]:
    """Architecture, parameters and quantization for the manifest; best effort for models
    `describe_model` does not cover (e.g. BERT embedding models), so they can still be stored."""
    from inferflux.formats.describe import describe_model

    try:
        info = describe_model(path)
    except ModelFormatError:
        return {"architecture": _raw_architecture(path), "parameters": None, "parameter_size": None,
                "quantization": None}
    return {key: info[key] for key in ("architecture", "parameters", "parameter_size", "quantization")}


def _raw_architecture(path: Path) -> str | None:
    try:
        if path.is_file():
            from inferflux.formats.gguf_file import GGUFFile

            return GGUFFile(path).metadata.get("general.architecture")
        config = json.loads((path / "config.json").read_text())
        return (config.get("architectures") or [None])[0] or config.get("model_type")
    except (InferFluxError, OSError, ValueError, AttributeError):
        return None


def _manifest(fmt: str, layers: list[dict[str, Any]], source: str, facts: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {"schema": 1, "format": fmt, "layers": layers, "source": source, "created": now, "modified": now,
            **facts}


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") not in ("gguf", "safetensors"):
            raise ValueError("unknown format")
        for layer in manifest["layers"]:
            layer["digest"], int(layer["size"]), layer["role"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: damaged store manifest ({_first_line(exc)}); remove the file") from None
    return manifest


def merge_overrides(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` over `base`; `parameters` merge key by key (a derived model keeps its parent's other options)."""
    merged = {**base, **new}
    if isinstance(base.get("parameters"), dict) and isinstance(new.get("parameters"), dict):
        merged["parameters"] = {**base["parameters"], **new["parameters"]}
    return merged


def _entry_digest(manifest: dict[str, Any]) -> str:
    """The listed digest: the layers', mixed with the overrides when `/api/create` recorded some (as
    Ollama's digest of a derived model differs from its parent's, since it answers differently)."""
    digest = _layers_digest(manifest["layers"])
    overrides = manifest.get("overrides")
    if not overrides:
        return digest
    return hashlib.sha256(f"{digest}\0{json.dumps(overrides, sort_keys=True)}".encode()).hexdigest()


def _layers_digest(layers: list[dict[str, Any]]) -> str:
    """sha256 of the (role, digest) list: the identity of a model's content, whatever its name."""
    canonical = json.dumps(sorted((str(layer["role"]), str(layer["digest"])) for layer in layers),
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix name, path) of the files to keep from a model folder.

    Hidden entries (.git, .cache) are skipped, and so are weights in other
    formats when safetensors are present (Hub repos often carry both).
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if not filename.startswith(".") and path.is_file():
                files.append((path.relative_to(folder).as_posix(), path))
    if any(rel.endswith(".safetensors") for rel, _ in files):
        files = [(rel, p) for rel, p in files if Path(rel).suffix.lower() not in DUPLICATE_WEIGHT_SUFFIXES]
    return files


def _hash_file(path: Path, chunk_size: int, label: str, progress: Progress | None) -> str:
    hasher, done, total = hashlib.sha256(), 0, path.stat().st_size
    with open(path, "rb") as reader:
        while chunk := reader.read(chunk_size):
            hasher.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(label, done, total, "B")
    return hasher.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP_PREFIX}{os.getpid()}-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe_relative(role: str) -> Path:
    """A layer role as a relative path that stays inside the folder (manifests are files users can edit)."""
    rel = Path(role)
    if rel.is_absolute() or not rel.parts or any(part in ("", ".", "..") for part in rel.parts):
        raise StoreError(f"unsafe file name {role!r} in a store manifest")
    return rel


def _folder_complete(folder: Path, layers: list[dict[str, Any]]) -> bool:
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


def _remove_path(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _looks_like_path(text: str) -> bool:
    model_suffix = Path(text).suffix.lower() in (".gguf", ".safetensors")
    return text.startswith(("/", ".", "~")) or (os.sep in text and model_suffix)


def _parse_time(text: str | None) -> datetime:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
