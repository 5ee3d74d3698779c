"""The adapter store: `inferctl adapter pull|list|show|rm`, and adapters the server loads by name.

Layout under `home/adapters/<name>/` (adapters are small: one folder each, no content addressing):

    adapter.json      what the name means: format (peft|gguf), source, files (name, size, sha256), facts,
                      `encrypted` (the master key id) and `signed_by` (the trusted key's fingerprint)
    files/            the adapter's own files, under their own names (a PEFT folder's, or the one .gguf)
    signature.sig     the source's OpenSSF model-signing signature, kept when pulled with signatures required

A pull builds the folder in a temp folder and renames it into place, so a half-done pull never shows.

Signatures (`security.require_signed_models`): a pull verifies the source against `security.trusted_keys`
before storing anything (store/signing.py, as model pulls do); a load verifies the stored plain files again
against the kept signature. Encryption (`pull --encrypt`): every file is sealed with AES-256-GCM under the
master key (server/access/crypto.py's file envelope) and decrypted in memory only at load. An encrypted copy
cannot be re-verified by model-signing (it hashes files on disk, and the plaintext is never written), so the
check is moved to pull time and bound to the bytes: each file's associated data names the adapter, the file,
its plaintext SHA-256 and the fingerprint of the key that verified the signature. A changed byte, a file moved
to another adapter, or an edited manifest claiming a signature fails authentication; at load the recorded key
must still be trusted (removing it from `trusted_keys` revokes its adapters too). `inferctl admin
rotate-master-key` re-seals every encrypted file under the new key with the same associated data (`reseal`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inferflux.errors import ModelFormatError
from inferflux.files import TMP_PREFIX, atomic_write, publish_folder, remove_path, temp_path
from inferflux.formats.gguf_lora import AdapterFiles, is_gguf, read_gguf_lora
from inferflux.store.names import ModelNotFoundError, StoreError
from inferflux.store.signing import (
    FOLDER_SIGNATURE,
    SignatureError,
    Verifier,
    default_signature,
    signed_name,
    verifier_from_config,
)

DIR = "adapters"
MANIFEST = "adapter.json"
FILES = "files"
SIGNATURE = "signature.sig"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterNotFoundError(ModelNotFoundError):
    """No adapter file, folder or stored adapter by that name."""


def check_name(name: str) -> str:
    """An adapter name: requests send it as their `model`, so letters, digits, `.`, `_`, `-` (128 at most)."""
    if not _NAME.fullmatch(name):
        raise StoreError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (128 at most, not "
                         "starting with a symbol)")
    return name


def key_fingerprint(public_key: Path) -> str:
    """The SHA-256 of a trusted public key file's bytes: names it in a manifest without depending on its path."""
    return hashlib.sha256(Path(public_key).read_bytes()).hexdigest()


def _bound_name(name: str, rel: str, digest: str, signer: str | None) -> str:
    """The associated data of one encrypted file (see the module docstring for why each part is there)."""
    return f"adapter:{name}/{rel}:sha256:{digest}:signed-by:{signer or '-'}"


