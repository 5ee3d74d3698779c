"""Signed models: OpenSSF model-signing signatures (a Sigstore bundle over a manifest of file digests).

`inferctl sign PATH --key key.pem` writes the signature next to the model (`FILE.sig` beside a file,
`model.sig` inside a folder), in exactly the format the `model_signing` CLI writes and reads, so a
model signed by either verifies with the other (`model_signing verify key PATH --signature S
--public_key pub.pem`). Signing and verifying are the `model-signing` package's own; this module
only decides where signatures live and what a refusal says.

With `security.require_signed_models: true`, `serve`, `pull` and every model load refuse an
artifact that no key in `security.trusted_keys` signed: no signature, a changed byte, an added,
removed or renamed file (the manifest names every file), a symlink (model-signing refuses to
follow them, so a swapped link is caught), or a single file renamed (its signature names it, and
checking that name is ours: model-signing verifies a single file by content only).

Stored models: `pull` verifies the source before storing it and keeps the signature beside the
store's copy (`$INFERFLUX_HOME/signatures/<blob or folder digest>.json`, with the name the signer
saw), so a model served from the store is checked again at every load against the stored bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from inferflux.errors import InferFluxError

log = logging.getLogger(__name__)

FOLDER_SIGNATURE = "model.sig"
SIGNATURE_SUFFIX = ".sig"
STORE_DIR = "signatures"

__all__ = ["SignatureError", "Verifier", "check_model", "default_signature", "keep_signature", "sign", "signed_name",
           "stored_signature", "verifier_from_config", "verify_source"]


class SignatureError(InferFluxError):
    """A model is unsigned, or its signature does not verify with a trusted key."""


def default_signature(path: Path) -> Path:
    """Where a model's signature lives: `model.sig` inside a folder, `NAME.sig` beside a file."""
    return path / FOLDER_SIGNATURE if path.is_dir() else path.with_name(path.name + SIGNATURE_SUFFIX)


def _hashing(path: Path, signature: Path) -> Any:
    from model_signing import hashing

    # A folder's own `model.sig` is never part of what it signs (the model_signing CLI's default place).
    ignored = [path / FOLDER_SIGNATURE] if path.is_dir() else []
    if path.is_dir() and signature.resolve().is_relative_to(path.resolve()):
        ignored.append(signature)
    return hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=True)


def sign(path: Path, private_key: Path, signature: Path | None = None, password: str | None = None) -> Path:
    """Sign the model at `path` with a PEM private key (elliptic curve); returns the signature's path."""
    from model_signing import signing

    path = Path(path)
    if not path.exists():
        raise SignatureError(f"{path}: no such model file or folder")
    if not Path(private_key).is_file():
        raise SignatureError(f"{private_key}: no such key file")
    signature = Path(signature) if signature else default_signature(path)
    try:
        (signing.Config().use_elliptic_key_signer(private_key=private_key, password=password)
         .set_hashing_config(_hashing(path, signature)).sign(path, signature))
    except Exception as exc:  # the library raises ValueError/OSError/crypto errors: one line for the user
        raise SignatureError(f"could not sign {path}: {_first_line(exc)}") from None
    return signature


def signed_name(signature: Path) -> str | None:
    """The model name inside a signature bundle (the in-toto statement's subject), or None if unreadable."""
    try:
        bundle = json.loads(Path(signature).read_text())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        return str(statement["subject"][0]["name"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


@dataclasses.dataclass(frozen=True)
class Verifier:
    """Checks models against a set of trusted public keys (PEM files)."""

    trusted_keys: tuple[Path, ...]

    def verify(self, path: Path, signature: Path | None = None, expected_name: str | None = None) -> Path:
        """The trusted key that signed `path`, or SignatureError naming why not (one line)."""
        from model_signing import verifying

        path = Path(path)
        if path.is_symlink():
            raise SignatureError(f"{path}: is a symbolic link; a signed model must be its own files")
        signature = Path(signature) if signature else default_signature(path)
        if not signature.is_file():
            raise SignatureError(f"{path}: not signed (no signature at {signature}); sign it with "
                                 "`inferctl sign PATH --key KEY.pem`")
        name = signed_name(signature)
        if name is None:
            raise SignatureError(f"{signature}: not a model-signing signature bundle")
        if name != (expected_name or path.name):
            raise SignatureError(f"{path}: the signature is for `{name}`, not `{expected_name or path.name}`")
        errors = []
        for key in self.trusted_keys:
            try:
                (verifying.Config().use_elliptic_key_verifier(public_key=key)
                 .set_hashing_config(_hashing(path, signature)).verify(path, signature))
                return key
            except Exception as exc:  # a mismatch is ValueError; a bad key file a crypto error: try the next key
                errors.append(f"{key.name}: {_first_line(exc)}")
        if not errors:
            raise SignatureError("security.require_signed_models is on but security.trusted_keys names no key")
        raise SignatureError(f"{path}: signature does not verify with any trusted key ({'; '.join(errors)})")


def verifier_from_config(config: Any) -> Verifier | None:
    """The verifier `security.require_signed_models` asks for (None when it is off)."""
    security = config.security
    if not security.require_signed_models:
        return None
    keys = tuple(Path(k.strip()).expanduser() for k in security.trusted_keys.split(",") if k.strip())
    missing = [str(k) for k in keys if not k.is_file()]
    if missing:
        raise SignatureError(f"security.trusted_keys: no such key file {', '.join(missing)}")
    return Verifier(keys)


# ----------------------------------------------------------------------------- the store's copies


def stored_signature(home: Path, stored_path: Path) -> Path:
    """Where the store keeps the signature of one of its blobs or folders (named by their digest)."""
    return Path(home) / STORE_DIR / f"{stored_path.name}.json"


def keep_signature(home: Path, stored_path: Path, signature: Path) -> None:
    """Copy a verified source's signature next to the store's copy of it (atomically)."""
    from inferflux.files import atomic_write

    target = stored_signature(home, stored_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, Path(signature).read_bytes())


def verify_source(path: Path, verifier: Verifier | None, quantize: str | None) -> Path | None:
    """Before a pull stores `path`: its signature (verified), or None when signatures are not required."""
    if verifier is None:
        return None
    if quantize is not None:
        raise SignatureError("security.require_signed_models: --quantize would store a converted model, not the "
                             "signed one; pull it as it is")
    signature = default_signature(path)
    verifier.verify(path, signature)
    return signature


def check_model(path: Path, config: Any, home: Path | None = None) -> None:
    """Refuse to load `path` unless it is signed by a trusted key (no-op when signing is not required).

    A model in the store is checked against the signature kept at pull time (its files carry digest
    names there, so the signer's name comes from the signature); any other path against its own.
    """
    verifier = verifier_from_config(config)
    if verifier is None:
        return
    path = Path(path)
    kept = stored_signature(home, path) if home is not None else None
    if kept is not None and kept.is_file():
        verifier.verify(path, kept, expected_name=signed_name(kept))
    else:
        verifier.verify(path)
    log.info("%s: signature verified", path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
