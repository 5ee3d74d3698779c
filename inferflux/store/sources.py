"""What `pull` accepts: a GGUF file, a safetensors folder, `ollama://NAME[:TAG]`, `hf://ORG/REPO[/FILE]`.

Each source becomes a local file or folder plus how to name and record it; the
store then treats them all alike. Remote sources go through their own tools
(the local Ollama store's layout, huggingface_hub's cache, resume and auth), and
any failure is one line naming the source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from inferflux.store.blobs import Progress
from inferflux.store.names import DEFAULT_TAG, ModelRef, StoreError, default_name, first_line, parse_name

OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
# Files of a Hugging Face download we fetch; other weight formats duplicate the safetensors.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.md"]
DUPLICATE_WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".ot", ".gguf"}


@dataclasses.dataclass
class Source:
    """What a source string turned into: a local file or folder, plus how to name and record it."""

    path: Path
    default_name: str
    label: str  # recorded as the manifest's "source"
    expected_digest: str | None = None  # hex, when the source already names its content (Ollama)


def open_source(source: str, progress: Progress | None, home: Path | None = None) -> Source:
    """Resolve a `pull` source to local bytes (downloading where it names a remote model).

    `home` is the store's $INFERFLUX_HOME, whose encrypted `hf_token` secret (if stored) authenticates hub pulls.
    """
    if source.startswith("ollama://"):
        return _ollama_source(source[len("ollama://"):])
    if source.startswith("hf://"):
        return _hf_source(source[len("hf://"):], progress, home)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source):
        raise StoreError(f"{source}: unsupported source; use a local path, ollama://NAME:TAG or hf://ORG/REPO")
    path = Path(source).expanduser()
    if not path.exists():
        raise StoreError(f"{source}: no such file or folder")
    stem = path.stem if path.is_file() else path.name
    if stem in ("", ".", ".."):
        stem = path.resolve().name
    return Source(path.resolve(), default_name(stem), str(path.resolve()))


def check_gguf(path: Path) -> None:
    """Refuse what is not a readable GGUF before copying a byte of it."""
    from inferflux.formats.gguf_file import GGUFFile

    GGUFFile(path)


def folder_files(folder: Path) -> list[tuple[str, Path]]:
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


def _ollama_source(ref_text: str) -> Source:
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
    return Source(blob, str(ref) if ref.tag != DEFAULT_TAG else ref.name, label, expected_digest=digest_hex)


def _hf_source(spec: str, progress: Progress | None, home: Path | None = None) -> Source:
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
    from inferflux.server.access.secrets_store import hub_token

    token = hub_token(home)  # None: huggingface_hub's own auth (HF_TOKEN, `hf auth login`)
    quiet = progress is None and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        if filename:
            path = Path(huggingface_hub.hf_hub_download(repo_id, filename, token=token))
        else:
            path = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HF_ALLOW_PATTERNS,
                                                                token=token))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types (HTTP, offline, auth, not found)
        raise StoreError(f"{label}: download failed: {first_line(exc)}{_offline_hint()}") from None
    finally:
        if quiet:
            enable_progress_bars()
    stem = Path(filename).stem if filename else parts[1]
    return Source(path, default_name(stem), label)


def _offline_hint() -> str:
    return " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
        else ""
