"""Ollama's REST API (docs/api.md) on the same app, so `ollama` clients and tools work unchanged.

Routes: `/`, `/api/version`, `/api/generate`, `/api/chat`, `/api/tags`, `/api/show`,
`/api/ps`, `/api/embed`, the legacy `/api/embeddings`, and the model store's `/api/pull`,
`/api/copy` and `/api/delete`. Streams are NDJSON (one object per line; `stream` defaults to true,
as in Ollama); errors are Ollama's `{"error": "message"}`, and an error after the stream started
is a last `{"error": ...}` line.

Models are the one given to `inferctl serve` and the model store's (see `model_pool.py`): they
load on first use and unload when their `keep_alive` expires (a duration like "5m", seconds,
0 = right after the request, negative = never), as Ollama's do.

Differences from Ollama, by design or not yet done:
- Prompts always go through the model's own Jinja chat template; Go
  `template`s, `suffix` (fill-in-the-middle), `images` and `format`
  (JSON / structured output) are refused with a 400.
- `options`: num_predict (-1 and -2 mean "until the context is full"),
  temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
  frequency_penalty, seed, stop and num_ctx (capped at the server's context)
  are honoured. num_keep, repeat_last_n, typical_p, tfs_z, mirostat*,
  penalize_newline and the load-time options (num_gpu, num_thread, ...) are
  accepted and ignored; unknown options are ignored with a warning. Sampling
  defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9) except
  repeat_penalty, which defaults to 1.0 because ours covers the whole sequence
  rather than the last 64 tokens.
- The model given to `inferctl serve` stays loaded unless a request's
  `keep_alive` or the loaded-model cap (`server.max_loaded_models`) unloads it.
- `/api/pull` takes what `inferctl pull` takes: a local GGUF file or
  safetensors folder, `ollama://NAME:TAG` (the local Ollama store), `hf://ORG/REPO`;
  a bare `NAME[:TAG]` means the local Ollama store's model. Nothing is fetched
  from Ollama's registry. Progress objects follow Ollama's (`pulling <digest>`
  with total/completed), plus `hashing <file>` while a local file is hashed.
- `digest` of the model given on the command line (when it is not a stored
  model) is sha256 of (path, size, mtime), not of the file contents (hashing
  gigabytes on every `/api/tags` is too slow); stored models have their store digest.
- Durations come from the engine's monotonic timestamps; each is at least 1 ns.
  `load_duration` is the time this request waited for its model to load (0 if loaded).
- `/api/embeddings` (legacy) returns L2-normalized vectors, like `/api/embed`.
- Tool calls in the output (`<tool_call>` tags, Mistral's `[TOOL_CALLS]`, Llama's JSON) are
  returned as `message.tool_calls` when the request gave `tools` (`tool_calls.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
from quart import Blueprint, Quart, Response, request

from inferflux import __version__
from inferflux.engine import device
from inferflux.engine.embedder import truncate_dimensions
from inferflux.engine.request import StreamOutput
from inferflux.engine.sampling_params import SamplingParams, SamplingParamsError
from inferflux.errors import InferFluxError
from inferflux.formats.chat_template import ChatTemplate, ChatTemplateError
from inferflux.formats.describe import describe_model
from inferflux.formats.gguf_file import GGUFFile
from inferflux.server.embeddings_api import compute, input_ids
from inferflux.server.errors import APIError, bad_request
from inferflux.server.handle import is_encoder
from inferflux.server.model_pool import FOREVER, Listed, Target, parse_keep_alive, tagged
from inferflux.server.ollama_create import add_routes as add_create_routes
from inferflux.server.ollama_overrides import (
    IGNORED_OPTIONS,
    KNOWN_OPTIONS,
    modelfile_lines,
    overrides_for,
    parameters_text,
)
from inferflux.server.openai_api import (
    _Tracker,
    generative,
    parse_json,
    server_state,
    submit,
)
from inferflux.server.protocol import EmbeddingRequest
from inferflux.server.state import ModelHandle
from inferflux.server.tool_calls import ToolCall, ToolCallStream, tool_names
from inferflux.store import ModelEntry, ModelNotFoundError, StoreError, ollama_store_has, parse_name

log = logging.getLogger(__name__)

bp = Blueprint("ollama", __name__)
add_create_routes(bp)  # /api/create: ollama_create.py

OLLAMA_VERSION = f"0.6.0-inferflux-{__version__}"
FAR_FUTURE = "2318-01-01T00:00:00Z"
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


def register(app: Quart) -> None:
    app.register_blueprint(bp)


@bp.errorhandler(APIError)
async def ollama_error(exc: APIError) -> Any:
    return {"error": exc.message}, exc.status


# --- helpers ---


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rfc3339(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def ollama_body() -> dict[str, Any]:
    return parse_json(await request.get_data())


def model_name(data: dict[str, Any], key: str = "model") -> str:
    name = data.get(key) or data.get("name")
    if not name or not isinstance(name, str):
        raise bad_request("model is required")
    return name


def keep_alive_of(data: dict[str, Any]) -> float | None:
    try:
        return parse_keep_alive(data.get("keep_alive"))
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def _not_found(name: str) -> APIError:
    return APIError(404, f'model "{name}" not found, try pulling it first')


async def find(data: dict[str, Any]) -> Target:
    """The model a request names, without loading it; Ollama's 404 if there is none."""
    name = model_name(data)
    try:
        return await server_state().pool.target(name)
    except APIError as exc:
        if exc.status == 404:
            raise _not_found(name) from None
        raise


