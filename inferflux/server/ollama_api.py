"""Ollama's REST API (docs/api.md) on the same app, so `ollama` clients and tools work unchanged.

Routes: `/`, `/api/version`, `/api/generate`, `/api/chat`, `/api/tags`,
`/api/show`, `/api/ps`, `/api/embed` and the legacy `/api/embeddings`.
Streams are NDJSON (one object per line; `stream` defaults to true, as in
Ollama); errors are Ollama's `{"error": "message"}`, and an error after the
stream started is a last `{"error": ...}` line.

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
- `keep_alive` is accepted; the model stays loaded for the server's lifetime.
- `digest` in tags/ps is sha256 of (path, size, mtime), not of the file
  contents (hashing gigabytes on every `/api/tags` is too slow).
- Durations come from the engine's monotonic timestamps; each is at least 1 ns.
  `load_duration` is 0 (the model is loaded at startup).
- `/api/embeddings` (legacy) returns L2-normalized vectors, like `/api/embed`.
- Tool calls are not parsed out of the output (tools only reach the template).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from quart import Blueprint, Quart, Response, request

from inferflux import __version__
from inferflux.engine import device
from inferflux.engine.embedder import truncate_dimensions
from inferflux.engine.request import StreamOutput
from inferflux.engine.sampling_params import SamplingParams, SamplingParamsError
from inferflux.formats.chat_template import ChatTemplateError
from inferflux.formats.describe import describe_model
from inferflux.server.embeddings_api import compute, input_ids
from inferflux.server.errors import APIError, bad_request
from inferflux.server.openai_api import (
    _Tracker,
    generative,
    parse_json,
    server_state,
    submit,
)
from inferflux.server.protocol import EmbeddingRequest
from inferflux.server.state import ModelHandle

log = logging.getLogger(__name__)

bp = Blueprint("ollama", __name__)

OLLAMA_VERSION = f"0.6.0-inferflux-{__version__}"
FAR_FUTURE = "2318-01-01T00:00:00Z"
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
IGNORED_OPTIONS = frozenset({
    "num_keep", "repeat_last_n", "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
    "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_gqa",
})


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


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


async def ollama_body() -> dict[str, Any]:
    return parse_json(await request.get_data())


def resolve(data: dict[str, Any], key: str = "model") -> ModelHandle:
    """The served model for `model` (also `name`), accepting `name:latest` for `name`."""
    name = data.get(key) or data.get("name")
    if not name or not isinstance(name, str):
        raise bad_request("model is required")
    state = server_state()
    handle = state.handle
    if name not in handle.names() and name.endswith(":latest"):
        bare = name.removesuffix(":latest")
        if bare in handle.names():
            name = bare
    try:
        return state.resolve(name)
    except APIError as exc:
        if exc.status == 404:
            raise APIError(404, f'model "{name}" not found, try pulling it first') from None
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
    known = {"num_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty",
             "frequency_penalty", "seed", "stop", "num_ctx"}
    unknown = sorted(set(options) - known - IGNORED_OPTIONS)
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


def render(handle: ModelHandle, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
    try:
        text = handle.model.chat_template.render(messages, add_generation_prompt=True, tools=tools)
    except ChatTemplateError as exc:
        raise bad_request(str(exc)) from None
    return handle.model.tokenizer.encode(text, add_special_tokens=False)


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def final_fields(out: StreamOutput, end: float) -> dict[str, Any]:
    first = out.first_token_time or end
    last = out.last_token_time or first
    return {"done": True, "done_reason": "length" if out.finish_reason == "length" else "stop",
            "total_duration": _ns(end - out.arrival_time), "load_duration": 0,
            "prompt_eval_count": out.prompt_tokens, "prompt_eval_duration": _ns(first - out.arrival_time),
            "eval_count": out.completion_tokens, "eval_duration": _ns(last - first)}


@dataclasses.dataclass
class _Job:
    handle: ModelHandle
    prompt: list[int]
    stream: AsyncIterator[StreamOutput]
    tracker: _Tracker


async def start(handle: ModelHandle, prompt: list[int], options: Any) -> _Job:
    """Submit to the engine; releases the handle if that fails."""
    try:
        params = sampling_from_options(options, len(prompt), handle)
        stream = await submit(handle, prompt, params)
    except BaseException:
        handle.release()
        raise
    return _Job(handle, prompt, stream, _Tracker())


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
                yield "done", {**final_fields(out, time.monotonic()), "_output": output}
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


async def respond(job: _Job, data: dict[str, Any], chat: bool, with_context: bool) -> Any:
    name = data.get("model") or data.get("name")

    def obj(text: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        head = {"model": name, "created_at": now_rfc3339()}
        if chat:
            head["message"] = {"role": "assistant", "content": text}
        else:
            head["response"] = text
        if extra is None:
            return {**head, "done": False}
        output = extra.pop("_output")
        if with_context:
            extra["context"] = job.prompt + output
        return {**head, **extra}

    if data.get("stream", True):
        async def lines() -> AsyncIterator[dict[str, Any]]:
            async for kind, value in pieces(job):
                yield obj(value) if kind == "text" else obj("", value)

        return ndjson(lines())
    text, final = [], None
    async for kind, value in pieces(job):
        if kind == "text":
            text.append(value)
        else:
            final = value
    return obj("".join(text), final)


def empty_reply(data: dict[str, Any], chat: bool) -> dict[str, Any]:
    """A request with nothing to generate loads (or "unloads") the model in Ollama; both are no-ops here."""
    reason = "unload" if data.get("keep_alive") in (0, "0", "0s") else "load"
    reply = {"model": data.get("model"), "created_at": now_rfc3339(), "done": True, "done_reason": reason}
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
    handle = resolve(data)
    refuse_unsupported(data)
    if data.get("suffix"):
        raise bad_request("`suffix` (fill-in-the-middle) is not supported")
    if data.get("template"):
        raise bad_request("custom Go `template`s are not supported; the model's chat template is used "
                          "(or send `raw: true` with a formatted prompt)")
    prompt, system, context = data.get("prompt") or "", data.get("system"), data.get("context") or []
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise bad_request("`prompt` and `system` must be strings")
    if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise bad_request("`context` must be a list of token ids")
    if not prompt and not context:
        return empty_reply(data, chat=False)
    generative(handle.acquire())
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
            ids = render(handle, messages)
    except BaseException:
        handle.release()
        raise
    job = await start(handle, list(context) + ids, data.get("options"))
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
    handle = resolve(data)
    refuse_unsupported(data)
    messages = chat_messages(data.get("messages") or [])
    tools = data.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise bad_request("`tools` must be a list")
    if not messages:
        return empty_reply(data, chat=True)
    generative(handle.acquire())
    try:
        ids = render(handle, messages, tools)
    except BaseException:
        handle.release()
        raise
    job = await start(handle, ids, data.get("options"))
    return await respond(job, data, chat=True, with_context=False)


# --- models ---

_facts_cache: dict[tuple[str, int, float], dict[str, Any]] = {}


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def model_facts(handle: ModelHandle) -> dict[str, Any]:
    """size, mtime, digest, details and describe_model's summary of the served path (cached per version)."""
    path = handle.path
    files = _files(path)
    size = sum(f.stat().st_size for f in files)
    mtime = max((f.stat().st_mtime for f in files), default=time.time())
    key = (str(path), size, mtime)
    if key in _facts_cache:
        return _facts_cache[key]
    try:
        summary = describe_model(path)
    except Exception:  # noqa: BLE001 - e.g. an encoder folder describe_model does not know
        summary = {}
    fmt = summary.get("format") or ("gguf" if path.is_file() else "safetensors")
    arch = summary.get("architecture") or (handle.model.config.architecture if handle.model else "bert")
    if not summary and handle.embedder is not None:
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        summary = {"architecture": arch, "context_length": handle.max_model_len,
                   "embedding_length": config.get("hidden_size")}
    facts = {
        "size": size, "modified_at": _rfc3339(mtime),
        "digest": hashlib.sha256(f"{path}\0{size}\0{mtime}".encode()).hexdigest(),
        "details": {"parent_model": "", "format": fmt, "family": arch, "families": [arch],
                    "parameter_size": summary.get("parameter_size", ""),
                    "quantization_level": summary.get("quantization", "")},
        "summary": summary,
    }
    _facts_cache[key] = facts
    return facts


