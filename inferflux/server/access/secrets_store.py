"""Named secrets, encrypted at rest, in the `secrets` table of `$INFERFLUX_HOME/state.db`.

What lives here: credentials the server must be able to *use* (so they cannot be hashed like API keys): the
Hugging Face token the model store pulls with (`hf_token`) and the OIDC client secret that token introspection
authenticates with (`security.oidc.client_secret: secret:NAME`, introspection.py). Each value is sealed with
the master key (`crypto.py`), bound to its name; the table never holds a plaintext, and `inferctl admin
secrets list` shows names and key ids only. Rotating the master key (`rotate_master_key`) re-seals the
encrypted adapter files first (one atomic file at a time, store/adapters.py), then every row in one
transaction: either all rows move to the new key or none do; run again with the same keys, it finishes a
rotation a crash cut short.

Config values may refer to a stored secret as `secret:NAME` (`resolve`), so a YAML file never has
to hold the credential itself.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from inferflux.config import Config
from inferflux.server.access.crypto import (
    MasterKey,
    SecretError,
    decrypt_text,
    encrypt_text,
    key_id_of,
    load_master_key,
)
from inferflux.server.state_db import open_state_db, open_state_db_read_only, state_db_path

REF_PREFIX = "secret:"
HF_TOKEN = "hf_token"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    kid TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise SecretError(f"secret name {name!r}: use 1-128 letters, digits, '.', '_', ':', '/' or '-', "
                          "starting with a letter or digit")
    return name


class SecretStore:
    """The secrets of one `state.db`, read and written with one master key (None: listing only)."""

    def __init__(self, path: str | Path, master_key: MasterKey | None) -> None:
        self.path = Path(path)
        self.master_key = master_key
        self._lock = threading.Lock()
        self._db = open_state_db(self.path, synchronous="FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _key(self, action: str) -> MasterKey:
        if self.master_key is None:
            raise SecretError(f"{action} needs the master key: set INFERFLUX_MASTER_KEY or security.master_key_file "
                              "(docs/security.md)")
        return self.master_key

    def set(self, name: str, value: str | bytes) -> dict[str, Any]:
        """Store (or replace) `name`; returns its listing row. The value is sealed before it reaches SQLite."""
        key = self._key(f"storing secret {check_name(name)!r}")
        token = encrypt_text(key, value, name)
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO secrets (name, value, kid, created, updated) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = excluded.value, kid = excluded.kid, "
                             "updated = excluded.updated", (name, token, key.kid, now, now))
        return next(row for row in self.listing() if row["name"] == name)

    def get_bytes(self, name: str) -> bytes | None:
        """The plaintext of `name`, or None when no such secret is stored; SecretError on a wrong key or tampering."""
        with self._lock:
            row = self._db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return None if row is None else decrypt_text(self.master_key, row[0], name)

    def get(self, name: str) -> str | None:
        data = self.get_bytes(name)
        return None if data is None else data.decode()

    def listing(self) -> list[dict[str, Any]]:
        """Names, key ids and times; never a value."""
        with self._lock:
            rows = self._db.execute("SELECT name, kid, created, updated FROM secrets ORDER BY name").fetchall()
        return [{"name": n, "kid": k, "created": c, "updated": u} for n, k, c, u in rows]

    def delete(self, name: str) -> None:
        with self._lock:
            if self._db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount == 0:
                raise SecretError(f"no secret {name!r} (`inferctl admin secrets list` lists them)")

    def verify(self) -> int:
        """Decrypt every stored secret with the configured key (start-up check); the count, or SecretError."""
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM secrets ORDER BY name").fetchall()
        for name, token in rows:
            decrypt_text(self.master_key, token, name)
        return len(rows)

    def rotate(self, new_key: MasterKey) -> int:
        """Re-encrypt every secret under `new_key` in one transaction; the count moved. The old key is needed
        to read. A row already under `new_key` (a rotation cut short after this table, then run again) is
        opened with it to prove it, and left as it is; a row under any third key stops it, nothing moved."""
        old = self._key("rotating the master key")
        moved = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute("SELECT name, value FROM secrets").fetchall()
                for name, token in rows:
                    if key_id_of(token) == new_key.kid:
                        decrypt_text(new_key, token, name)
                        continue
                    plain = decrypt_text(old, token, name)
                    self._db.execute("UPDATE secrets SET value = ?, kid = ?, updated = ? WHERE name = ?",
                                     (encrypt_text(new_key, plain, name), new_key.kid, time.time(), name))
                    moved += 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.master_key = new_key
        return moved

    def resolve(self, value: str) -> str:
        """A config value as used: `secret:NAME` is the stored secret NAME (an error if absent), else `value`."""
        if not value.startswith(REF_PREFIX):
            return value
        name = value[len(REF_PREFIX):]
        found = self.get(name)
        if found is None:
            raise SecretError(f"the config refers to secret {name!r}, which is not stored "
                              f"(`inferctl admin secrets set {name} --value-stdin`)")
        return found


def open_secret_store(config: Config) -> SecretStore:
    """The secret store of `config`'s home, with the configured master key (or None)."""
    return SecretStore(state_db_path(config.home_path), load_master_key(config.security.master_key_file))


