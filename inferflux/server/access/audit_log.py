"""The audit log's writer: one line per request and per admin action, hash-chained (docs/security.md).

The server's finish hook (`install`) runs on the event loop when a request has ended (response and
any streamed body, `server/record.py`), so it only builds a dict and puts it on a queue; one
background thread (`AuditLog`) takes batches off the queue and appends them, so no request waits
on the disk. It fsyncs at most every `audit.fsync_interval_ms` (0: after every batch), when asked to
`flush`, and on shutdown (`after_serving`, and `atexit` as a backstop). A record still in the queue
or in the page cache when the machine loses power is lost; one from a killed process (SIGKILL) is
lost only if it was still in the queue.

Several processes may append to one log: the server, and `inferctl admin ...` run on the same
machine without `--url` (`audited_cli`). Each append holds an exclusive `fcntl.flock` on
`audit/.lock` for the whole batch and, under it, looks at the newest file afresh: when its inode
and size are the ones this writer left, the cached last hash is still right; otherwise another
process wrote, and the last complete line is re-read (`audit_chain.last_complete`, a short read
from the end). So records of two processes interleave, each chained to the one before it.

A torn tail (bytes after the last newline: a writer killed mid-write) is repaired under the lock
before anything is appended: the partial line is truncated (its record was never complete, so
nothing verifiable is lost) and an `audit.repair` record saying how many bytes were dropped is
chained in its place. Files rotate when the next line would pass `audit.max_file_bytes`; the new
file's first `prev` is the previous file's last hash. Files are 0600 in a 0700 directory.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import getpass
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferflux.server.access.audit_chain import (
    GENESIS,
    file_name,
    file_number,
    last_complete,
    line_of,
    log_files,
    seal,
)

if TYPE_CHECKING:
    from inferflux.config import Config
    from inferflux.server.record import RequestRecord

log = logging.getLogger(__name__)
EXTENSION = "inferflux.audit"
_BATCH = 1024  # most records appended under one lock
_STOP = object()
# Arguments of a local admin command that may be written down (never --api-key or a secret).
_SUBJECT_ARGS = ("tenant", "name", "key_id", "scopes", "expires", "limit", "scope", "file", "version")


def now_iso() -> str:
    """The current time as ISO 8601 UTC with milliseconds (`2026-12-01T22:40:00.123Z`)."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def request_entry(rec: RequestRecord) -> dict[str, Any]:
    """The audit record of a finished HTTP request: who, what, how it ended; never a key or token."""
    return {"time": now_iso(), "request_id": rec.request_id, "tenant": rec.tenant, "key_id": rec.key_id,
            "route": rec.route, "method": rec.method, "path": rec.path, "model": rec.model,
            "adapter": rec.adapter, "status": rec.status, "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": rec.completion_tokens, "policy": rec.policy, "error": rec.error,
            "duration_ms": round((time.time() - rec.started) * 1000, 1)}


