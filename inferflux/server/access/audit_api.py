"""`GET /admin/audit?limit=N&tenant=T`: the last audit records as JSON (`admin` scope).

Registered on the `access` blueprint by `access/admin.py` (endpoint `access.list_audit`). The
server's queued records are flushed first, so an admin sees every request that finished before
theirs; the files are read in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from quart import current_app, request

from inferflux.server.access.audit_chain import tail
from inferflux.server.access.audit_log import EXTENSION, AuditLog, audit_directory
from inferflux.server.errors import APIError
from inferflux.server.openapi import documented

MAX_LIMIT = 1000


@documented(summary="The last audit records (oldest first), optionally one tenant's")
async def list_audit() -> Any:
    """The last `limit` (default 100, at most 1000) audit records, only `tenant`'s when given."""
    text = request.args.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise APIError(400, f"limit {text!r}: expected a whole number from 1 to {MAX_LIMIT}",
                       type="invalid_request_error", param="limit", code="invalid_limit")
    tenant = request.args.get("tenant") or None
    writer: AuditLog | None = current_app.extensions.get(EXTENSION)
    directory = writer.directory if writer is not None else audit_directory(current_app.extensions["inferflux"].config)
    if writer is not None:
        await asyncio.to_thread(writer.flush, 5.0)
    records = await asyncio.to_thread(tail, directory, int(text), tenant)
    return {"object": "list", "data": records, "enabled": writer is not None}
