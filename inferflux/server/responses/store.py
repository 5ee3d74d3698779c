"""Stored Responses (`store: true`) in `$INFERFLUX_HOME/state.db`, the file the key store uses, own table.

A stored response is what `GET /v1/responses/{id}` returns and what `previous_response_id` chains:
the response object as it was answered, and the request's input items (as `/input_items` lists
them). Each belongs to a tenant (the API key's, or "" with `security.auth: off`); every read and
delete is by (tenant, id), so one tenant cannot see, chain or delete another's, and an id of
another tenant is "not found", as OpenAI answers it (an id's existence is not disclosed).

Retention: `server.responses_retention` (a duration, `0` = keep until deleted) is stamped on each
row as its expiry when it is written; expired rows are invisible at once and deleted at the next
write (one indexed DELETE), so the table never grows past what the retention allows.

SQLite in WAL mode, one connection and a lock (the calls are short local writes, as in keys.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from inferflux.server.errors import not_found
from inferflux.server.state_db import open_state_db, state_db_path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    previous_id TEXT,
    input TEXT NOT NULL,
    response TEXT NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS responses_expires ON responses (expires);
"""


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as answered
    input_items: list[dict[str, Any]]  # this request's input items (with ids), oldest first

    @property
    def previous_id(self) -> str | None:
        return self.response.get("previous_response_id")


class ResponseStore:
    """The stored responses of one `state.db`; safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_state_db(self.path)  # conversations: nobody else's business (0600)
        self._db.executescript(_SCHEMA)

    @classmethod
    def at_home(cls, home: str | Path) -> ResponseStore:
        return cls(state_db_path(home))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save(self, tenant: str, response: dict[str, Any], input_items: list[dict[str, Any]],
             retention: float | None) -> None:
        """Store a finished response for `retention` seconds (None: until deleted); prune expired ones."""
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM responses WHERE expires IS NOT NULL AND expires <= ?", (now,))
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, tenant, created, expires, previous_id, input, response) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (response["id"], tenant, now, now + retention if retention else None,
                 response.get("previous_response_id"), json.dumps(input_items, ensure_ascii=False),
                 json.dumps(response, ensure_ascii=False)))

    def get(self, tenant: str, response_id: str) -> StoredResponse:
        """The tenant's stored response; a 404 if it does not exist, expired, or is another tenant's."""
        with self._lock:
            row = self._db.execute("SELECT input, response FROM responses WHERE tenant = ? AND id = ? AND "
                                   "(expires IS NULL OR expires > ?)", (tenant, response_id, time.time())).fetchone()
        if row is None:
            raise not_found(f"Response with id '{response_id}' not found.", param="response_id")
        return StoredResponse(json.loads(row[1]), json.loads(row[0]))

    def delete(self, tenant: str, response_id: str) -> None:
        self.get(tenant, response_id)  # expired counts as gone
        with self._lock:
            self._db.execute("DELETE FROM responses WHERE tenant = ? AND id = ?", (tenant, response_id))

    def chain(self, tenant: str, response_id: str, limit: int = 1000) -> list[StoredResponse]:
        """The conversation ending at `response_id`, oldest first (a 404 if any link is gone)."""
        chain: list[StoredResponse] = []
        seen: set[str] = set()
        next_id: str | None = response_id
        while next_id is not None and next_id not in seen and len(chain) < limit:
            seen.add(next_id)
            stored = self.get(tenant, next_id)
            chain.append(stored)
            next_id = stored.previous_id
        return chain[::-1]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM responses").fetchone()[0])


def parse_retention(text: str) -> float | None:
    """`server.responses_retention` in seconds; None for `0` (kept until deleted)."""
    from inferflux.server.access.keys import parse_duration

    return None if re.fullmatch(r"(0+[smhdw]?)+", text.strip()) else parse_duration(text)
