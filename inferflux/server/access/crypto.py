"""Secrets at rest: one master key, AES-256-GCM, a self-describing envelope (docs/security.md).

The master key is 32 random bytes given as base64 or hex, in `INFERFLUX_MASTER_KEY` or in the file
`security.master_key_file` (the environment wins); `inferctl admin secrets genkey` or
`python -c "import os, base64; print(base64.b64encode(os.urandom(32)).decode())"` makes one.

Every ciphertext names the key that made it: `ifxenc:v1:<kid>:<base64(nonce | ciphertext | tag)>`
(text, for database columns) or the same header followed by the raw bytes (files). `kid` is a short
fingerprint of the key (not a secret: a keyed hash that reveals nothing about it), so a wrong key is
told apart from a damaged ciphertext *before* decryption: "secret X was encrypted with master key
<kid>, the configured key is <kid2>", never garbage. The secret's name and the header are the
AES-GCM associated data, so a ciphertext copied under another name, or a header edited to claim
another key, fails authentication like any other tampering: one line, no plaintext.

No JAX imports here: the CLI uses this without loading a model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from inferflux.errors import InferFluxError

PREFIX = "ifxenc:v1:"
ENV_VAR = "INFERFLUX_MASTER_KEY"
_NONCE = 12
_TAG = 16
_HEADER = re.compile(rb"ifxenc:v1:([0-9a-f]{12}):")


class SecretError(InferFluxError):
    """A secret cannot be read or written: no master key, the wrong one, or a damaged ciphertext (one line)."""


@dataclass(frozen=True)
class MasterKey:
    """The 32-byte key and its id. `repr` never shows the key."""

    key: bytes = field(repr=False)
    source: str = ""  # where it came from, for messages ("INFERFLUX_MASTER_KEY", a file path)

    @property
    def kid(self) -> str:
        """A 12-hex-digit fingerprint: names the key in ciphertexts and errors without revealing it."""
        return hashlib.sha256(b"inferflux master key id\0" + self.key).hexdigest()[:12]


def generate_master_key() -> str:
    """A new master key, as base64 text (what INFERFLUX_MASTER_KEY or a key file holds)."""
    return base64.b64encode(os.urandom(32)).decode()


def parse_master_key(text: str, source: str) -> MasterKey:
    """32 bytes written as 64 hex digits or base64 (standard or URL-safe, padding optional)."""
    value = text.strip()
    raw: bytes | None = None
    if re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raw = bytes.fromhex(value)
    else:
        try:
            raw = base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4),
                                   validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise SecretError(f"{source}: a master key is 32 bytes as 64 hex digits or base64 (44 characters); "
                          "make one with `inferctl admin secrets genkey`")
    return MasterKey(raw, source)


def load_master_key(key_file: str = "", environ: Mapping[str, str] | None = None) -> MasterKey | None:
    """The configured master key: INFERFLUX_MASTER_KEY, else `key_file` (security.master_key_file), else None."""
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR, "").strip():
        return parse_master_key(env[ENV_VAR], ENV_VAR)
    if not key_file:
        return None
    path = Path(key_file).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise SecretError(f"security.master_key_file {path}: cannot read it: {exc.strerror or exc}") from None
    return parse_master_key(text, str(path))


def key_id_of(blob: bytes | str) -> str | None:
    """The kid a ciphertext (text or bytes form) names, or None if it is not one."""
    data = blob.encode() if isinstance(blob, str) else blob
    match = _HEADER.match(data)
    return match.group(1).decode() if match else None


def is_encrypted(blob: bytes | str) -> bool:
    return key_id_of(blob) is not None


def encrypt_bytes(key: MasterKey, data: bytes, name: str) -> bytes:
    """`data` sealed under `key`, bound to `name`: header + nonce | ciphertext | tag (for files)."""
    header = f"{PREFIX}{key.kid}:".encode()
    nonce = os.urandom(_NONCE)
    return header + nonce + AESGCM(key.key).encrypt(nonce, data, header + name.encode())


def decrypt_bytes(key: MasterKey | None, blob: bytes, name: str) -> bytes:
    """The plaintext of `encrypt_bytes(key, data, name)`; SecretError (one line) for any other input."""
    match = _HEADER.match(blob)
    if match is None:
        raise SecretError(f"secret {name!r} is not an InferFlux ciphertext (expected the {PREFIX} header)")
    kid = match.group(1).decode()
    if key is None:
        raise SecretError(f"secret {name!r} is encrypted (master key {kid}) and no master key is configured: "
                          f"set {ENV_VAR} or security.master_key_file")
    if kid != key.kid:
        raise SecretError(f"secret {name!r} was encrypted with master key {kid}, the configured key is {key.kid} "
                          f"(from {key.source or 'the caller'})")
    header, body = blob[:match.end()], blob[match.end():]
    if len(body) < _NONCE + _TAG:
        raise SecretError(f"secret {name!r}: the ciphertext is truncated")
    try:
        return AESGCM(key.key).decrypt(body[:_NONCE], body[_NONCE:], header + name.encode())
    except InvalidTag:
        raise SecretError(f"secret {name!r}: the ciphertext fails authentication (it was altered, or stored "
                          "under another name)") from None


def encrypt_text(key: MasterKey, value: str | bytes, name: str) -> str:
    """The text envelope `ifxenc:v1:<kid>:<base64(nonce|ct|tag)>` (for database columns)."""
    data = value.encode() if isinstance(value, str) else value
    blob = encrypt_bytes(key, data, name)
    cut = len(PREFIX) + 13
    return blob[:cut].decode() + base64.b64encode(blob[cut:]).decode()


def decrypt_text(key: MasterKey | None, token: str, name: str) -> bytes:
    """The plaintext bytes of an `encrypt_text` envelope; SecretError (one line) otherwise."""
    match = _HEADER.match(token.encode())
    if match is None:
        raise SecretError(f"secret {name!r} is not an InferFlux ciphertext (expected the {PREFIX} header)")
    try:
        body = base64.b64decode(token[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"secret {name!r}: the ciphertext is not valid base64 (it was altered)") from None
    return decrypt_bytes(key, token[:match.end()].encode() + body, name)
