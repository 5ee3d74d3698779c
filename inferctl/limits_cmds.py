"""`inferctl admin limits set|list|show|clear`: per-tenant limits, local or on a running server.

Without `--url` the commands open the local store `state.backend` names (`$INFERFLUX_HOME/state.db`,
or the Redis at `state.redis_url`), which a running server reads at each request; with `--url` (or
INFERFLUX_URL) they call `/admin/limits` with an `admin`-scoped key (`--api-key`/INFERFLUX_API_KEY).
"""

from __future__ import annotations

import json as jsonlib
import os
from typing import Any

from inferflux.errors import InferFluxError

LIMIT_VERBS = ("set", "list", "show", "clear")


def _call(action: str, url: str | None, api_key: str | None, tenant: str = "",
          changes: dict[str, int | None] | None = None) -> Any:
    url = url or os.environ.get("INFERFLUX_URL")
    if url:
        return _remote(action, url, api_key or os.environ.get("INFERFLUX_API_KEY"), tenant, changes)
    from inferflux.config import load_config
    from inferflux.server.access.keys_redis import open_key_store
    from inferflux.server.access.limits import open_limiter

    config = load_config()
    limiter = open_limiter(config.state.backend, config.state.redis_url, config.home_path)
    if action == "list":
        return [lim.public(t) for t, lim in limiter.all().items()]
    if action == "set":
        open_key_store(config).tenant(tenant)  # a tenant that does not exist is an error, as on the server
        return limiter.set(tenant, changes or {}).public(tenant)
    limits = limiter.get(tenant)
    if limits is None:
        raise InferFluxError(f"tenant {tenant!r} has no limits")
    if action == "clear":
        limiter.delete(tenant)
        return {"tenant": tenant, "deleted": True}
    return {**limits.public(tenant), "usage": limiter.usage(tenant)}


def _remote(action: str, url: str, api_key: str | None, tenant: str, changes: dict[str, int | None] | None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    method, path = {"list": ("GET", "/admin/limits"), "show": ("GET", f"/admin/limits/{tenant}"),
                    "set": ("PUT", f"/admin/limits/{tenant}"), "clear": ("DELETE", f"/admin/limits/{tenant}")}[action]
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0) as http:
        response = http.request(method, path, json=changes if action == "set" else None)
    data = response.json() if response.content else {}
    if response.status_code >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        raise InferFluxError(f"{url.rstrip('/')}{path}: {response.status_code} {message or response.text}")
    return data.get("data", data) if isinstance(data, dict) and data.get("object") == "list" else data


def _line(limits: dict[str, Any]) -> str:
    return "  ".join(f"{k}={limits[k] or '-'}" for k in ("rpm", "tpm", "concurrency", "max_tokens"))


class LimitsAdmin:
    """The `admin limits` verbs (a base of `admin_cmds.Admin`)."""

    def limits_set(self, tenant: str, rpm: int | None = None, tpm: int | None = None, concurrency: int | None = None,
                   max_tokens: int | None = None, url: str | None = None, api_key: str | None = None) -> None:
        """Set a tenant's limits; a limit not given keeps its value, 0 removes it.

        Args:
            tenant TENANT: the tenant
            rpm N: requests per minute
            tpm N: tokens per minute (prompt + completion; a request reserves prompt + max_tokens)
            concurrency N: requests running at once
            max_tokens N: the most tokens one request may generate (larger requests are clamped to it)
            url URL: a running server instead of the local store (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        changes = {"rpm": rpm, "tpm": tpm, "concurrency": concurrency, "max_tokens": max_tokens}
        limits = _call("set", url, api_key, tenant, {k: v for k, v in changes.items() if v is not None})
        print(f"limits of {tenant}: {_line(limits)}")

    def limits_list(self, url: str | None = None, api_key: str | None = None, json: bool = False) -> None:  # noqa: A002
        """List every tenant's limits (a tenant not listed is unlimited).

        Args:
            url URL: a running server instead of the local store (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
            json: print JSON
        """
        rows = _call("list", url, api_key)
        if json:
            print(jsonlib.dumps(rows, indent=2))
            return
        for limits in rows:
            print(f"{limits['tenant']}  {_line(limits)}")

    def limits_show(self, tenant: str, url: str | None = None, api_key: str | None = None,
                    json: bool = False) -> None:  # noqa: A002
        """Show a tenant's limits and this minute's usage.

        Args:
            tenant TENANT: the tenant
            url URL: a running server instead of the local store (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
            json: print JSON
        """
        shown = _call("show", url, api_key, tenant)
        if json:
            print(jsonlib.dumps(shown, indent=2))
            return
        usage = shown["usage"]
        print(f"{tenant}  {_line(shown)}")
        print(f"this minute: {usage['requests']} requests, {usage['tokens']} tokens; {usage['in_flight']} running; "
              f"resets in {usage['reset_seconds']:.0f}s")

    def limits_clear(self, tenant: str, url: str | None = None, api_key: str | None = None) -> None:
        """Remove a tenant's limits (it is unlimited from its next request).

        Args:
            tenant TENANT: the tenant
            url URL: a running server instead of the local store (default INFERFLUX_URL)
            api_key KEY: an admin-scoped key for --url (default INFERFLUX_API_KEY)
        """
        _call("clear", url, api_key, tenant)
        print(f"cleared the limits of {tenant}")