async def acquire(data: dict[str, Any]) -> ModelHandle:
    """The model a request names, loaded if need be, with the request's keep_alive; call `release()`."""
    name, keep_alive = model_name(data), keep_alive_of(data)
    try:
        return await server_state().acquire(name, keep_alive)
    except APIError as exc:
        if exc.status == 404:
            raise _not_found(name) from None
        raise


def refuse_unsupported(data: dict[str, Any]) -> None:
    if data.get("format") not in (None, ""):
        raise bad_request("structured output is not supported yet (`format` must be empty)")
    if data.get("images"):
        raise bad_request("images are not supported: this server has no vision models")


def _num(options: dict[str, Any], key: str, kind: type) -> Any:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"invalid value for option `{key}`: {value!r}")
    if kind is int and value != int(value):
        raise bad_request(f"option `{key}` must be an integer")
    return kind(value)


def sampling_from_options(options: Any, prompt_len: int, handle: ModelHandle) -> SamplingParams:
    """Ollama's `options` as SamplingParams, with the context window checked."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad_request("`options` must be an object")
    unknown = sorted(set(options) - KNOWN_OPTIONS - IGNORED_OPTIONS)
    if unknown:
        log.warning("ignoring unknown Ollama options: %s", ", ".join(unknown))
    context = handle.max_model_len
    if prompt_len >= context:
        raise bad_request(f"the prompt is {prompt_len} tokens; this model's context is {context} tokens")
    limit = context
    num_ctx = _num(options, "num_ctx", int)
    if num_ctx is not None and prompt_len < num_ctx < context:
        limit = num_ctx
    room = limit - prompt_len
    num_predict = _num(options, "num_predict", int)
    if num_predict is None or num_predict < 0:
        default = server_state().config.server.default_max_tokens
        max_tokens = min(default, room) if default else room
    elif num_predict == 0:
        raise bad_request("num_predict must be positive, or -1 for no limit")
    else:
        max_tokens = min(num_predict, room)
    stop = options.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("option `stop` must be a list of strings")

    def pick(key: str, kind: type, default: Any) -> Any:
        value = _num(options, key, kind)
        return default if value is None else value

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", float, DEFAULTS["temperature"]),
        top_k=pick("top_k", int, DEFAULTS["top_k"]),
        top_p=pick("top_p", float, DEFAULTS["top_p"]),
        min_p=pick("min_p", float, 0.0),
        repetition_penalty=pick("repeat_penalty", float, 1.0),
        presence_penalty=pick("presence_penalty", float, 0.0),
        frequency_penalty=pick("frequency_penalty", float, 0.0),
        seed=_num(options, "seed", int),
        stop=[s for s in stop if s] or None if stop else None,
    )
    try:
        runtime = handle.engine.core.config.runtime
        params.validate(handle.model.config.vocab_size, runtime.max_logprobs, runtime.max_logit_bias)
    except SamplingParamsError as exc:
        raise bad_request(str(exc)) from None
    return params


def render(handle: ModelHandle, messages: list[dict[str, Any]], tools: Any = None,
           template: ChatTemplate | None = None) -> list[int]:
    """Prompt ids of a conversation, through `template` (a name's `/api/create` template) or the model's own."""
    try:
        text = (template or handle.model.chat_template).render(messages, add_generation_prompt=True, tools=tools)
    except ChatTemplateError as exc:
        raise bad_request(str(exc)) from None
    return handle.model.tokenizer.encode(text, add_special_tokens=False)


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def final_fields(out: StreamOutput, end: float, load_seconds: float = 0.0) -> dict[str, Any]:
    first = out.first_token_time or end
    last = out.last_token_time or first
    return {"done": True, "done_reason": "length" if out.finish_reason == "length" else "stop",
            "total_duration": _ns(end - out.arrival_time + load_seconds),
            "load_duration": _ns(load_seconds) if load_seconds else 0,
            "prompt_eval_count": out.prompt_tokens, "prompt_eval_duration": _ns(first - out.arrival_time),
            "eval_count": out.completion_tokens, "eval_duration": _ns(last - first)}


@dataclasses.dataclass
class _Job:
    handle: ModelHandle
    prompt: list[int]
    stream: AsyncIterator[StreamOutput]
    tracker: _Tracker
    load_seconds: float = 0.0


async def start(handle: ModelHandle, prompt: list[int], options: Any, load_seconds: float = 0.0) -> _Job:
    """Submit to the engine; releases the handle if that fails."""
    try:
        params = sampling_from_options(options, len(prompt), handle)
        stream = await submit(handle, prompt, params)
    except BaseException:
        handle.release()
        raise
    return _Job(handle, prompt, stream, _Tracker(), load_seconds)


async def pieces(job: _Job) -> AsyncIterator[tuple[str, Any]]:
    """("text", delta) while generating, then ("done", final fields + output ids); releases the handle."""
    output: list[int] = []
    try:
        async for out in job.stream:
            job.tracker.see(out)
            if out.finish_reason == "abort":
                raise APIError(503, "the server shut down before this request finished")
            output += out.new_token_ids
            if out.new_text:
                yield "text", out.new_text
            if out.finished:
                yield "done", {**final_fields(out, time.monotonic(), job.load_seconds), "_output": output}
                return
    finally:
        job.tracker.report()
        job.handle.release()


def ndjson(lines: AsyncIterator[dict[str, Any]]) -> Response:
    async def body() -> AsyncIterator[str]:
        try:
            async for obj in lines:
                yield json.dumps(obj, ensure_ascii=False) + "\n"
        except APIError as exc:
            yield json.dumps({"error": exc.message}) + "\n"
        except Exception as exc:
            log.exception("error in an Ollama stream")
            yield json.dumps({"error": f"internal error: {type(exc).__name__}"}) + "\n"

    response = Response(body(), mimetype="application/x-ndjson")
    response.timeout = None
    return response


async def respond(job: _Job, data: dict[str, Any], chat: bool, with_context: bool, tools: Any = None) -> Any:
    name = data.get("model") or data.get("name")
    parser = ToolCallStream(tool_names(tools)) if chat and tools else None

    def obj(text: str, extra: dict[str, Any] | None = None, calls: list[ToolCall] = ()) -> dict[str, Any]:
        head = {"model": name, "created_at": now_rfc3339()}
        if chat:
            head["message"] = {"role": "assistant", "content": text}
            if calls:
                head["message"]["tool_calls"] = [call.ollama() for call in calls]
        else:
            head["response"] = text
        if extra is None:
            return {**head, "done": False}
        output = extra.pop("_output")
        if with_context:
            extra["context"] = job.prompt + output
        return {**head, **extra}

    async def parts() -> AsyncIterator[tuple[str, Any]]:
        """pieces(), with tool calls taken out of the text when the request gave tools."""
        async for kind, value in pieces(job):
            if parser is None:
                yield kind, value
                continue
            text, calls = parser.feed(value) if kind == "text" else parser.finish()
            if text:
                yield "text", text
            if calls:
                yield "calls", calls
            if kind == "done":
                yield kind, value

    if data.get("stream", True):
        async def lines() -> AsyncIterator[dict[str, Any]]:
            async for kind, value in parts():
                if kind == "text":
                    yield obj(value)
                elif kind == "calls":
                    yield obj("", calls=value)
                else:
                    yield obj("", value)

        return ndjson(lines())
    text, calls, final = [], [], None
    async for kind, value in parts():
        if kind == "text":
            text.append(value)
        elif kind == "calls":
            calls += value
        else:
            final = value
    return obj("".join(text), final, calls)


async def load_or_unload(data: dict[str, Any], chat: bool) -> dict[str, Any]:
    """A request with nothing to generate loads the model, or unloads it with `keep_alive: 0` (as Ollama)."""
    keep_alive = keep_alive_of(data)
    target = await find(data)
    if keep_alive == 0:
        pool = server_state().pool
        handle = pool.loaded_handle(target)
        if handle is not None:
            pool.unload(handle)
        reason = "unload"
    else:
        (await acquire(data)).release()
        reason = "load"
    reply = {"model": data.get("model") or data.get("name"), "created_at": now_rfc3339(), "done": True,
             "done_reason": reason}
    if chat:
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    return reply


# --- server info ---


@bp.route("/", methods=["GET", "HEAD"])
async def root() -> Any:
    return Response("Ollama is running", mimetype="text/plain")


@bp.get("/api/version")
async def api_version() -> Any:
    return {"version": OLLAMA_VERSION}


# --- generation ---


@bp.post("/api/generate")
async def api_generate() -> Any:
    data = await ollama_body()
    await find(data)
    extra = await overrides_for(data.get("model") or data.get("name"))
    refuse_unsupported(data)
    if data.get("suffix"):
        raise bad_request("`suffix` (fill-in-the-middle) is not supported")
    if data.get("template"):
        raise bad_request("custom Go `template`s are not supported; the model's chat template is used "
                          "(or send `raw: true` with a formatted prompt)")
    prompt, system, context = data.get("prompt") or "", data.get("system"), data.get("context") or []
    system = extra.system if system is None else system
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise bad_request("`prompt` and `system` must be strings")
    if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise bad_request("`context` must be a list of token ids")
    if not prompt and not context:
        return await load_or_unload(data, chat=False)
    handle = generative(await acquire(data))
    load_seconds = handle.load_seconds
    try:
        vocab = handle.model.config.vocab_size
        if any(not 0 <= t < vocab for t in context):
            raise bad_request(f"`context` token ids must be in 0..{vocab - 1}")
        tokenizer = handle.model.tokenizer
        if data.get("raw"):
            ids = tokenizer.encode(prompt, add_special_tokens=not context) if prompt else []
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
            ids = render(handle, messages, template=extra.chat_template(handle.model.chat_template))
    except BaseException:
        handle.release()
        raise
    job = await start(handle, list(context) + ids, extra.options(data.get("options")), load_seconds)
    return await respond(job, data, chat=False, with_context=True)


def chat_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise bad_request("`messages` must be a list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"message {i} needs a role of system, user, assistant or tool")
        if m.get("images"):
            raise bad_request("images are not supported: this server has no vision models")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise bad_request(f"message {i}: `content` must be a string")
        message: dict[str, Any] = {"role": m["role"], "content": content}
        if m.get("tool_calls"):
            message["tool_calls"] = m["tool_calls"]
        if m.get("tool_name"):
            message["name"] = message["tool_name"] = m["tool_name"]
        messages.append(message)
    return messages


@bp.post("/api/chat")
async def api_chat() -> Any:
    data = await ollama_body()
    await find(data)
    extra = await overrides_for(data.get("model") or data.get("name"))
    refuse_unsupported(data)
    messages = chat_messages(data.get("messages") or [])
    tools = data.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise bad_request("`tools` must be a list")
    if not messages:
        return await load_or_unload(data, chat=True)
    handle = generative(await acquire(data))
    load_seconds = handle.load_seconds
    try:
        ids = render(handle, extra.messages(messages), tools, extra.chat_template(handle.model.chat_template))
    except BaseException:
        handle.release()
        raise
    job = await start(handle, ids, extra.options(data.get("options")), load_seconds)
    return await respond(job, data, chat=True, with_context=False, tools=tools)


# --- models ---

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
        "size": size, "modified_at": _rfc3339(mtime),
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
    return {"size": entry.size, "modified_at": _rfc3339(entry.modified.timestamp()), "digest": entry.digest,
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
    rows, facts = await asyncio.to_thread(_listing)
    return {"models": [{"name": tagged(row.name), "model": tagged(row.name), **{
        key: facts[row.name][key] for key in ("modified_at", "size", "digest", "details")}} for row in rows]}


@bp.get("/api/ps")
async def api_ps() -> Any:
    pool = server_state().pool
    rows, listed = await asyncio.to_thread(_listing)
    on_device = device.backend() != "cpu"
    models = []
    for handle in pool.loaded():
        facts = listed.get(handle.name) or await asyncio.to_thread(path_facts, handle.path)
        expires = pool.expires_at(handle)
        models.append({"name": tagged(handle.name), "model": tagged(handle.name), "size": facts["size"],
                       "digest": facts["digest"], "details": facts["details"],
                       "expires_at": FAR_FUTURE if expires == FOREVER else _rfc3339(expires),
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
async def api_show() -> Any:
    """What Ollama shows, from the loaded model when it is loaded, else from the file's headers (nothing loads)."""
    data = await ollama_body()
    target = await find(data)
    extra = await overrides_for(data.get("model") or data.get("name"))
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
    info = await asyncio.to_thread(model_info, target.path, handle, summary, bool(data.get("verbose")))
    return {"license": license_text if isinstance(license_text, str) else "", "modelfile": modelfile,
            "parameters": parameters, "template": template, "system": extra.system or "", "details": facts["details"],
            "model_info": info, "capabilities": capabilities, "modified_at": facts["modified_at"]}


# --- embeddings ---


async def _embed(handle: ModelHandle, texts: list[str], truncate: bool) -> tuple[np.ndarray, int]:
    req = EmbeddingRequest(model=handle.name, input=texts, truncate=truncate)
    lists = input_ids(req, handle)
    vectors = await compute(handle, lists)
    return np.asarray(vectors, np.float32), sum(len(ids) for ids in lists)


@bp.post("/api/embed")
async def api_embed() -> Any:
    data = await ollama_body()
    await find(data)
    started = time.monotonic()
    raw = data.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise bad_request("`input` must be a string or a list of strings")
    texts = [t for t in texts if t] if isinstance(raw, str) else texts
    if not texts:
        return {"model": data.get("model"), "embeddings": []}
    if any(not t for t in texts):
        raise bad_request("`input` has an empty string")
    truncate = data.get("truncate", True)
    dimensions = data.get("dimensions")
    handle = await acquire(data)
    load_seconds = handle.load_seconds
    try:
        vectors, tokens = await _embed(handle, texts, bool(truncate))
    finally:
        handle.release()
    if dimensions is not None:
        if not isinstance(dimensions, int) or not 1 <= dimensions <= vectors.shape[-1]:
            raise bad_request(f"dimensions must be between 1 and {vectors.shape[-1]}")
        vectors = np.asarray(truncate_dimensions(vectors, dimensions), np.float32)
    return {"model": data.get("model"), "embeddings": vectors.tolist(),
            "total_duration": _ns(time.monotonic() - started),
            "load_duration": _ns(load_seconds) if load_seconds else 0, "prompt_eval_count": tokens}


@bp.post("/api/embeddings")
async def api_embeddings() -> Any:
    data = await ollama_body()
    await find(data)
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise bad_request("`prompt` must be a string")
    if not prompt:
        return {"embedding": []}
    handle = await acquire(data)
    try:
        vectors, _ = await _embed(handle, [prompt], True)
    finally:
        handle.release()
    return {"embedding": vectors[0].tolist()}


# --- the model store: pull, copy, delete ---

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def pull_source(text: str) -> str:
    """What `/api/pull`'s `model` names, as a `ModelStore.pull` source.

    A URL (`ollama://`, `hf://`) or an existing path as is; a bare `NAME[:TAG]` is the model of that
    name in the local Ollama store (`ollama pull llama3.2` reuses what Ollama downloaded).
    """
    text = text.strip()
    if _URL.match(text):
        return text
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if text.startswith(("/", ".", "~")) or (os.sep in text and path.suffix.lower() in (".gguf", ".safetensors")):
        raise APIError(404, f"{text}: no such file or folder")
    try:
        parse_name(text)
    except StoreError as exc:
        raise bad_request(str(exc)) from None
    return f"ollama://{text}"


class _PullProgress:
    """The store's progress callbacks (in the pull's worker thread) as Ollama progress objects on a queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue = loop, queue
        self.digest: str | None = None
        self._last: dict[str, int] = {}

    def emit(self, obj: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, obj)

    def layer(self, digest: str, size: int) -> None:
        self.digest = digest
        self.emit({"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": 0})

    def progress(self, label: str, done: int, total: int, unit: str) -> None:
        last = self._last.get(label)
        if last is not None and done < total and done - last < max(total // 100, 1):
            return  # at most ~100 objects per phase
        self._last[label] = done
        if self.digest and label.startswith(("copying ", "verifying ")):
            self.emit({"status": f"pulling {self.digest[7:19]}", "digest": self.digest, "total": total,
                       "completed": done})
        else:  # hashing a local file (its digest is not known yet), converting tensors
            self.emit({"status": label, "total": total, "completed": done})


async def _run_with_progress(work: Callable[[_PullProgress], str]) -> AsyncIterator[dict[str, Any]]:
    """Run `work` in a thread, yielding its progress objects as they come; then ("result", value)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    report = _PullProgress(loop, queue)
    task = loop.create_task(asyncio.to_thread(work, report))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a client that left does not log it
    while not task.done() or not queue.empty():
        if not queue.empty():
            yield queue.get_nowait()
            continue
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    yield {"result": task.result()}


def already_here(text: str) -> list[dict[str, Any]] | None:
    """The layers of the model a bare `NAME[:TAG]` pull names when this server has it already and the local
    Ollama store has nothing newer to import (None otherwise; `[]` for the served model given by path).

    Ollama answers a pull of a model it has with success (after checking its registry); tools that pull
    before every use rely on that, so a model InferFlux already has must not be looked up elsewhere.
    """
    pool = server_state().pool
    text = text.strip()
    if _URL.match(text) or Path(text).expanduser().exists() or ollama_store_has(text):
        return None
    if pool.is_default(text) and not pool.store.has(text):
        return []
    if not pool.store.has(text):
        return None
    try:
        return list(pool.store.show(text)["blobs"])
    except (InferFluxError, OSError):  # damaged: let the pull try, and fail with its own message
        return None


async def _present(layers: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Ollama's progress for a model that is up to date: every layer already complete, then success."""
    yield {"status": "pulling manifest"}
    for layer in layers:
        digest, size = str(layer["digest"]), int(layer["size"])
        yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": size}
    for status in ("verifying sha256 digest", "writing manifest", "success"):
        yield {"status": status}


@bp.post("/api/pull")
async def api_pull() -> Any:
    """Add a model to the store (what `inferctl pull` takes), streaming Ollama-style progress objects."""
    data = await ollama_body()
    text = model_name(data)
    pool = server_state().pool
    present = await asyncio.to_thread(already_here, text)
    source = pull_source(text) if present is None else text

    async def events() -> AsyncIterator[dict[str, Any]]:
        if present is not None:
            async for obj in _present(present):
                yield obj
            return
        yield {"status": "pulling manifest"}
        try:
            async for obj in _run_with_progress(
                    lambda report: pool.store.pull(source, progress=report.progress, on_layer=report.layer)):
                if "result" in obj:
                    name = obj["result"]
                else:
                    yield obj
        except ModelNotFoundError as exc:
            raise APIError(404, str(exc)) from None
        except (InferFluxError, OSError) as exc:
            raise APIError(400, f"pull {source}: {exc}") from None
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        pool.replaced(name, await asyncio.to_thread(pool.store.path, name))
        yield {"status": "success"}

    if data.get("stream", True):
        return ndjson(events())
    last: dict[str, Any] = {}
    async for obj in events():
        last = obj
    return last


@bp.post("/api/copy")
async def api_copy() -> Any:
    """Store a model under another name (the same blobs); the served model is stored from its path."""
    data = await ollama_body()
    source, destination = data.get("source"), data.get("destination")
    if not (isinstance(source, str) and source and isinstance(destination, str) and destination):
        raise bad_request("`source` and `destination` are required")
    try:
        parse_name(destination)
    except StoreError as exc:
        raise bad_request(str(exc)) from None
    pool = server_state().pool
    try:
        target = await pool.target(source, strict=True)
    except APIError:
        raise APIError(404, f"model '{source}' not found") from None
    stored = pool.store.has(source) and (
        not target.default or await asyncio.to_thread(lambda: str(pool.store.path(source).resolve())) == target.key)
    try:
        if stored:
            await asyncio.to_thread(pool.store.copy, source, destination)
        else:  # the model given to `inferctl serve` by path: store it under the new name
            await asyncio.to_thread(pool.store.pull, str(target.path), destination)
    except ModelNotFoundError:
        raise APIError(404, f"model '{source}' not found") from None
    except (InferFluxError, OSError) as exc:
        raise APIError(500, f"copy {source} to {destination}: {exc}") from None
    return Response("", status=200)


@bp.delete("/api/delete")
async def api_delete() -> Any:
    """Remove a stored model; if it is loaded it is unloaded first (running requests finish)."""
    data = await ollama_body()
    name = model_name(data)
    pool = server_state().pool
    if not pool.store.has(name):
        if pool.is_default(name):
            raise bad_request(f'model "{name}" is the model given to `inferctl serve` ({pool.default.path}), '
                              "not a stored model; it cannot be deleted")
        raise APIError(404, f"model '{name}' not found")
    try:
        path = await asyncio.to_thread(pool.store.path, name)
    except StoreError:  # damaged: nothing of it can be loaded
        path = None
    if path is not None:
        pool.unload_path(path)
    try:
        await asyncio.to_thread(pool.store.rm, name)
    except ModelNotFoundError:
        raise APIError(404, f"model '{name}' not found") from None
    except (InferFluxError, OSError) as exc:
        raise APIError(500, f"delete {name}: {exc}") from None
    return Response("", status=200)
