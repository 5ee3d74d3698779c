"""`/admin/policies`: the versioned policy documents over HTTP (JSON, `admin` scope).

The same operations as `inferctl admin policy list|show|set|rollback` on the local store (the CLI
calls these routes with `--url`). Each change is a new `policy_version`; the request that made it
is in the audit log with its key id, and its record's `policy` field names the change
(`set <scope>@v<N>`, `rollback <scope>@v<N>`), so who changed what, when, is one `inferctl admin audit tail` away.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import request

from inferflux.server import record
from inferflux.server.access.admin import bp
from inferflux.server.errors import bad_request
from inferflux.server.http import json_body, validate
from inferflux.server.openapi import documented
from inferflux.server.policy.document import PolicyDocument, check_scope, parse_document
from inferflux.server.policy.guard import set_version_metric
from inferflux.server.policy.hooks import runtime

log = logging.getLogger(__name__)


class SetPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: str  # global, TENANT or TENANT:MODEL
    document: PolicyDocument


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**62)  # SQLite integers are 64-bit


def _actor() -> str:
    rec = record.current()
    return f"key:{rec.key_id}" if rec is not None and rec.key_id else "local"


def _changed(row: dict[str, Any], what: str) -> dict[str, Any]:
    rec = record.current()
    if rec is not None:
        rec.policy = f"{what} {row['scope']}@v{row['version']}"  # the first word is the metric's label
    set_version_metric(runtime().refresh())
    log.info("policy %s: scope %s is version %d", what, row["scope"], row["version"])
    return row


@bp.get("/admin/policies")
async def list_policies() -> Any:
    """Each scope's current document and version, and the global policy_version (`?history=1`: every version)."""
    store = runtime().store
    rows = store.history(request.args.get("scope")) if request.args.get("history") else list(store.current().values())
    return {"object": "list", "policy_version": store.version(), "data": rows}


@bp.get("/admin/policies/<path:scope>")
async def get_policy(scope: str) -> Any:
    """One scope's current document (404 when it has none) and its history."""
    store = runtime().store
    current = store.current().get(check_scope(scope))
    if current is None:
        from inferflux.server.errors import not_found

        raise not_found(f"scope {scope!r} has no policy (`inferctl admin policy set FILE` writes one)")
    return {**current, "history": [r["version"] for r in store.history(scope)]}


@bp.put("/admin/policies")
@documented(SetPolicy, "Set the policy document of a scope (global, TENANT or TENANT:MODEL): a new policy_version")
async def set_policy() -> Any:
    data = await json_body()
    if not isinstance(data, dict):
        raise bad_request("expected a JSON object {scope, document}")
    document = parse_document(data.get("document", {}))
    body = validate(SetPolicy, {**data, "document": document.model_dump()})
    row = runtime().store.put(check_scope(body.scope), document.model_dump(exclude_defaults=True), _actor())
    return _changed(row, "set")


@bp.post("/admin/policies/rollback")
@documented(Rollback, "Make an earlier policy version current again (written as a new policy_version)")
async def rollback_policy() -> Any:
    body = validate(Rollback, await json_body())
    store = runtime().store
    old = store.get(body.version)
    row = store.put(old["scope"], old["document"], _actor())
    return _changed(row, "rollback")


__all__ = ["bp"]
