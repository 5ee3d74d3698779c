"""`/api/tags`, `/api/ps` and `/api/show`: what the server's models are, from their `ModelFacts`.

Facts come from the store's manifests (recorded at pull) and from loaded handles, so listing reads no
model file; only `/api/show`'s `model_info` for a model that is not loaded reads its headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from inferflux.engine import device
from inferflux.errors import InferFluxError
from inferflux.formats.describe import ModelFacts, capabilities, describe_model, model_facts
from inferflux.formats.gguf_file import GGUFFile
from inferflux.server.handle import ModelHandle
from inferflux.server.http import read_body, server_state
from inferflux.server.keep_alive import FOREVER
from inferflux.server.model_pool import Listed, Target, tagged
from inferflux.server.ollama import bp
from inferflux.server.ollama.bodies import ShowRequest
from inferflux.server.ollama.overrides import modelfile_lines, overrides_for, parameters_text
from inferflux.server.openapi import documented
from inferflux.store import ModelEntry

FAR_FUTURE = "2318-01-01T00:00:00Z"


def rfc3339(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_stat_cache: dict[tuple[str, int, float], dict[str, Any]] = {}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def _details(facts: ModelFacts | None, fmt: str = "", arch: str | None = None, parameter_size: str | None = None,
             quantization: str | None = None) -> dict[str, Any]:
    """Ollama's `details` from a model's facts (or from a manifest's fields when its headers were unreadable)."""
    if facts is not None:
        fmt, arch, parameter_size, quantization = (facts.format, facts.architecture, facts.parameter_size,
                                                   facts.quantization)
    arch = arch or "unknown"
    return {"parent_model": "", "format": fmt, "family": arch, "families": [arch],
            "parameter_size": parameter_size or "", "quantization_level": quantization or ""}


def path_facts(path: Path, facts: ModelFacts | None = None) -> dict[str, Any]:
    """size, mtime, digest and details of a model given by path (the served one), from a stat of its files and
    its `ModelFacts` (those of the loaded handle when given; else its headers, once per version). Blocking."""
    path = Path(path)
    files = _files(path)
    size = sum(f.stat().st_size for f in files)
    mtime = max((f.stat().st_mtime for f in files), default=time.time())
    key = (str(path), size, mtime)
    if facts is None and key in _stat_cache:
        return _stat_cache[key]
    if facts is None:
        with contextlib.suppress(InferFluxError, OSError):
            facts = model_facts(path)
    listed = {
        "size": size, "modified_at": rfc3339(mtime),
        "digest": hashlib.sha256(f"{path}\0{size}\0{mtime}".encode()).hexdigest(),
        "details": _details(facts, "gguf" if path.is_file() else "safetensors"), "facts": facts,
    }
    _stat_cache[key] = listed
    return listed


def entry_facts(entry: ModelEntry) -> dict[str, Any]:
    """The same fields for a stored model, from its manifest (no model file is read)."""
    return {"size": entry.size, "modified_at": rfc3339(entry.modified.timestamp()), "digest": entry.digest,
            "details": _details(entry.facts, entry.format, entry.architecture, entry.parameter_size,
                                entry.quantization), "facts": entry.facts}


def _listing() -> tuple[list[Listed], dict[str, Any]]:
    """The listed names, and each name's facts (blocking: reads manifests, and stats the served model's files)."""
    pool = server_state().pool
    rows = pool.names()
    default = pool.default_handle()
    facts: dict[str, Any] = {}
    for row in rows:
        if row.stored is not None:
            facts[row.name] = entry_facts(row.stored)
        else:
            facts[row.name] = path_facts(pool.default.path, default.facts if default is not None else None)
    return rows, facts


@bp.get("/api/tags")
async def api_tags() -> Any:
    """The models this server can answer for, with their details."""
    rows, facts = await asyncio.to_thread(_listing)
    return {"models": [{"name": tagged(row.name), "model": tagged(row.name), **{
        key: facts[row.name][key] for key in ("modified_at", "size", "digest", "details")}} for row in rows]}


@bp.get("/api/ps")
async def api_ps() -> Any:
    """The models loaded now, with when each unloads."""
    pool = server_state().pool
    rows, listed = await asyncio.to_thread(_listing)
    on_device = device.backend() != "cpu"
    models = []
    for handle in pool.loaded():
        facts: dict[str, Any] = listed[handle.name] if handle.name in listed else \
            await asyncio.to_thread(path_facts, handle.path, handle.facts)
        expires = pool.expires_at(handle)
        models.append({"name": tagged(handle.name), "model": tagged(handle.name), "size": facts["size"],
                       "digest": facts["digest"], "details": facts["details"],
                       "expires_at": FAR_FUTURE if expires == FOREVER else rfc3339(expires),
                       "size_vram": facts["size"] if on_device else 0, "context_length": handle.max_model_len})
    return {"models": models}


def _jsonable(value: Any, verbose: bool) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, verbose) for v in value] if verbose else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, verbose) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def model_info(path: Path, handle: ModelHandle | None, verbose: bool) -> dict[str, Any]:
    """GGUF metadata as is (arrays only when verbose, as Ollama does); for other formats, the GGUF keys
    (from the folder's headers: `/api/show` is the one model route that reads them)."""
    if handle is not None and handle.model is not None and handle.model.format == "gguf":
        return {k: _jsonable(v, verbose) for k, v in handle.model.metadata.items()}
    if Path(path).is_file():
        try:
            return {k: _jsonable(v, verbose) for k, v in GGUFFile(path).metadata.items()}
        except Exception:  # noqa: BLE001 - fall back to the summary
            pass
    try:
        summary = describe_model(path)
    except Exception:  # noqa: BLE001 - a model whose headers cannot be read: nothing to show
        return {}
    arch = summary.get("architecture", "unknown")
    info = {"general.architecture": arch, "general.parameter_count": summary.get("parameters"),
            f"{arch}.context_length": summary.get("context_length"),
            f"{arch}.embedding_length": summary.get("embedding_length"),
            f"{arch}.block_count": summary.get("layers"),
            f"{arch}.attention.head_count": summary.get("heads"),
            f"{arch}.attention.head_count_kv": summary.get("kv_heads"),
            f"{arch}.vocab_size": summary.get("vocab_size")}
    return {k: v for k, v in info.items() if v is not None}


