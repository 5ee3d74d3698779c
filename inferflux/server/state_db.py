"""Opening `$INFERFLUX_HOME/state.db`, the one SQLite file the SQLite-backed stores share.

The key store, the limiter, the policy store, the secret store and the response store each keep
their own tables in this file (each store creates its own schema), and the server, its worker
threads and `inferctl admin` in other processes all open it at the same time. So every store opens
it the same way, here:

- WAL journal mode: readers in other processes (a running server, `inferctl admin keys list`) are
  not blocked by a writer, and a writer is not blocked by them.
- a 10 s busy timeout: two writers in different processes wait for each other instead of failing
  at once with `database is locked`.
- autocommit (`isolation_level=None`): a store opens its transactions itself (`BEGIN IMMEDIATE`
  where it reads and then writes), none is left open by the driver between calls.
- one connection per store, shared by its threads (`check_same_thread=False`): the store must hold
  one `threading.Lock` around every use of it, as sqlite3 connections are not safe to use from two
  threads at once.
- mode 0600: what it holds (key hashes, conversations, sealed secrets) is nobody else's business.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

STATE_DB = "state.db"
BUSY_TIMEOUT_S = 10.0


def state_db_path(home: str | Path) -> Path:
    """The state file under an `$INFERFLUX_HOME`."""
    return Path(home) / STATE_DB


def open_state_db(path: str | Path, synchronous: Literal["NORMAL", "FULL"] = "NORMAL") -> sqlite3.Connection:
    """Open (creating it and its folder if need be) a state file the way every store shares it.

    `synchronous`: NORMAL (the default) is durable across a crash of the process, and in WAL mode
    can lose only the last commits on a power loss; FULL (SQLite's own default) syncs every commit,
    for the rarely written stores (policies, secrets) that kept it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    path.chmod(0o600)
    return db


def open_state_db_read_only(path: str | Path) -> sqlite3.Connection:
    """Open an existing state file for reading only: for checks that must not create it (or its tables)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
