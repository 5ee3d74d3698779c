"""The audit log's hash chain: canonical form, hashes, file order, verification and reading (docs/security.md).

Each record is one JSON line in `$INFERFLUX_HOME/audit/audit-NNNNNN.jsonl` (names sort in write
order). A record carries `prev`, the `hash` of the record before it (the first record of a log has
`GENESIS`, and the first record of each later file has the last hash of the file before it, so the
chain runs across rotated files), and its own `hash`: the SHA-256 of its canonical form, which is the
record without `hash` (`prev` included) as JSON with sorted keys and no spaces. So an edited record
fails its own hash, and a deleted, inserted or moved record breaks the next record's `prev`.

A torn final line (bytes after the last newline of the last file) is what a writer killed
mid-write leaves: verification stops there, reports it and still passes, because every complete
record before it verifies; the next writer cuts it off before appending (`audit_log.py`). A torn
line anywhere else is an error: writers never append after one.

Nothing here imports JAX or Quart, so `inferctl admin audit verify|tail` starts in a blink.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GENESIS = "0" * 64  # the `prev` of a log's first record
PREFIX, SUFFIX = "audit-", ".jsonl"


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers: every field but `hash`, sorted keys, no spaces, UTF-8."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def seal(record: dict[str, Any], prev: str) -> dict[str, Any]:
    """`record` chained after the record whose hash is `prev`: with `prev` and its own `hash`."""
    sealed = {**record, "prev": prev}
    sealed.pop("hash", None)
    sealed["hash"] = record_hash(sealed)
    return sealed


def line_of(record: dict[str, Any]) -> bytes:
    """A sealed record as its line in the file (the canonical form plus `hash`, then a newline)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def file_name(number: int) -> str:
    return f"{PREFIX}{number:06d}{SUFFIX}"


def file_number(path: Path) -> int:
    return int(path.name[len(PREFIX):-len(SUFFIX)])


def log_files(directory: str | Path) -> list[Path]:
    """The log's files in write order (their numbers sort as they were made)."""
    found = []
    for path in Path(directory).glob(f"{PREFIX}*{SUFFIX}"):
        digits = path.name[len(PREFIX):-len(SUFFIX)]
        if digits.isdigit():
            found.append(path)
    return sorted(found, key=file_number)


@dataclasses.dataclass
class Problem:
    """Where the chain breaks: the file, the 1-based line, and why."""

    file: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.why}"


@dataclasses.dataclass
class Verdict:
    """What `verify` found: how many records chain, the last hash, a torn tail, the first problem."""

    records: int = 0
    files: int = 0
    last_hash: str = GENESIS
    torn: Problem | None = None  # an incomplete final line (ignored: the chain before it holds)
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.problem is not None:
            return f"audit chain broken at {self.problem} ({self.records} records verified before it)"
        text = f"audit chain intact: {self.records} records in {self.files} files, last hash {self.last_hash[:16]}"
        if self.torn is not None:
            text += f"; ignored a torn final line at {self.torn}"
        return text


def verify(directory: str | Path) -> Verdict:
    """Check every record of the log in `directory`, in order; stops at the first problem.

    Reasons: `not JSON`, `prev mismatch` (a record before it was deleted, inserted or moved, or the
    previous file lost its end), `hash mismatch` (the record was edited), `torn line` (an incomplete
    line that is not the log's last).
    """
    verdict = Verdict()
    files = log_files(directory)
    prev = GENESIS
    for index, path in enumerate(files):
        verdict.files += 1
        data = path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # `tail` is b"" when the file ends with a newline
        for number, raw in enumerate(complete, start=1):
            where = path.name
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                verdict.problem = Problem(where, number, "not JSON (the line was damaged)")
                return verdict
            if record.get("prev") != prev:
                verdict.problem = Problem(where, number, "prev mismatch: the record before it was deleted, "
                                          "inserted or moved (its prev is not the previous record's hash)")
                return verdict
            if record.get("hash") != record_hash(record):
                verdict.problem = Problem(where, number, "hash mismatch: the record was edited")
                return verdict
            prev = record["hash"]
            verdict.records += 1
            verdict.last_hash = prev
        if tail:
            torn = Problem(path.name, len(complete) + 1, f"torn line ({len(tail)} bytes without a newline)")
            if index != len(files) - 1:
                torn.why += " inside the log, not at its end"
                verdict.problem = torn
                return verdict
            verdict.torn = torn
    return verdict


def complete_records(path: Path) -> Iterator[dict[str, Any]]:
    """The parsable complete lines of one file (a torn tail or a damaged line is skipped)."""
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                return
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def tail(directory: str | Path, limit: int = 20, tenant: str | None = None) -> list[dict[str, Any]]:
    """The last `limit` records (oldest first), only `tenant`'s when given; reads files from the newest back."""
    found: list[dict[str, Any]] = []
    for path in reversed(log_files(directory)):
        records = [r for r in complete_records(path) if tenant is None or r.get("tenant") == tenant]
        found = records[-(limit - len(found)):] + found if limit > len(found) else found
        if len(found) >= limit:
            break
    return found[-limit:] if limit > 0 else []


def last_complete(path: Path) -> tuple[str | None, int]:
    """(hash of the file's last complete record or None, the length of its complete part in bytes).

    Reads backwards from the end in growing chunks, so a large file costs one small read.
    """
    size = path.stat().st_size
    chunk = 4096
    with path.open("rb") as handle:
        while True:
            start = max(0, size - chunk)
            handle.seek(start)
            data = handle.read(size - start)
            end = data.rfind(b"\n")
            before = data.rfind(b"\n", 0, end) if end >= 0 else -1
            if start > 0 and before < 0:  # the last complete line starts before this chunk: read more
                chunk *= 4
                continue
            if end < 0:
                return None, 0
            try:
                value = json.loads(data[before + 1:end]).get("hash")
            except (ValueError, AttributeError):
                value = None
            return (value if isinstance(value, str) else None), start + end + 1


__all__ = ["GENESIS", "Problem", "Verdict", "canonical", "complete_records", "file_name", "last_complete",
           "line_of", "log_files", "record_hash", "seal", "tail", "verify"]