def _source_files(src: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of an adapter's files: a GGUF file itself, or every file of a PEFT folder except
    its signature (a symlink is refused: a stored copy must be the adapter's own bytes)."""
    if src.is_symlink():
        raise StoreError(f"{src}: is a symbolic link; pull the adapter's own files")
    if src.is_file():
        if not is_gguf(src):
            raise StoreError(f"{src}: not a GGUF LoRA file or PEFT adapter folder")
        return [(src.name, src)]
    if not (src / "adapter_config.json").is_file():
        raise StoreError(f"{src}: not a PEFT adapter folder (no adapter_config.json) or GGUF LoRA file")
    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink():
            raise StoreError(f"{src}: {rel} is a symbolic link; pull the adapter's own files")
        if path.is_file() and rel != FOLDER_SIGNATURE and not rel.startswith(".git"):
            files.append((rel, path))
    return files


def _facts(src: Path) -> dict[str, Any]:
    """What `list` and `show` print: format, rank, alpha, targets, architecture or base model (headers only)."""
    if src.is_file():
        lora = read_gguf_lora(src)
        ranks = sorted({a.shape[0] for a, _ in lora.tensors.values()})
        return {"format": "gguf", "rank": ranks[-1] if ranks else 0, "alpha": lora.alpha,
                "targets": sorted({t for _, t in lora.tensors}), "architecture": lora.architecture}
    meta = json.loads((src / "adapter_config.json").read_text())
    targets = meta.get("target_modules")
    return {"format": "peft", "rank": int(meta.get("r", 0)), "alpha": meta.get("lora_alpha"),
            "targets": sorted(targets) if isinstance(targets, list) else targets,
            "rslora": bool(meta.get("use_rslora")), "base_model": meta.get("base_model_name_or_path")}


class AdapterStore:
    """Named adapters under `home/adapters/`."""

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home).expanduser()
        self.root = self.home / DIR

    def _dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def has(self, name: str) -> bool:
        return bool(_NAME.fullmatch(name)) and (self.root / name / MANIFEST).is_file()

    def manifest(self, name: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self._dir(name) / MANIFEST).read_text()))
        except (OSError, ValueError):
            raise AdapterNotFoundError(f"adapter '{name}' not found; try `inferctl adapter list`") from None

    def pull(self, source: str | Path, name: str | None = None, verifier: Verifier | None = None,
             key: Any = None, replace: bool = False) -> dict[str, Any]:
        """Store the adapter at `source` under `name` (default: its file or folder name, without `.gguf`).

        With a `verifier`, the source must be signed by a trusted key (its signature is kept); with a master
        `key` (a `MasterKey`), the files are stored encrypted. Returns the manifest.
        """
        from inferflux.server.access.crypto import encrypt_bytes

        src = Path(source).expanduser()
        if not src.exists():
            raise AdapterNotFoundError(f"{source}: no such adapter file or folder")
        name = check_name(name or src.name.removesuffix(".gguf"))
        target = self.root / name
        if target.exists() and not replace:
            raise StoreError(f"an adapter named '{name}' is stored; `inferctl adapter rm {name}` first")
        files = _source_files(src)
        signature, signer = None, None
        if verifier is not None:  # before anything is stored; the key that verified it is bound to the copy
            signature = default_signature(src)
            signer = key_fingerprint(verifier.verify(src, signature))
        try:
            facts = _facts(src)
        except (OSError, ValueError, ModelFormatError) as exc:
            raise StoreError(f"{src}: not a readable adapter ({exc})") from None
        rows: list[dict[str, Any]] = []
        self.root.mkdir(parents=True, exist_ok=True)
        with temp_path(self.root, folder=True) as tmp:
            for rel, path in files:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                rows.append({"name": rel, "size": len(data), "sha256": digest})
                if key is not None:
                    data = encrypt_bytes(key, data, _bound_name(name, rel, digest, signer))
                out = tmp / FILES / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(out, data)
            if signature is not None:
                shutil.copyfile(signature, tmp / SIGNATURE)
            manifest = {"name": name, **facts, "source": str(src.resolve()), "source_name": src.name,
                        "created": datetime.now(UTC).isoformat(timespec="seconds"), "files": rows,
                        "size": sum(int(r["size"]) for r in rows), "encrypted": None if key is None else key.kid,
                        "signed_by": signer, "signed_name": signed_name(signature) if signature else None}
            atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2))
            if target.exists():
                remove_path(target)
            publish_folder(tmp, target)
        return manifest

    def reseal(self, old: Any, new: Any) -> tuple[int, int]:
        """Re-encrypt every encrypted adapter's files from master key `old` to `new` (`MasterKey`s), for
        `inferctl admin rotate-master-key`; returns (files re-sealed, files already under `new`).

        Each file keeps its associated data (adapter, file, digest, signer) and is replaced by an atomic
        rename, so a crash leaves every file whole, sealed under one key or the other; the manifest's
        `encrypted` moves to the new key id only after all its files did. A file already under `new` is
        opened with it (authenticated, not just its header believed) and left alone, so running the
        rotation again with the same two keys finishes a rotation that was cut short.
        """
        from inferflux.server.access.crypto import decrypt_bytes, encrypt_bytes, key_id_of

        moved = kept = 0
        for manifest in self.list():
            if not manifest.get("encrypted"):
                continue
            name, signer = manifest["name"], manifest.get("signed_by")
            for row in manifest["files"]:
                path = self._dir(name) / FILES / row["name"]
                blob = path.read_bytes()
                bound = _bound_name(name, row["name"], row["sha256"], signer)
                if key_id_of(blob) == new.kid:
                    decrypt_bytes(new, blob, bound)
                    kept += 1
                    continue
                data = decrypt_bytes(old, blob, bound)
                atomic_write(path, encrypt_bytes(new, data, bound))
                moved += 1
            if manifest["encrypted"] != new.kid:
                atomic_write(self._dir(name) / MANIFEST, json.dumps({**manifest, "encrypted": new.kid}, indent=2))
        return moved, kept

    def list(self) -> list[dict[str, Any]]:
        """Every stored adapter's manifest, sorted by name."""
        if not self.root.is_dir():
            return []
        return [self.manifest(p.name) for p in sorted(self.root.iterdir())
                if not p.name.startswith(TMP_PREFIX) and (p / MANIFEST).is_file()]

    def rm(self, name: str) -> int:
        """Remove a stored adapter; returns the bytes freed."""
        manifest = self.manifest(name)
        remove_path(self._dir(name))
        return int(manifest.get("size") or 0)

    def path(self, name: str) -> Path:
        """The stored plain adapter's path (the .gguf, or the files folder); an encrypted one has none."""
        manifest = self.manifest(name)
        files = self._dir(name) / FILES
        return files / manifest["files"][0]["name"] if manifest["format"] == "gguf" else files

    def open(self, name: str, config: Any) -> Path | AdapterFiles:
        """What the runtime reads for a stored adapter: its path (plain) or its decrypted files (in memory),
        after the checks `security.require_signed_models` asks for. Raises one-line errors."""
        manifest = self.manifest(name)
        verifier = verifier_from_config(config)
        folder = self._dir(name)
        if manifest.get("encrypted"):
            return self._decrypted(name, manifest, config, verifier)
        path = self.path(name)
        if verifier is not None:
            kept = folder / SIGNATURE
            if not kept.is_file():
                raise SignatureError(f"adapter '{name}' was stored without a signature; security."
                                     "require_signed_models refuses it (pull it again from a signed source)")
            verifier.verify(path, kept, expected_name=signed_name(kept))
        return path

    def _decrypted(self, name: str, manifest: dict[str, Any], config: Any,
                   verifier: Verifier | None) -> AdapterFiles:
        from inferflux.server.access.crypto import decrypt_bytes, load_master_key

        signer = manifest.get("signed_by")
        if verifier is not None:
            trusted = {key_fingerprint(k) for k in verifier.trusted_keys}
            if not signer:
                raise SignatureError(f"adapter '{name}' was stored without a signature; security."
                                     "require_signed_models refuses it (pull it again from a signed source)")
            if signer not in trusted:
                raise SignatureError(f"adapter '{name}': the key that signed it is no longer in "
                                     "security.trusted_keys")
        key = load_master_key(config.security.master_key_file)
        files = {}
        for row in manifest["files"]:
            blob = (self._dir(name) / FILES / row["name"]).read_bytes()
            data = decrypt_bytes(key, blob, _bound_name(name, row["name"], row["sha256"], signer))
            if hashlib.sha256(data).hexdigest() != row["sha256"]:  # bound in the tag already; belt and braces
                raise SignatureError(f"adapter '{name}': {row['name']} does not match its recorded digest")
            files[row["name"]] = data
        return AdapterFiles(f"adapter '{name}'", files)


def open_adapter(source: str | Path, config: Any) -> Path | AdapterFiles:
    """What to load for `source`: an existing adapter file or folder (its own signature checked when
    `security.require_signed_models` is on), else a stored adapter by that name (`AdapterStore.open`)."""
    path = Path(str(source)).expanduser()
    try:
        on_disk = path.exists() or path.is_symlink()
    except (OSError, ValueError):  # a NUL byte, a name too long: not a path, maybe not a name either
        on_disk = False
    if on_disk:
        verifier = verifier_from_config(config)
        if verifier is not None:
            verifier.verify(path)
        return path
    store = AdapterStore(config.home_path)
    if store.has(str(source)):
        return store.open(str(source), config)
    raise AdapterNotFoundError(f"{str(source)[:200]!r}: no such PEFT adapter folder, GGUF LoRA file or stored adapter "
                               "(`inferctl adapter list`)")