@bp.get("/api/tags")
async def api_tags() -> Any:
    handle = server_state().handle
    facts = model_facts(handle)
    return {"models": [{"name": tagged(name), "model": tagged(name), "modified_at": facts["modified_at"],
                        "size": facts["size"], "digest": facts["digest"], "details": facts["details"]}
                       for name in handle.names()]}


@bp.get("/api/ps")
async def api_ps() -> Any:
    handle = server_state().handle
    facts = model_facts(handle)
    on_device = device.backend() != "cpu"
    return {"models": [{"name": tagged(handle.name), "model": tagged(handle.name), "size": facts["size"],
                        "digest": facts["digest"], "details": facts["details"], "expires_at": FAR_FUTURE,
                        "size_vram": facts["size"] if on_device else 0,
                        "context_length": handle.max_model_len}]}


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


def model_info(handle: ModelHandle, summary: dict[str, Any], verbose: bool) -> dict[str, Any]:
    """GGUF metadata as is (arrays only when verbose, as Ollama does); for other formats, the GGUF keys."""
    if handle.model is not None and handle.model.format == "gguf":
        return {k: _jsonable(v, verbose) for k, v in handle.model.metadata.items()}
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
    data = await ollama_body()
    handle = resolve(data)
    facts = model_facts(handle)
    summary = facts["summary"]
    params = {"num_ctx": handle.max_model_len}
    parameters = "\n".join(f"{k:<30} {v}" for k, v in params.items())
    if handle.engine is None:
        template, capabilities = "", ["embedding"]
    else:
        template = handle.model.chat_template.source
        capabilities = ["completion"] + (["tools"] if "tools" in template else [])
    modelfile = "\n".join([
        "# Modelfile generated by InferFlux (the chat template is Jinja, applied by the server)",
        f"FROM {handle.path}",
        *(f"PARAMETER {k} {v}" for k, v in params.items()),
    ]) + "\n"
    license_text = summary.get("license")
    return {"license": license_text if isinstance(license_text, str) else "", "modelfile": modelfile,
            "parameters": parameters, "template": template, "details": facts["details"],
            "model_info": model_info(handle, summary, bool(data.get("verbose"))),
            "capabilities": capabilities, "modified_at": facts["modified_at"]}


