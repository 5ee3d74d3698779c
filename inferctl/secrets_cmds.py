"""`inferctl admin secrets set|list|delete|genkey` and `inferctl admin rotate-master-key`.

Secrets live encrypted in the local `$INFERFLUX_HOME/state.db` (inferflux/server/access/secrets_store.py);
there is deliberately no HTTP route for them, and no `--value` flag: a value on the command line would
land in shell history, `ps` output and the audit log. It is read from stdin (`--value-stdin`) or typed
at a prompt that does not echo.
"""

from __future__ import annotations

import getpass
import json as jsonlib
import os
import sys
import time
from typing import TYPE_CHECKING

from inferctl.cli_args import UsageError

if TYPE_CHECKING:
    from inferflux.server.access.secrets_store import SecretStore

NEW_KEY_ENV = "INFERFLUX_NEW_MASTER_KEY"


def _store() -> SecretStore:
    from inferflux.config import load_config
    from inferflux.server.access.secrets_store import open_secret_store

    return open_secret_store(load_config())


def _stamp(value: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))


class SecretsAdmin:
    """The secret commands, mixed into `admin_cmds.Admin` (one command class for `inferctl admin`)."""

    def secrets_set(self, name: str, value_stdin: bool = False) -> None:
        """Store a secret (e.g. hf_token, an OIDC client secret), encrypted with the master key.

        Args:
            name NAME: the secret's name (hf_token is the Hugging Face token the model store pulls with)
            value_stdin: read the value from stdin (one trailing newline dropped); otherwise a prompt asks
        """
        if value_stdin:
            value = sys.stdin.read()
            value = value[:-1] if value.endswith("\n") else value
        elif sys.stdin.isatty():
            value = getpass.getpass(f"value of {name}: ")
        else:
            raise UsageError("admin secrets set: stdin is not a terminal; pass --value-stdin to read the value from it")
        if not value:
            raise UsageError(f"admin secrets set: the value of {name} is empty")
        row = _store().set(name, value)
        print(f"stored secret {row['name']} (master key {row['kid']})")

    def secrets_list(self, json: bool = False) -> None:  # noqa: A002
        """List stored secrets: names, the id of the key each is encrypted with, times; never a value.

        Args:
            json: print JSON
        """
        rows = _store().listing()
        if json:
            print(jsonlib.dumps(rows, indent=2))
            return
        from inferctl.admin_cmds import _table

        _table([[r["name"], r["kid"], _stamp(r["updated"])] for r in rows], ["NAME", "MASTER KEY", "UPDATED"])

    def secrets_delete(self, name: str) -> None:
        """Delete a stored secret.

        Args:
            name NAME: the secret
        """
        _store().delete(name)
        print(f"deleted secret {name}")

    def secrets_genkey(self) -> None:
        """Print a new random master key (32 bytes, base64) for INFERFLUX_MASTER_KEY or security.master_key_file."""
        from inferflux.server.access.crypto import generate_master_key

        print(generate_master_key())

    def rotate_master_key(self, new_key_file: str | None = None) -> None:
        """Re-encrypt every stored secret and encrypted adapter file with a new master key.

        The configured key opens them; adapter files are replaced one by one (atomic renames), then the
        secrets table in one transaction. After a crash, the same command with the same keys finishes it.

        Args:
            new_key_file FILE: the new key (32 bytes, base64 or hex); default: the INFERFLUX_NEW_MASTER_KEY variable
        """
        from inferflux.config import load_config
        from inferflux.server.access.crypto import load_master_key, parse_master_key
        from inferflux.server.access.secrets_store import rotate_master_key

        if new_key_file:
            new_key = load_master_key(new_key_file, environ={})
        elif os.environ.get(NEW_KEY_ENV, "").strip():
            new_key = parse_master_key(os.environ[NEW_KEY_ENV], NEW_KEY_ENV)
        else:
            raise UsageError(f"admin rotate-master-key: give --new-key-file FILE or set {NEW_KEY_ENV}")
        assert new_key is not None
        done = rotate_master_key(load_config(), new_key)
        resumed = f" ({done['already_new']} already under it)" if done["already_new"] else ""
        print(f"re-encrypted {done['secrets']} secret(s) and {done['adapter_files']} adapter file(s) with master key "
              f"{new_key.kid}{resumed}; configure it now (INFERFLUX_MASTER_KEY or security.master_key_file): "
              "the old key no longer opens them")


SECRET_VERBS = ("set", "list", "delete", "genkey")