@bp.post("/api/show")
@documented(ShowRequest, "Show a model's details (Ollama)")
async def api_show() -> Any:
    """What Ollama shows, from the loaded model when it is loaded, else from the file's headers (nothing loads)."""
    req = await read_body(ShowRequest)
    target = await server_state().pool.target(req.model)
    extra = await overrides_for(req.model)
    handle = server_state().pool.loaded_handle(target)
    facts = await asyncio.to_thread(_target_facts, target, handle)
    listed = await asyncio.to_thread(path_facts, target.path, facts)
    if handle is not None:
        context = handle.max_model_len
    else:
        limit = server_state().config.runtime.max_model_len
        context = facts.context_length if facts is not None else 0
        context = min(context, limit) if limit and context else context
    params = {"num_ctx": context, **extra.parameters}
    parameters = parameters_text(params)
    encoder = facts is not None and not facts.generative
    if encoder:
        template = ""
    elif handle is not None and handle.model is not None:
        template = handle.model.chat_template.source
    else:
        template = (facts.chat_template if facts is not None else None) or ""
    template = "" if encoder else extra.template or template
    caps = list(capabilities(encoder, template))
    modelfile = "\n".join([
        "# Modelfile generated by InferFlux (the chat template is Jinja, applied by the server)",
        f"FROM {target.path}",
        *modelfile_lines(dataclasses.replace(extra, parameters={"num_ctx": context, **extra.parameters})),
    ]) + "\n"
    license_text = extra.license or (facts.license if facts is not None else None)
    info = await asyncio.to_thread(model_info, target.path, handle, req.verbose)
    return {"license": license_text if isinstance(license_text, str) else "", "modelfile": modelfile,
            "parameters": parameters, "template": template, "system": extra.system or "",
            "details": _details(facts, listed["details"]["format"]), "model_info": info, "capabilities": caps,
            "modified_at": listed["modified_at"]}


def _target_facts(target: Target, handle: ModelHandle | None) -> ModelFacts | None:
    """The loaded handle's facts, else the stored model's (its manifest), else the file's headers."""
    if handle is not None and handle.facts is not None:
        return handle.facts
    store = server_state().pool.store
    if not target.default and store is not None:
        with contextlib.suppress(InferFluxError):
            return store.facts(target.name)
    with contextlib.suppress(InferFluxError, OSError):
        return model_facts(target.path)
    return None
