"""Ollama's `POST /api/create`, for what tools send: a new name over a model this server already has.

Supported: `from` (a stored model, or the model given to `inferctl serve`) with `system`,
`parameters` (Ollama options as defaults), `template` (Jinja; see `overrides.py`) and
`license`, or the same as a `modelfile` (`FROM NAME`, `SYSTEM`, `PARAMETER`, `TEMPLATE`, `LICENSE`)
as older clients send it. The new name's manifest references the same blobs (nothing is copied)
and records the overrides, which `/api/show`, `/api/chat` and `/api/generate` then honour.

Refused with a 400 that says so: `files` (uploaded GGUF blobs), `FROM` a path, `adapters`,
`quantize` and `messages`. Model files are added with `inferctl pull` (or `/api/pull`), which
takes GGUF files, safetensors folders and `ollama://` names.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from quart import Response

from inferflux.errors import InferFluxError
from inferflux.server.errors import APIError, bad_request
from inferflux.server.http import read_body, server_state
from inferflux.server.ollama import bp
from inferflux.server.ollama.bodies import CreateRequest
from inferflux.server.ollama.overrides import check_create_fields
from inferflux.server.ollama.store import store_as
from inferflux.server.openapi import documented
from inferflux.store import StoreError, parse_name

_NOT_HERE = "use `inferctl pull` (or /api/pull) to add model files, then create from the stored name"
_REFUSED = {
    "files": "`files` (uploading model blobs) is not supported; " + _NOT_HERE,
    "adapters": "`adapters` (LoRA) are not supported",
    "quantize": "`quantize` is not supported by /api/create; `inferctl pull FOLDER --quantize Q4_K` converts",
    "messages": "`messages` (a preset conversation) is not supported; send the messages with each chat request",
}
_INSTRUCTION = re.compile(r'(\w+)[ \t]+(?:"""(.*?)"""|([^\n]*))', re.S)
_COMMENT = re.compile(r"#[^\n]*")


@bp.post("/api/create")
@documented(CreateRequest, "A new name over an existing model, with system/parameters/template (Ollama)",
            ndjson=True)
async def api_create() -> Any:
    """A new store name over an existing model, with the request's system / parameters / template."""
    data = (await read_body(CreateRequest, model_keys=())).model_dump(by_alias=True, exclude_none=True)
    name = data["model"]
    try:
        parse_name(name)
    except StoreError as exc:
        raise bad_request(str(exc)) from None
    for key, message in _REFUSED.items():
        if data.get(key):
            raise bad_request(message)
    if data.get("modelfile"):
        if not isinstance(data["modelfile"], str):
            raise bad_request("`modelfile` must be a string")
        data = {**parse_modelfile(data["modelfile"]), **{k: v for k, v in data.items() if k != "modelfile"}}
    source = data.get("from")
    if not isinstance(source, str) or not source:
        raise bad_request("`from` (an existing model to build on) is required; " + _NOT_HERE)
    if _looks_like_path(source):
        raise bad_request(f"creating from a path ({source}) is not supported; " + _NOT_HERE)
    overrides = check_create_fields(data)
    created = await store_as(source, name, overrides, f"model '{source}' not found, try pulling it first")
    pool = server_state().pool
    try:
        path = await asyncio.to_thread(pool.store.path, created)
        layers = (await asyncio.to_thread(pool.store.show, created))["blobs"]
    except (InferFluxError, OSError) as exc:
        raise APIError(500, f"create {name} from {source}: {exc}") from None
    pool.replaced(created, path)

    async def events() -> AsyncIterator[dict[str, Any]]:
        for layer in layers:
            yield {"status": f"using existing layer {layer['digest']}"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}

    if data.get("stream", True):
        async def body() -> AsyncIterator[str]:
            async for obj in events():
                yield json.dumps(obj) + "\n"

        return Response(body(), mimetype="application/x-ndjson")
    return {"status": "success"}


def parse_modelfile(text: str) -> dict[str, Any]:
    """`FROM`, `SYSTEM`, `TEMPLATE`, `LICENSE` and `PARAMETER` of a Modelfile as create fields; 400 for the rest.

    Values are one line (optionally "quoted") or in triple quotes over several, as in Ollama's Modelfile syntax.
    """
    fields: dict[str, Any] = {}
    params: dict[str, Any] = {}
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        comment = _COMMENT.match(text, pos)
        if comment:
            pos = comment.end()
            continue
        match = _INSTRUCTION.match(text, pos)
        if match is None:
            raise bad_request(f"modelfile: cannot read {text[pos:pos + 40]!r}")
        pos = match.end()
        command = match[1].upper()
        if match[2] is not None:
            value = match[2].strip("\n")
        else:
            value = match[3].strip()
            if value.startswith('"""'):
                raise bad_request(f'modelfile: {command} has an unterminated """')
            value = str(_parameter_value(value)) if command != "PARAMETER" and value.startswith('"') else value
        if command == "FROM":
            fields["from"] = value
        elif command in ("SYSTEM", "TEMPLATE", "LICENSE"):
            fields[command.lower()] = value
        elif command == "PARAMETER":
            key, _, raw = value.partition(" ")
            parsed = _parameter_value(raw.strip())
            if key == "stop":
                params.setdefault("stop", []).append(str(parsed))
            else:
                params[key] = parsed
        elif command in ("ADAPTER", "MESSAGE", "REQUIRES"):
            raise bad_request(f"modelfile: {command} is not supported")
        else:
            raise bad_request(f"modelfile: unknown instruction {command!r}")
    if params:
        fields["parameters"] = params
    return fields


def _parameter_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.lower().endswith((".gguf", ".safetensors")) \
        or Path(text).expanduser().exists()