# --- embeddings ---


async def _embed(handle: ModelHandle, texts: list[str], truncate: bool) -> tuple[np.ndarray, int]:
    req = EmbeddingRequest(model=handle.name, input=texts, truncate=truncate)
    handle.acquire()
    try:
        lists = input_ids(req, handle)
        vectors = await compute(handle, lists)
    finally:
        handle.release()
    return np.asarray(vectors, np.float32), sum(len(ids) for ids in lists)


@bp.post("/api/embed")
async def api_embed() -> Any:
    data = await ollama_body()
    handle = resolve(data)
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
    vectors, tokens = await _embed(handle, texts, bool(truncate))
    dimensions = data.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or not 1 <= dimensions <= vectors.shape[-1]:
            raise bad_request(f"dimensions must be between 1 and {vectors.shape[-1]}")
        vectors = np.asarray(truncate_dimensions(vectors, dimensions), np.float32)
    return {"model": data.get("model"), "embeddings": vectors.tolist(),
            "total_duration": _ns(time.monotonic() - started), "load_duration": 0, "prompt_eval_count": tokens}


@bp.post("/api/embeddings")
async def api_embeddings() -> Any:
    data = await ollama_body()
    handle = resolve(data)
    prompt = data.get("prompt") or ""
    if not isinstance(prompt, str):
        raise bad_request("`prompt` must be a string")
    if not prompt:
        return {"embedding": []}
    vectors, _ = await _embed(handle, [prompt], True)
    return {"embedding": vectors[0].tolist()}

