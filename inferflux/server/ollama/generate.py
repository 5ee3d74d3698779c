"""`/api/generate` and `/api/chat`: Ollama's bodies -> the generation layer -> NDJSON lines (or one object)."""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from quart import Response

from inferflux.engine.sampling_params import SamplingParams
from inferflux.server.errors import APIError, bad_request, to_api_error
from inferflux.server.generation import (
    Finished,
    Generation,
    GenerationSpec,
    Limits,
    Prompt,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from inferflux.server.http import read_body, server_state
from inferflux.server.ollama import ERROR_SHAPE, OLLAMA_VERSION, bp
from inferflux.server.ollama.bodies import ChatRequest, GenerateRequest, Options, _Generates
from inferflux.server.ollama.overrides import IGNORED_OPTIONS, KNOWN_OPTIONS, Overrides, overrides_for
from inferflux.server.openapi import documented
from inferflux.server.reasoning import thinking_kwargs
from inferflux.server.structured import ollama_constraint
from inferflux.server.tool_calls import tool_names

log = logging.getLogger(__name__)

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def sampling(options: Options | None, overrides: Overrides) -> tuple[SamplingParams, Limits]:
    """Ollama's `options` (over a created name's `parameters`) as sampling knobs and length limits."""
    raw = overrides.options(options.model_dump(exclude_unset=True) if options is not None else None) or {}
    opts = Options.model_validate(raw)
    unknown = sorted(set(raw) - KNOWN_OPTIONS - IGNORED_OPTIONS)
    if unknown:
        log.warning("ignoring unknown Ollama options: %s", ", ".join(unknown))
    if opts.num_predict == 0:
        raise bad_request("num_predict must be positive, or -1 for no limit")
    stop = [opts.stop] if isinstance(opts.stop, str) else opts.stop

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    params = SamplingParams(
        max_tokens=None, temperature=pick(opts.temperature, DEFAULTS["temperature"]),
        top_k=pick(opts.top_k, DEFAULTS["top_k"]), top_p=pick(opts.top_p, DEFAULTS["top_p"]),
        min_p=pick(opts.min_p, 0.0), repetition_penalty=pick(opts.repeat_penalty, 1.0),
        presence_penalty=pick(opts.presence_penalty, 0.0), frequency_penalty=pick(opts.frequency_penalty, 0.0),
        seed=opts.seed, stop=[s for s in stop if s] or None if stop else None,
        lora=[(ref.name, ref.scale) for ref in opts.lora] if opts.lora else None, speculative=opts.speculative)
    limit = None if opts.num_predict is None or opts.num_predict < 0 else opts.num_predict
    return params, Limits(max_tokens=limit, context=opts.num_ctx, overflow="cap")


def final_fields(done: Finished) -> dict[str, Any]:
    t = done.timings
    end = t.last_token or t.arrival
    first = t.first_token or end
    return {"done": True, "done_reason": done.reason,
            "total_duration": ns(end - t.arrival + t.load_seconds),
            "load_duration": ns(t.load_seconds) if t.load_seconds else 0,
            "prompt_eval_count": done.prompt_tokens, "prompt_eval_duration": ns(first - t.arrival),
            "eval_count": done.completion_tokens, "eval_duration": ns(end - first)}


def ndjson(lines: AsyncIterator[dict[str, Any]]) -> Response:
    async def body() -> AsyncIterator[str]:
        try:
            async for obj in lines:
                yield json.dumps(obj, ensure_ascii=False) + "\n"
        except Exception as exc:  # noqa: BLE001 - the status line is sent: the error is the last line
            error = to_api_error(exc)
            if error is None:
                log.exception("error in an Ollama stream")
                error = APIError(500, f"internal error: {type(exc).__name__}")
            yield json.dumps(ERROR_SHAPE(error)) + "\n"

    response = Response(body(), mimetype="application/x-ndjson")
    response.timeout = None
    return response


async def respond(req: _Generates, gen: Generation, chat: bool) -> Any:
    """NDJSON lines as the text comes (or one object when `stream` is false)."""
    def head() -> dict[str, Any]:
        return {"model": req.model, "created_at": now_rfc3339()}

    def text_obj(text: str, calls: list[dict[str, Any]] | None = None, thinking: str = "") -> dict[str, Any]:
        if not chat:
            return {**head(), "response": text, **({"thinking": thinking} if thinking else {}), "done": False}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        return {**head(), "message": message, "done": False}

    def final_obj(done: Finished, text: str = "", calls: list[dict[str, Any]] | None = None,
                  thinking: str = "") -> dict[str, Any]:
        obj = {**text_obj(text, calls, thinking), **final_fields(done)}
        if not chat:
            obj["context"] = gen.prompt_ids[0] + done.output_ids
        return obj

    async def lines() -> AsyncIterator[dict[str, Any]]:
        async for event in gen.events():
            if isinstance(event, TextDelta) and event.text:
                yield text_obj(event.text)
            elif isinstance(event, ReasoningDelta):
                yield text_obj("", thinking=event.text)
            elif isinstance(event, ToolCallDelta):
                yield text_obj("", [call.ollama() for call in event.calls])
            elif isinstance(event, Finished):
                yield final_obj(event)

    if req.stream:
        return ndjson(lines())
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    async for event in gen.events():
        if isinstance(event, TextDelta):
            texts.append(event.text)
        elif isinstance(event, ReasoningDelta):
            thoughts.append(event.text)
        elif isinstance(event, ToolCallDelta):
            calls += [call.ollama() for call in event.calls]
        elif isinstance(event, Finished):
            return final_obj(event, "".join(texts), calls or None, "".join(thoughts))
    raise APIError(503, "the generation ended without a result")


async def load_or_unload(req: _Generates, chat: bool) -> dict[str, Any]:
    """A request with nothing to generate loads the model, or unloads it with `keep_alive: 0` (as Ollama)."""
    pool = server_state().pool
    if req.keep_alive_seconds == 0:
        handle = pool.loaded_handle(await pool.target(req.model))
        if handle is not None:
            pool.unload(handle)
        reason = "unload"
    else:
        (await server_state().acquire(req.model, req.keep_alive_seconds)).release()
        reason = "load"
    reply: dict[str, Any] = {"model": req.model, "created_at": now_rfc3339(), "done": True, "done_reason": reason}
    if chat:
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    return reply


@bp.route("/", methods=["GET", "HEAD"])
@documented(summary="Ollama's liveness text", content="text/plain")
async def root() -> Any:
    return Response("Ollama is running", mimetype="text/plain")


@bp.get("/api/version")
async def api_version() -> Any:
    return {"version": OLLAMA_VERSION}


@bp.post("/api/generate")
@documented(GenerateRequest, "Generate a completion (Ollama)", ndjson=True)
async def api_generate() -> Any:
    req = await read_body(GenerateRequest)
    overrides = await overrides_for(req.model)
    if (why := req.refused()) is not None:
        raise bad_request(why)
    if not req.prompt and not req.context:
        return await load_or_unload(req, chat=False)
    system = overrides.system if req.system is None else req.system
    context = list(req.context or [])
    if req.raw:
        prompt = Prompt(text=req.prompt, add_special_tokens=not context, prefix_ids=context)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                    "content": req.prompt}]
        prompt = Prompt(messages=messages, template=overrides.template, prefix_ids=context,
                        template_kwargs=thinking_kwargs(req.think))
    params, limits = sampling(req.options, overrides)
    params.constraint = ollama_constraint(req.format)  # structured output: "json" or a JSON Schema
    gen = await Generation.start(GenerationSpec(req.model, [prompt], params, limits, req.keep_alive_seconds,
                                                think=None if req.raw else req.think))
    return await respond(req, gen, chat=False)


@bp.post("/api/chat")
@documented(ChatRequest, "Chat (Ollama)", ndjson=True)
async def api_chat() -> Any:
    req = await read_body(ChatRequest)
    overrides = await overrides_for(req.model)
    if (why := req.refused()) is not None:
        raise bad_request(why)
    if not req.messages:
        return await load_or_unload(req, chat=True)
    messages = overrides.messages([m.for_template() for m in req.messages])
    prompt = Prompt(messages=messages, tools=req.tools or None, template=overrides.template,
                    template_kwargs=thinking_kwargs(req.think))
    params, limits = sampling(req.options, overrides)
    params.constraint = ollama_constraint(req.format)  # structured output: "json" or a JSON Schema
    spec = GenerationSpec(req.model, [prompt], params, limits, req.keep_alive_seconds,
                          tool_names(req.tools) if req.tools else None, think=req.think)
    return await respond(req, await Generation.start(spec), chat=True)
