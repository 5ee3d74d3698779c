"""Operations routes: liveness, readiness, Prometheus metrics, and (when enabled) live reload."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict
from quart import Blueprint, Response, current_app

from inferflux.config import load_config
from inferflux.errors import InferFluxError
from inferflux.server.adapter_load import refresh_lora_info
from inferflux.server.errors import APIError, bad_request
from inferflux.server.handle import load_handle
from inferflux.server.http import read_body, server_state
from inferflux.server.openapi import documented, openapi_document

bp = Blueprint("ops", __name__)
admin_bp = Blueprint("admin", __name__)
ERROR_SHAPE = APIError.body


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # a path; None = re-read the config file only
    served_model_name: str | None = None


@bp.get("/openapi.json")
async def openapi() -> Any:
    """This server's OpenAPI 3.1 document: every route of every dialect, bodies from their pydantic models."""
    return openapi_document(current_app)


@bp.get("/healthz")
async def healthz() -> Any:
    """200 while the process and the engine's step loop are alive."""
    alive = server_state().healthy
    return ({"status": "ok"}, 200) if alive else ({"status": "engine stopped"}, 503)


@bp.get("/readyz")
async def readyz() -> Any:
    """200 when the server is not draining and every loaded engine runs (others load on first use)."""
    state = server_state()
    if state.draining:
        return {"status": "draining"}, 503
    return ({"status": "ready"}, 200) if state.ready else ({"status": "not ready"}, 503)


@bp.get("/metrics")
@documented(summary="Prometheus metrics", content="text/plain")
async def metrics() -> Response:
    state = server_state()
    state.metrics.update_engine(state.pool.stats())
    state.metrics.set_models_loaded(len(state.pool.loaded()))
    await refresh_lora_info(state)
    payload, content_type = state.metrics.render()
    return Response(payload, content_type=content_type)


@admin_bp.post("/admin/reload")
@documented(ReloadRequest, "Reload the config file and/or swap in another model")
async def reload() -> Any:
    """Re-read the config file (live keys), and/or load another model and swap it in without downtime."""
    state = server_state()
    req = await read_body(ReloadRequest, model_keys=())
    if state.config_path:
        fresh = load_config(state.config_path)
        state.config.server = fresh.server  # names, limits, defaults change live
    if req.model is None:
        state.pool.rename_default(state.config)
        return {"status": "reloaded", "model": state.default_name}
    try:
        new = await asyncio.to_thread(load_handle, state.config, req.model, req.served_model_name)
    except InferFluxError as exc:
        raise bad_request(str(exc), param="model") from None
    except OSError as exc:
        raise APIError(400, f"cannot load {req.model}: {exc}", param="model") from None
    previous = state.default_name
    await state.swap(new)
    return {"status": "reloaded", "model": new.name, "previous": previous}