class Appender:
    """Appends records to the log in `directory`, beside other processes doing the same (see above)."""

    def __init__(self, directory: str | Path, max_file_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._fd: int | None = None
        self._path: Path | None = None
        self._known: tuple[int, int, str] | None = None  # (inode, size, last hash) as this writer left it
        self._unsynced = False
        self.repairs = 0

    def append(self, records: list[dict[str, Any]]) -> None:
        """Seal and write `records` in order, under the lock; not yet fsynced (see `sync`)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            prev, size = self._tail()
            out = bytearray()
            for record in records:
                sealed = seal(record, prev)
                line = line_of(sealed)
                if size + len(out) + len(line) > self.max_file_bytes and size + len(out) > 0:
                    self._write(bytes(out))
                    size = self._rotate()
                    out = bytearray()
                out += line
                prev = sealed["hash"]
            self._write(bytes(out))
            assert self._fd is not None
            self._known = (os.fstat(self._fd).st_ino, size + len(out), prev)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def sync(self) -> None:
        """fsync what this writer appended (the batches since the last sync)."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False

    def close(self) -> None:
        self.sync()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._lock_fd)

    # --- under the lock ---

    def _tail(self) -> tuple[str, int]:
        """(the hash to chain after, the newest file's size), repairing a torn tail first."""
        files = log_files(self.directory)
        if not files:
            self._open(self.directory / file_name(1))
            return GENESIS, 0
        path = files[-1]
        if path != self._path:
            self._open(path)
        assert self._fd is not None
        stat = os.fstat(self._fd)
        if self._known is not None and self._known[:2] == (stat.st_ino, stat.st_size):
            return self._known[2], stat.st_size
        last, complete = last_complete(path)
        if complete < stat.st_size:
            dropped = stat.st_size - complete
            os.ftruncate(self._fd, complete)
            self.repairs += 1
            log.warning("audit: %s ended in a torn line (a writer was killed mid-write); truncated %d bytes",
                        path.name, dropped)
        if last is None and complete > 0:
            log.error("audit: the last line of %s is damaged; chaining after GENESIS (verify will report it)",
                      path.name)
        elif last is None:  # an empty file: the chain goes on from the file before it
            last = self._previous_hash(files[:-1])
        prev = last or GENESIS
        if complete < stat.st_size:
            repair = seal({"time": now_iso(), "route": "audit.repair", "method": "INTERNAL", "status": 0,
                           "error": "torn_tail", "file": path.name, "dropped_bytes": dropped}, prev)
            line = line_of(repair)
            self._write(line)
            return repair["hash"], complete + len(line)
        return prev, complete

    def _previous_hash(self, files: list[Path]) -> str | None:
        for path in reversed(files):
            last, complete = last_complete(path)
            if last is not None:
                return last
            if complete > 0:
                return None
        return None

    def _open(self, path: Path) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._path = path
        self._known = None
        self._sync_directory()

    def _rotate(self) -> int:
        """Start the next file (the current one is fsynced first, so a finished file is durable)."""
        assert self._path is not None
        self._open(self.directory / file_name(file_number(self._path) + 1))
        return 0

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if data:
            self._unsynced = True

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AuditLog:
    """The server's writer: `write` (any thread, never blocks) queues; one thread appends and fsyncs."""

    def __init__(self, directory: str | Path, max_file_bytes: int, fsync_interval_ms: int) -> None:
        self.appender = Appender(directory, max_file_bytes)
        self.interval = fsync_interval_ms / 1000.0
        self.lost = 0  # records that could not be written (disk full, ...), each one logged
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inferflux-audit", daemon=True)
        self._thread.start()

    @property
    def directory(self) -> Path:
        return self.appender.directory

    def write(self, record: dict[str, Any]) -> None:
        self._queue.put(record)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call is written and fsynced (False on timeout)."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write and fsync what is queued, then stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        last_sync = time.monotonic()
        while True:
            wait = None if not self.appender._unsynced else max(0.0, self.interval - (time.monotonic() - last_sync))
            try:
                batch = [self._queue.get(timeout=wait)]
            except queue.Empty:
                last_sync = self._sync(last_sync)
                continue
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [item for item in batch if isinstance(item, dict)]
            if records:
                try:
                    self.appender.append(records)
                except OSError:
                    self.lost += len(records)
                    log.exception("audit: %d records could not be written to %s", len(records), self.directory)
            markers = [item for item in batch if not isinstance(item, dict)]
            if markers or self.interval == 0 or time.monotonic() - last_sync >= self.interval:
                last_sync = self._sync(last_sync)
            for marker in markers:
                if isinstance(marker, threading.Event):
                    marker.set()
            if _STOP in markers:
                self.appender.close()
                return

    def _sync(self, last_sync: float) -> float:
        try:
            self.appender.sync()
        except OSError:
            log.exception("audit: fsync of %s failed", self.directory)
            return last_sync
        return time.monotonic()


def audit_directory(config: Config) -> Path:
    return config.home_path / "audit"


def install(app: Any, config: Config) -> AuditLog | None:
    """Write one audit record per request of `app` (with `audit.enabled`); closed when serving ends."""
    if not config.audit.enabled:
        return None
    from quart import g

    from inferflux.server import record

    writer = AuditLog(audit_directory(config), config.audit.max_file_bytes, config.audit.fsync_interval_ms)
    app.extensions[EXTENSION] = writer

    def audit_request(rec: RequestRecord) -> None:
        writer.write(request_entry(rec))

    record.add_finish_hook(app, audit_request)

    # The principal auth decided (`g.principal`, set by its hook, registered before this one) onto the
    # record, which outlives the request context when a stream ends after the response.
    async def note_principal() -> None:
        rec = record.current()
        if rec is not None and rec.principal is None:
            rec.principal = g.get("principal")

    app.before_request(note_principal)
    app.before_websocket(note_principal)

    @app.after_serving
    async def close_audit_log() -> None:
        writer.close()

    atexit.register(writer.close)
    return writer


@contextlib.contextmanager
def audited_cli(command: str, args: dict[str, Any], config: Config | None = None) -> Iterator[None]:
    """Record one local admin command (`inferctl admin ...` without `--url`): what it acted on, how it ended.

    Appended and fsynced straight away (no thread: the process is about to exit), under the same lock
    as a running server's writer. The record's `status` is the command's exit status (0 or 1).
    """
    if config is None:
        from inferflux.config import load_config

        config = load_config()
    status, error = 0, None
    try:
        yield
    except BaseException as exc:
        status, error = 1, getattr(exc, "code", None) if isinstance(getattr(exc, "code", None), str) else \
            type(exc).__name__
        raise
    finally:
        if config.audit.enabled:
            try:
                user = getpass.getuser()
            except (KeyError, OSError):
                user = str(os.getuid())
            entry = {"time": now_iso(), "request_id": "cli_" + secrets.token_hex(12), "tenant": None,
                     "key_id": None, "route": f"inferctl {command}", "method": "CLI", "actor": f"local:{user}",
                     "subject": {k: args[k] for k in _SUBJECT_ARGS if args.get(k) is not None},
                     "status": status, "error": error, "model": None, "adapter": None, "policy": None,
                     "prompt_tokens": 0, "completion_tokens": 0}
            appender = Appender(audit_directory(config), config.audit.max_file_bytes)
            try:
                appender.append([entry])
            finally:
                appender.close()


__all__ = ["EXTENSION", "Appender", "AuditLog", "audit_directory", "audited_cli", "install", "now_iso",
           "request_entry"]