def rotate_master_key(config: Config, new_key: MasterKey) -> dict[str, int]:
    """Move everything the master key seals to `new_key`: encrypted adapter files, then the `secrets` table.

    The configured key (INFERFLUX_MASTER_KEY / security.master_key_file) is the old one and stays the one to
    configure until this returns. Adapters go first, one atomic file at a time, then the table in one
    transaction; each step skips what is already under `new_key`, so after a crash the same command with the
    same two keys completes the rotation (every file and row opens with one of the two keys meanwhile).
    Returns the counts: secrets and adapter files moved, and items found already under the new key.
    """
    from inferflux.store.adapters import AdapterStore

    store = open_secret_store(config)
    try:
        old = store._key("rotating the master key")
        if old.kid == new_key.kid:
            raise SecretError(f"the new master key is the configured one ({new_key.kid}): nothing to rotate")
        files, files_kept = AdapterStore(config.home_path).reseal(old, new_key)
        before = len([r for r in store.listing() if r["kid"] == new_key.kid])
        secrets = store.rotate(new_key)
    finally:
        store.close()
    return {"secrets": secrets, "adapter_files": files, "already_new": files_kept + before}


def check_secrets(config: Config) -> int:
    """At server start: every stored secret must open with the configured key, else one-line SecretError.

    A secret the config refers to (security.oidc.client_secret) must be stored. Does not create state.db;
    returns the number of secrets checked.
    """
    path = state_db_path(config.home_path)
    rows: list[tuple[str, str]] = []
    if path.is_file():
        with closing(open_state_db_read_only(path)) as db:
            try:
                rows = db.execute("SELECT name, value FROM secrets ORDER BY name").fetchall()
            except sqlite3.OperationalError:
                pass  # no secrets table yet
    reference = config.security.oidc.client_secret  # secret:NAME (a config rule): it must be stored
    if reference and reference[len(REF_PREFIX):] not in {name for name, _ in rows}:
        raise SecretError(f"security.oidc.client_secret refers to secret {reference[len(REF_PREFIX):]!r}, which "
                          f"is not stored in {path} (`inferctl admin secrets set NAME --value-stdin`)")
    key = load_master_key(config.security.master_key_file)
    for name, token in rows:
        if key is None:
            raise SecretError(f"{path} holds {len(rows)} encrypted secret(s) (master key {key_id_of(token)}) and no "
                              "master key is configured: set INFERFLUX_MASTER_KEY or security.master_key_file")
        decrypt_text(key, token, name)
    return len(rows)


def hub_token(home: str | Path | None = None) -> str | None:
    """The stored Hugging Face token (`hf_token`), or None (then huggingface_hub's own auth applies)."""
    from inferflux.config import load_config

    config = load_config()
    path = state_db_path(home if home is not None else config.home_path)
    if not path.is_file():
        return None
    with closing(open_state_db_read_only(path)) as db:
        try:
            row = db.execute("SELECT value FROM secrets WHERE name = ?", (HF_TOKEN,)).fetchone()
        except sqlite3.OperationalError:
            return None
    if row is None:
        return None
    return decrypt_text(load_master_key(config.security.master_key_file), row[0], HF_TOKEN).decode()
