"""`GET /admin/audit?limit=N&tenant=T` (the last records) and `GET /admin/audit/verify` (the chain), `admin` scope.

Registered on the `access` blueprint by `access/admin.py` (endpoints `access.list_audit`,
`access.verify_audit`). The server's queued records are flushed first, so an admin sees every
request that finished before theirs; the files are read in a worker thread, never on the event loop.
`verify` is the route behind `inferctl admin audit verify --url`: the same check as the local form, on
the log of the machine the server runs on, for an admin who cannot log into it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from quart import current_app, request

from inferflux.server.access.audit_chain import Problem, tail, verify
from inferflux.server.access.audit_log import EXTENSION, AuditLog, audit_directory
from inferflux.server.errors import APIError
from inferflux.server.openapi import documented

MAX_LIMIT = 1000


def _directory() -> tuple[AuditLog | None, Path]:
    writer: AuditLog | None = current_app.extensions.get(EXTENSION)
    if writer is not None:
        return writer, writer.directory
    return None, audit_directory(current_app.extensions["inferflux"].config)


@documented(summary="The last audit records (oldest first), optionally one tenant's")
async def list_audit() -> Any:
    """The last `limit` (default 100, at most 1000) audit records, only `tenant`'s when given."""
    text = request.args.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise APIError(400, f"limit {text!r}: expected a whole number from 1 to {MAX_LIMIT}",
                       type="invalid_request_error", param="limit", code="invalid_limit")
    tenant = request.args.get("tenant") or None
    writer, directory = _directory()
    if writer is not None:
        await asyncio.to_thread(writer.flush, 5.0)
    records = await asyncio.to_thread(tail, directory, int(text), tenant)
    return {"object": "list", "data": records, "enabled": writer is not None}


def _problem(problem: Problem | None) -> dict[str, Any] | None:
    return None if problem is None else {"file": problem.file, "line": problem.line, "reason": problem.why}


@documented(summary="Verify the server's audit hash chain (the first bad file and line, or none)")
async def verify_audit() -> Any:
    """Re-hash every record of the server's log in order: `{ok, records, files, first_bad, torn, last_hash}`.

    A 200 either way (the check ran; `ok` says how it came out), so a client tells "the chain is broken"
    from "could not ask". A record being appended while the check reads reads as a torn final line,
    which is reported and, as in the local form, does not fail the check. 404 when there is no log.
    """
    writer, directory = _directory()
    if writer is None and not directory.is_dir():
        raise APIError(404, f"no audit log on this server (audit.enabled writes it to {directory.name}/ "
                       "under $INFERFLUX_HOME)", type="invalid_request_error", code="no_audit_log")
    if writer is not None:
        await asyncio.to_thread(writer.flush, 5.0)
    verdict = await asyncio.to_thread(verify, directory)
    return {"ok": verdict.ok, "records": verdict.records, "files": verdict.files,
            "first_bad": _problem(verdict.problem), "torn": _problem(verdict.torn), "last_hash": verdict.last_hash,
            "enabled": writer is not None}
