"""`/api/tags`, `/api/ps` and `/api/show`: what the server's models are, from manifests and file headers."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from inferflux.engine import device
from inferflux.formats.describe import describe_model
from inferflux.formats.gguf_file import GGUFFile
from inferflux.server.handle import ModelHandle, is_encoder
from inferflux.server.http import read_body, server_state
from inferflux.server.model_pool import FOREVER, Listed, tagged
from inferflux.server.ollama import bp
from inferflux.server.ollama.bodies import ShowRequest
from inferflux.server.ollama.overrides import modelfile_lines, overrides_for, parameters_text
from inferflux.server.openapi import documented
from inferflux.store import ModelEntry

FAR_FUTURE = "2318-01-01T00:00:00Z"


def rfc3339(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_facts_cache: dict[tuple[str, int, float], dict[str, Any]] = {}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def _details(fmt: str, arch: str, parameter_size: str, quantization: str) -> dict[str, Any]:
    return {"parent_model": "", "format": fmt, "family": arch, "families": [arch],
            "parameter_size": parameter_size, "quantization_level": quantization}


def path_facts(path: Path) -> dict[str, Any]:
    """size, mtime, digest, details and describe_model's summary of a model path (cached per version; blocking)."""
    path = Path(path)
    files = _files(path)
    size = sum(f.stat().st_size for f in files)
    mtime = max((f.stat().st_mtime for f in files), default=time.time())
    key = (str(path), size, mtime)
    if key in _facts_cache:
        return _facts_cache[key]
    try:
        summary = describe_model(path)
    except Exception:  # noqa: BLE001 - e.g. an encoder describe_model does not know
        summary = {}
    fmt = summary.get("format") or ("gguf" if path.is_file() else "safetensors")
    if not summary:  # an encoder (BERT): what its config says
        config = _json_file(path / "config.json") if path.is_dir() else {}
        arch = (config.get("model_type") or "bert") if path.is_dir() else _gguf_architecture(path)
        summary = {"architecture": arch, "context_length": config.get("max_position_embeddings"),
                   "embedding_length": config.get("hidden_size")}
    arch = summary.get("architecture") or "unknown"
    facts = {
        "size": size, "modified_at": rfc3339(mtime),
        "digest": hashlib.sha256(f"{path}\0{size}\0{mtime}".encode()).hexdigest(),
        "details": _details(fmt, arch, summary.get("parameter_size", ""), summary.get("quantization", "")),
        "summary": summary,
    }
    _facts_cache[key] = facts
    return facts


def _json_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _gguf_architecture(path: Path) -> str:
    try:
        return str(GGUFFile(path).metadata.get("general.architecture") or "unknown")
    except Exception:  # noqa: BLE001 - not a readable GGUF
        return "unknown"


def entry_facts(entry: ModelEntry) -> dict[str, Any]:
    """The same fields for a stored model, from its manifest (no file is read)."""
    return {"size": entry.size, "modified_at": rfc3339(entry.modified.timestamp()), "digest": entry.digest,
            "details": _details(entry.format, entry.architecture or "unknown", entry.parameter_size or "",
                                entry.quantization or "")}


def _listing() -> tuple[list[Listed], dict[str, Any]]:
    """The listed names, and each name's facts (blocking: reads manifests and file headers)."""
    pool = server_state().pool
    rows = pool.names()
    facts: dict[str, Any] = {}
    for row in rows:
        if row.stored is not None:
            facts[row.name] = entry_facts(row.stored)
        else:
            facts[row.name] = path_facts(pool.default.path)
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
        facts = listed.get(handle.name) or await asyncio.to_thread(path_facts, handle.path)
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


def model_info(path: Path, handle: ModelHandle | None, summary: dict[str, Any], verbose: bool) -> dict[str, Any]:
    """GGUF metadata as is (arrays only when verbose, as Ollama does); for other formats, the GGUF keys."""
    if handle is not None and handle.model is not None and handle.model.format == "gguf":
        return {k: _jsonable(v, verbose) for k, v in handle.model.metadata.items()}
    if Path(path).is_file():
        try:
            return {k: _jsonable(v, verbose) for k, v in GGUFFile(path).metadata.items()}
        except Exception:  # noqa: BLE001 - fall back to the summary
            pass
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
    facts = await asyncio.to_thread(path_facts, target.path)
    summary = facts["summary"]
    if handle is not None:
        context, encoder = handle.max_model_len, handle.engine is None
    else:
        limit = server_state().config.runtime.max_model_len
        context = summary.get("context_length") or 0
        context = min(context, limit) if limit and context else context
        encoder = await asyncio.to_thread(is_encoder, target.path)
    params = {"num_ctx": context, **extra.parameters}
    parameters = parameters_text(params)
    if encoder:
        template, capabilities = "", ["embedding"]
    else:
        template = handle.model.chat_template.source if handle is not None else summary.get("chat_template") or ""
        template = extra.template or template
        capabilities = ["completion"] + (["tools"] if "tools" in template else [])
    modelfile = "\n".join([
        "# Modelfile generated by InferFlux (the chat template is Jinja, applied by the server)",
        f"FROM {target.path}",
        *modelfile_lines(dataclasses.replace(extra, parameters={"num_ctx": context, **extra.parameters})),
    ]) + "\n"
    license_text = extra.license or summary.get("license")
    info = await asyncio.to_thread(model_info, target.path, handle, summary, req.verbose)
    return {"license": license_text if isinstance(license_text, str) else "", "modelfile": modelfile,
            "parameters": parameters, "template": template, "system": extra.system or "", "details": facts["details"],
            "model_info": info, "capabilities": capabilities, "modified_at": facts["modified_at"]}
