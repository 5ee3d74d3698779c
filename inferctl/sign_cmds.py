"""`inferctl sign` and `inferctl verify`: OpenSSF model-signing signatures on models (inferflux/store/signing.py).

A stored model's name resolves to the store's copy; its signature is the one `pull` kept (when the
model was pulled with `security.require_signed_models` on) or, for `sign`, a new one kept there.
"""

from __future__ import annotations

from pathlib import Path


def _resolve(path: str) -> tuple[Path, Path | None]:
    """The model's path, and the store's kept signature when it is a stored model (else None)."""
    from inferflux.store import open_store
    from inferflux.store.signing import stored_signature

    if Path(path).expanduser().exists():
        return Path(path).expanduser(), None
    store = open_store()
    resolved = store.resolve(path)
    return resolved, stored_signature(store.home, resolved)


def sign(path: str, key: str, signature: str | None = None) -> None:
    """Sign PATH with KEY and print where the signature went."""
    from inferflux.store.signing import sign as sign_model

    model, kept = _resolve(path)
    target = Path(signature) if signature else kept
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
    written = sign_model(model, Path(key), target)
    print(f"signed {path}: {written}")


def verify(path: str, key: str, signature: str | None = None) -> None:
    """Verify PATH against the public key(s); one line either way (an error exits 1)."""
    from inferflux.store.signing import Verifier, signed_name

    model, kept = _resolve(path)
    keys = tuple(Path(k.strip()).expanduser() for k in key.split(",") if k.strip())
    missing = [str(k) for k in keys if not k.is_file()]
    if missing:
        raise FileNotFoundError(f"no such key file {', '.join(missing)}")
    sig = Path(signature) if signature else kept
    expected = signed_name(sig) if kept is not None and sig == kept and sig.is_file() else None
    used = Verifier(keys).verify(model, sig, expected_name=expected)
    print(f"verified {path}: signed by {used}")
