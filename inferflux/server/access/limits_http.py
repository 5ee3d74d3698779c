"""Tenant limits on the request path, and `/admin/limits` (docs/security.md, "Limits").

Where admission happens: in the one generation path (`Generation.start`, once the prompts are
encoded and `max_tokens` resolved, before anything is submitted) and the one embedding path
(`embed`, once the inputs are tokenized), because only there is the worst-case token count known.
Those two calls take the request (RPM), a concurrency slot and the tokens in one atomic step
(`limits.py`); a refusal is a `RateLimited` (429) raised before the engine sees the request. Routes
that never reach the model (listing models, tokenizing) are not counted.

The reservation rides on the request's record (`record.extras["limits"]`); the finish hook, which
runs once when the response and any streamed body have ended, reconciles it with the real usage.
The `max_tokens` cap CLAMPS: a request asking for more (or giving none) gets the cap, as if it had
asked for it, rather than a 400, so clients that always send a large max_tokens keep working.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Quart, Response, current_app

from inferflux.server import record
from inferflux.server.access.admin import bp
from inferflux.server.access.errors import NotFoundError
from inferflux.server.access.limits import MAX_VALUE, Limiter, Reservation, check_tenant, open_limiter
from inferflux.server.http import json_body, validate
from inferflux.server.openapi import documented

log = logging.getLogger(__name__)
_EXTENSION = "inferflux.limits"
_EXTRA = "limits"


def limiter(app: Quart | None = None) -> Limiter:
    """The app's limiter, opened on first use."""
    app = app or current_app
    found = app.extensions.get(_EXTENSION)
    if found is None:
        config = app.extensions["inferflux"].config
        found = app.extensions[_EXTENSION] = open_limiter(config.state.backend, config.state.redis_url,
                                                          config.home_path)
    return found


def install(app: Quart) -> None:
    """Reconcile every admitted request when it ends, and send `x-ratelimit-*` on limited answers."""

    def reconcile(entry: record.RequestRecord) -> None:
        # Left on the record (not popped): the header hook may run after the record has finished.
        reservation: Reservation | None = entry.extras.get(_EXTRA)
        if reservation is not None:
            limiter(app).reconcile(reservation, entry.prompt_tokens + entry.completion_tokens)

    record.add_finish_hook(app, reconcile)

    @app.after_request
    async def rate_limit_headers(response: Response) -> Response:
        entry = record.current()
        reservation = entry.extras.get(_EXTRA) if entry is not None else None
        if reservation is not None:
            response.headers.update(reservation.headers())
        return response


def _tenant() -> tuple[record.RequestRecord, str] | None:
    entry = record.current()
    tenant = entry.tenant if entry is not None else None
    return None if entry is None or tenant is None else (entry, tenant)


def _reserve(entry: record.RequestRecord, tenant: str, tokens: int) -> None:
    """Take `tokens` (and, the first time in a request, the request and a slot) or raise RateLimited."""
    previous: Reservation | None = entry.extras.get(_EXTRA)
    if previous is None:
        reservation = limiter().admit(tenant, tokens)
        if reservation is not None:
            entry.extras[_EXTRA] = reservation
        return
    # A second admission in one request (none does that today) adds tokens only.
    more = limiter().admit(tenant, tokens, requests=0, slot=False)
    if more is not None:
        previous.tokens += more.tokens
        previous.tokens_used, previous.reset = more.tokens_used, more.reset


def admit_generation(requests: list[Any], n: int) -> list[Any]:
    """Clamp each engine request's max_tokens to the tenant's cap, then reserve prompt + n * max_tokens."""
    found = _tenant()
    if found is None:
        return requests
    limits = limiter().get(found[1])
    if limits is None:
        return requests  # a tenant without limits
    cap = limits.max_tokens
    if cap:
        requests = [r if r.params.max_tokens <= cap else
                    dataclasses.replace(r, params=dataclasses.replace(r.params, max_tokens=cap)) for r in requests]
    _reserve(*found, sum(len(r.prompt_ids) + n * r.params.max_tokens for r in requests))
    return requests


def admit_tokens(tokens: int) -> None:
    """Reserve `tokens` (an embedding request's input tokens: it generates none)."""
    found = _tenant()
    if found is not None:
        _reserve(*found, tokens)


# --- /admin/limits ---


class LimitsBody(BaseModel):
    """Limits to set: each one given replaces the tenant's; one left out is kept; 0 removes it."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=0, le=MAX_VALUE)
    tpm: int | None = Field(None, ge=0, le=MAX_VALUE)
    concurrency: int | None = Field(None, ge=0, le=MAX_VALUE)
    max_tokens: int | None = Field(None, ge=0, le=MAX_VALUE)


@bp.get("/admin/limits")
async def list_limits() -> Any:
    """Every tenant's limits (tenants without a row are unlimited)."""
    return {"object": "list", "data": [lim.public(t) for t, lim in limiter().all().items()]}


@bp.get("/admin/limits/<tenant>")
async def get_limits(tenant: str) -> Any:
    """One tenant's limits and this window's usage (requests, tokens used or reserved, requests running)."""
    limits = limiter().get(check_tenant(tenant))
    if limits is None:
        raise NotFoundError(f"tenant {tenant!r} has no limits (`inferctl admin limits set {tenant} --rpm N`)")
    return {**limits.public(tenant), "usage": limiter().usage(tenant)}


@bp.put("/admin/limits/<tenant>")
@documented(LimitsBody, "Set a tenant's limits (rpm, tpm, concurrency, max_tokens; 0 = no limit)")
async def set_limits(tenant: str) -> Any:
    body = validate(LimitsBody, await json_body())
    from inferflux.server.access.auth import key_store

    key_store().tenant(check_tenant(tenant))  # 404 for a tenant that does not exist
    limits = limiter().set(tenant, body.model_dump())
    log.info("limits of tenant %s set: %s", tenant, limits)
    return limits.public(tenant)


@bp.delete("/admin/limits/<tenant>")
async def delete_limits(tenant: str) -> Any:
    """Remove a tenant's limits: it is unlimited from its next request."""
    if not limiter().delete(check_tenant(tenant)):
        raise NotFoundError(f"tenant {tenant!r} has no limits")
    log.info("limits of tenant %s removed", tenant)
    return {"tenant": tenant, "deleted": True}
