"""`/admin/tenants` and `/admin/keys`: the key store over HTTP (JSON, `admin` scope).

The same operations as `inferctl admin tenants|keys` on a local `$INFERFLUX_HOME` (the CLI calls
these routes when given `--url`). A created key is in the creation answer only; lists show key ids.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict
from quart import Blueprint, request

from inferflux.server.access.audit_api import list_audit, verify_audit
from inferflux.server.access.auth import key_store
from inferflux.server.access.keys import parse_duration
from inferflux.server.errors import APIError
from inferflux.server.http import json_body, validate
from inferflux.server.openapi import documented

bp = Blueprint("access", __name__)
bp.add_url_rule("/admin/audit", view_func=list_audit, methods=["GET"])  # access.list_audit
bp.add_url_rule("/admin/audit/verify", view_func=verify_audit, methods=["GET"])  # access.verify_audit
ERROR_SHAPE = APIError.body
log = logging.getLogger(__name__)


class CreateTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    scopes: list[str] | str  # a list, or comma-separated
    expires: str | None = None  # a duration: 30d, 12h, 90m
    name: str = ""


@bp.get("/admin/tenants")
async def list_tenants() -> Any:
    """Every tenant with its number of keys."""
    return {"object": "list", "data": key_store().tenants()}


@bp.post("/admin/tenants")
@documented(CreateTenant, "Create a tenant")
async def create_tenant() -> Any:
    body = validate(CreateTenant, await json_body())
    tenant = key_store().create_tenant(body.name)
    log.info("tenant %s created", body.name)
    return tenant


@bp.delete("/admin/tenants/<name>")
async def delete_tenant(name: str) -> Any:
    """Delete a tenant and every key it has."""
    key_store().delete_tenant(name)
    log.info("tenant %s deleted", name)
    return {"name": name, "deleted": True}


@bp.get("/admin/keys")
async def list_keys() -> Any:
    """Every key (or one tenant's, `?tenant=T`): ids, scopes, expiry, revocation, last use; never the key."""
    keys = key_store().keys(request.args.get("tenant"))
    return {"object": "list", "data": [k.public() for k in keys]}


@bp.post("/admin/keys")
@documented(CreateKey, "Create an API key (the answer is the only time the key is shown)")
async def create_key() -> Any:
    body = validate(CreateKey, await json_body())
    expires_in = parse_duration(body.expires) if body.expires else None
    secret, record = key_store().create_key(body.tenant, body.scopes, expires_in, body.name)
    log.info("key %s created for tenant %s (scopes %s)", record.id, record.tenant, ",".join(record.scopes))
    return {**record.public(), "key": secret}


@bp.post("/admin/keys/<key_id>/revoke")
async def revoke_key(key_id: str) -> Any:
    """Revoke a key: it fails from the next request on, and stays listed as revoked."""
    record = key_store().revoke(key_id)
    log.info("key %s revoked", key_id)
    return record.public()


from inferflux.server.access import limits_http  # noqa: E402,F401  (its /admin/limits routes on `bp`)
from inferflux.server.policy import admin as _policy_admin  # noqa: E402,F401  (/admin/policies on `bp`)
