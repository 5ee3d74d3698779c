"""The SDK's routes: `GET /lmstudio-greeting` (its probe) and one websocket per namespace.

Access: with `security.auth: required` a namespace's websocket needs a key with its scope (`/llm`
inference, `/embedding` embeddings, `/system` models:read; server/access/scopes.py). The stock SDK
sends no HTTP headers, so the key may come in its handshake instead: the `clientPasskey` is checked
as an API key (`Bearer` / `x-api-key` headers work too, for clients that can set them). A refused
handshake is the SDK's `Authentication failed` error naming why.
"""

from __future__ import annotations

import asyncio
from typing import Any

from quart import current_app, g, websocket

from inferflux.server import record
from inferflux.server.access.auth import authorize, key_store
from inferflux.server.http import server_state
from inferflux.server.lmstudio_sdk import bp
from inferflux.server.lmstudio_sdk.embedding import embedding_endpoints
from inferflux.server.lmstudio_sdk.framing import Json, Session, sdk_error
from inferflux.server.lmstudio_sdk.llm import llm_endpoints
from inferflux.server.lmstudio_sdk.models import model_endpoints
from inferflux.server.lmstudio_sdk.system import system_endpoints
from inferflux.server.openapi import documented


@bp.get("/lmstudio-greeting")
@documented(None, "LM Studio SDK probe")
async def greeting() -> Any:
    """What `lms.Client` probes before it connects: `{"lmstudio": true}` means an LM Studio API server."""
    return {"lmstudio": True, "version": "0.3.0", "server": "inferflux"}


async def _authenticate(hello: Json) -> Json | None:
    """None when the client may go on (auth off, or a key in the headers or the passkey), else the error."""
    state = server_state()
    if state.config.security.auth != "required" or g.get("principal") is not None:
        return None
    passkey = hello.get("clientPasskey")
    endpoint = websocket.url_rule.endpoint if websocket.url_rule is not None else ""
    try:
        principal = await asyncio.to_thread(
            authorize, key_store(), endpoint, {"Authorization": f"Bearer {passkey}"} if isinstance(passkey, str)
            else {}, state.config.security.public_metrics, current_app.extensions.get("inferflux.oidc"))
    except Exception as exc:  # noqa: BLE001 - a refused handshake, answered in the SDK's shape
        return sdk_error(exc)
    g.principal = principal
    entry = record.current()
    if entry is not None:
        entry.principal = principal
    return None


async def _serve(namespace: str, endpoints: tuple[dict[str, Any], dict[str, Any]],
                 *more: tuple[dict[str, Any], dict[str, Any]]) -> None:
    rpcs, channels = dict(endpoints[0]), dict(endpoints[1])
    for extra_rpcs, extra_channels in more:
        rpcs.update(extra_rpcs)
        channels.update(extra_channels)
    await Session(namespace, rpcs, channels, _authenticate).run()


@bp.websocket("/llm")
async def llm() -> None:
    await _serve("llm", model_endpoints("llm"), llm_endpoints())


@bp.websocket("/embedding")
async def embedding() -> None:
    await _serve("embedding", model_endpoints("embedding"), embedding_endpoints())


@bp.websocket("/system")
async def system() -> None:
    await _serve("system", system_endpoints())


@bp.websocket("/<any(files, repository, plugins, diagnostics, runtime):namespace>")
async def unserved(namespace: str) -> None:
    """The SDK's other namespaces: the handshake succeeds and every call is an error naming the endpoint."""
    await _serve(namespace, ({}, {}))
