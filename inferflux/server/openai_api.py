"""The OpenAI surface: chat and text completions (streamed or not), models, tokenize, WebSocket chat.

Handlers turn a request body into engine `Request`s and engine deltas into
OpenAI objects; they never touch the device. Streams are Server-Sent Events
(`data: {chunk}` ... `data: [DONE]`). A client that disconnects cancels the
handler's generator, which aborts the engine request and frees its pages.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, current_app, g, request, websocket

from inferflux import __version__
from inferflux.engine.engine import EngineDeadError
from inferflux.engine.request import Request, StreamOutput
from inferflux.engine.sampling_params import SamplingParams, SamplingParamsError
from inferflux.engine.sequence import TokenLogprobs
from inferflux.formats.chat_template import ChatTemplateError
from inferflux.server.errors import APIError, bad_request, model_not_found, unavailable
from inferflux.server.model_pool import Listed, parse_keep_alive, tagged
from inferflux.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from inferflux.server.state import ModelHandle, ServerState
from inferflux.server.tool_calls import ToolCallStream, tool_names

bp = Blueprint("openai", __name__)
M = TypeVar("M", bound=BaseModel)


def server_state() -> ServerState:
    return current_app.extensions["inferflux"]


async def acquire(model: str | None, ttl: int | None = None) -> ModelHandle:
    """The model a request names, loaded if need be and held until `release()`.

    `ttl` (LM Studio's idle time-to-live, in seconds; negative = forever) sets its keep-alive.
    """
    handle = await server_state().acquire(model, parse_keep_alive(ttl))
    g.inferflux_handle = handle
    return handle


def generative(handle: ModelHandle) -> ModelHandle:
    """Refuse generation on an embedding-only model, with a clear 400."""
    if handle.engine is None:
        handle.release()
        raise bad_request(f"the model `{handle.name}` is an embedding model; use /v1/embeddings", param="model")
    return handle


# --- parsing ---


def parse_json(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"invalid value for `{param}`: {first['msg']}", param=param) from None


async def body(model: type[M]) -> M:
    return validate(model, parse_json(await request.get_data()))


def sampling_for(req: ChatCompletionRequest | CompletionRequest, prompt_len: int,
                 handle: ModelHandle) -> SamplingParams:
    """SamplingParams for one prompt, with the context-window check OpenAI clients expect."""
    context = handle.max_model_len
    default = server_state().config.server.default_max_tokens
    requested = req.requested_max_tokens
    scoring = req.num_prompt_logprobs is not None or getattr(req, "echo", False)
    if requested is not None and requested < 1 and requested != -1 and not (requested == 0 and scoring):
        raise bad_request("max_tokens must be at least 1 (or -1 for no limit; 0 only with echo)",
                          param="max_tokens")
    if req.n < 1:
        raise bad_request("n must be at least 1", param="n")
    if requested == -1:  # LM Studio's "no limit": up to the context window
        requested = None
    if requested is None:
        max_tokens = min(default, context - prompt_len) if default else context - prompt_len
    else:
        max_tokens = requested
    if prompt_len + max(max_tokens, 1) > context or (max_tokens < 1 and requested != 0):
        raise bad_request(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or the completion length.", param="max_tokens",
            code="context_length_exceeded")
    params = req.sampling_params(max_tokens, req.num_logprobs, req.num_prompt_logprobs)
    try:
        runtime = handle.engine.core.config.runtime
        params.validate(handle.model.config.vocab_size, runtime.max_logprobs, runtime.max_logit_bias)
    except SamplingParamsError as exc:
        raise bad_request(str(exc)) from None
    return params


async def submit(handle: ModelHandle, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamOutput]:
    server_state().check_capacity(handle)
    try:
        return await handle.engine.submit(Request(prompt_ids, params))
    except SamplingParamsError as exc:
        raise bad_request(str(exc)) from None
    except EngineDeadError as exc:
        raise unavailable(str(exc)) from None


# --- output formatting ---


def token_text(handle: ModelHandle, token_id: int) -> str:
    return handle.model.tokenizer.token_to_piece(token_id).decode("utf-8", errors="replace")


def chat_logprobs(handle: ModelHandle, out: StreamOutput) -> dict[str, Any] | None:
    if out.new_logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        piece = handle.model.tokenizer.token_to_piece(token_id)
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}

    return {"content": [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
        for lp in out.new_logprobs
    ]}


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Tracker:
    """Per-request latency bookkeeping for /metrics.

    Made in the handler (where the app context exists) because streamed bodies
    run after the request context is gone.
    """

    def __init__(self) -> None:
        self.metrics = server_state().metrics
        self.times: dict[int, list[float]] = {}
        self.finished: list[StreamOutput] = []

    def see(self, out: StreamOutput) -> None:
        if out.new_token_ids and out.last_token_time is not None:
            self.times.setdefault(out.index, []).append(out.last_token_time)
        if out.finished:
            self.finished.append(out)

    def stats(self) -> dict[str, Any]:
        """LM Studio's `stats` of the first sample: speed, time to first token, generation time, stop reason."""
        out = self.finished[0] if self.finished else None
        times = self.times.get(0, [])
        if out is None or not times:
            return {"tokens_per_second": 0.0, "time_to_first_token": None, "generation_time": 0.0,
                    "stop_reason": "userStopped"}
        generation = times[-1] - out.arrival_time
        ttft = (out.first_token_time or times[0]) - out.arrival_time
        if out.finish_reason == "length":
            reason = "maxPredictedTokensReached"
        elif isinstance(out.stop_reason, str):
            reason = "stopStringFound"
        else:
            reason = "eosFound"
        return {"tokens_per_second": out.completion_tokens / generation if generation > 0 else 0.0,
                "time_to_first_token": ttft, "generation_time": generation, "stop_reason": reason}

    def report(self) -> None:
        metrics = self.metrics
        for out in self.finished:
            times = self.times.get(out.index, [])
            ttft = out.first_token_time - out.arrival_time if out.first_token_time else None
            gaps = [b - a for a, b in zip(times, times[1:])]
            e2e = (times[-1] if times else time.monotonic()) - out.arrival_time
            metrics.observe_finished(ttft, gaps, e2e, out.finish_reason or "abort")


async def merged(streams: list[tuple[int, AsyncIterator[StreamOutput]]]) -> AsyncIterator[tuple[int, StreamOutput]]:
    """Interleave several request streams as their outputs arrive (multi-prompt completions)."""
    if len(streams) == 1:
        key, stream = streams[0]
        async for out in stream:
            yield key, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(key: int, stream: AsyncIterator[StreamOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((key, out))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(k, s)) for k, s in streams]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def streaming_response(events: AsyncIterator[str]) -> Response:
    response = Response(events, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None
    return response


# --- chat ---


def chat_prompt(req: ChatCompletionRequest, handle: ModelHandle) -> list[int]:
    try:
        text = handle.model.chat_template.render(
            [m.for_template() for m in req.messages], add_generation_prompt=req.add_generation_prompt,
            tools=req.tools, **(req.chat_template_kwargs or {}))
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="messages") from None
    # The template writes BOS and other special tokens as text itself.
    return handle.model.tokenizer.encode(text, add_special_tokens=False)


async def chat_chunks(req: ChatCompletionRequest, handle: ModelHandle, stream: AsyncIterator[StreamOutput],
                      with_usage: bool, tracker: _Tracker) -> AsyncIterator[dict[str, Any]]:
    """The chat.completion.chunk objects of one request: roles first, then text, then usage if asked."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    completion, prompt_tokens, cached = 0, 0, 0
    # With tools, each choice's text goes through the tool-call parser: calls become `tool_calls` deltas.
    parsers = {i: ToolCallStream(tool_names(req.tools)) for i in range(req.n)} if req.parses_tools else {}
    num_calls = [0] * req.n

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": handle.name,
               "choices": choices, **extra}
        if with_usage and "usage" not in obj:
            obj["usage"] = None
        return obj

    try:
        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for out in stream:
            tracker.see(out)
            _raise_if_aborted(out)
            prompt_tokens, cached = out.prompt_tokens, out.cached_tokens
            text, calls = out.new_text, []
            parser = parsers.get(out.index)
            if parser is not None:
                text, calls = parser.feed(out.new_text)
                if out.finished:
                    rest, more = parser.finish()
                    text, calls = text + rest, calls + more
            if text or out.new_logprobs:
                yield chunk([{"index": out.index, "delta": {"content": text},
                              "logprobs": chat_logprobs(handle, out), "finish_reason": None}])
            if calls:
                first = num_calls[out.index]
                num_calls[out.index] += len(calls)
                yield chunk([{"index": out.index, "logprobs": None, "finish_reason": None, "delta": {
                    "tool_calls": [call.openai(first + j) for j, call in enumerate(calls)]}}])
            if out.finished:
                completion += out.completion_tokens
                reason = "tool_calls" if num_calls[out.index] else _finish(out.finish_reason)
                yield chunk([{"index": out.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if with_usage:
            yield chunk([], usage=usage(prompt_tokens, completion, cached))
    finally:
        tracker.report()


def _raise_if_aborted(out: StreamOutput) -> None:
    if out.finish_reason == "abort":  # the engine stopped under us (shutdown past the drain deadline)
        raise unavailable("the server shut down before this request finished")


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


@bp.post("/v1/chat/completions")
async def chat_completions() -> Any:
    req = await body(ChatCompletionRequest)
    handle = generative(await acquire(req.model, req.ttl))
    try:
        prompt = chat_prompt(req, handle)
        stream = await submit(handle, prompt, sampling_for(req, len(prompt), handle))
    except BaseException:
        handle.release()
        raise
    tracker = g.inferflux_tracker = _Tracker()
    if req.stream:
        async def events() -> AsyncIterator[str]:
            try:
                async for obj in chat_chunks(req, handle, stream, req.include_usage, tracker):
                    yield sse(obj)
            except APIError as exc:  # headers are sent: report it in the stream
                yield sse(exc.body())
            finally:
                handle.release()
            yield sse("[DONE]")

        return streaming_response(events())
    try:
        texts, finish, logprobs = [""] * req.n, ["stop"] * req.n, [[] for _ in range(req.n)]
        calls: list[list[dict[str, Any]]] = [[] for _ in range(req.n)]
        async for obj in chat_chunks(req, handle, stream, True, tracker):
            for choice in obj["choices"]:
                texts[choice["index"]] += choice["delta"].get("content", "")
                calls[choice["index"]] += [{k: v for k, v in c.items() if k != "index"}
                                           for c in choice["delta"].get("tool_calls", [])]
                if choice["finish_reason"]:
                    finish[choice["index"]] = choice["finish_reason"]
                if choice["logprobs"]:
                    logprobs[choice["index"]] += choice["logprobs"]["content"]
            last = obj
    finally:
        handle.release()
    return {
        "id": last["id"], "object": "chat.completion", "created": last["created"], "model": handle.name,
        "choices": [{"index": i, "message": _message(texts[i], calls[i]),
                     "logprobs": {"content": logprobs[i]} if req.logprobs else None, "finish_reason": finish[i]}
                    for i in range(req.n)],
        "usage": last["usage"],
    }


def _message(text: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


# --- text completions ---


def completion_prompts(req: CompletionRequest, handle: ModelHandle) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    if not prompt:
        raise bad_request("the prompt is empty", param="prompt")
    tokenizer = handle.model.tokenizer
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]


@bp.post("/v1/completions")
async def completions() -> Any:
    req = await body(CompletionRequest)
    if req.suffix:
        raise bad_request("`suffix` (fill-in-the-middle) is not supported", param="suffix")
    handle = generative(await acquire(req.model, req.ttl))
    try:
        prompts = completion_prompts(req, handle)
        params = [sampling_for(req, len(p), handle) for p in prompts]
        streams = [(i, await submit(handle, p, sp)) for i, (p, sp) in enumerate(zip(prompts, params))]
    except BaseException:
        handle.release()
        raise
    cmpl_id, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.n
    echo = echo_texts(req, prompts, handle) if req.echo else [""] * len(prompts)

    tracker = g.inferflux_tracker = _Tracker()

    async def objects() -> AsyncIterator[dict[str, Any]]:
        completion = 0
        prompt_tokens = sum(len(p) for p in prompts)
        cached = 0
        echoed: set[tuple[int, int]] = set()
        try:
            async for pi, out in merged(streams):
                tracker.see(out)
                _raise_if_aborted(out)
                if (pi, out.index) not in echoed and (req.echo or req.prompt_logprobs is not None):
                    echoed.add((pi, out.index))  # each choice's first output: the prompt, scored if asked
                    scored = out.prompt_logprobs if req.logprobs is not None and req.echo else None
                    extra = {} if req.prompt_logprobs is None else {
                        "prompt_logprobs": _vllm_prompt_logprobs(handle, out.prompt_logprobs or [])}
                    yield _cmpl_chunk(cmpl_id, created, handle, pi * n + out.index, echo[pi],
                                      None if scored is None else _legacy_logprobs(handle, scored, prompts[pi]),
                                      None, **extra)
                if out.finished:
                    completion += out.completion_tokens
                    cached += out.cached_tokens
                logprobs = _legacy_logprobs(handle, out.new_logprobs) if out.new_logprobs is not None else None
                if out.new_text or out.finished or logprobs:
                    yield _cmpl_chunk(cmpl_id, created, handle, pi * n + out.index, out.new_text, logprobs,
                                      _finish(out.finish_reason) if out.finished else None)
            if req.include_usage or not req.stream:
                yield {"id": cmpl_id, "object": "text_completion", "created": created, "model": handle.name,
                       "choices": [], "usage": usage(prompt_tokens, completion, cached // max(n, 1))}
        finally:
            tracker.report()

    if req.stream:
        async def events() -> AsyncIterator[str]:
            try:
                async for obj in objects():
                    yield sse(obj)
            except APIError as exc:
                yield sse(exc.body())
            finally:
                handle.release()
            yield sse("[DONE]")

        return streaming_response(events())
    total = len(prompts) * n
    texts, finish = [""] * total, ["stop"] * total
    logprobs: list[dict[str, list]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                                       for _ in range(total)]
    prompt_scores: list[list | None] = [None] * total
    try:
        async for obj in objects():
            if "usage" in obj and not obj["choices"]:
                totals = obj["usage"]
            for choice in obj["choices"]:
                i = choice["index"]
                if choice["logprobs"]:
                    offset = len(texts[i])
                    for key in ("tokens", "token_logprobs", "top_logprobs"):
                        logprobs[i][key] += choice["logprobs"][key]
                    logprobs[i]["text_offset"] += [offset + o for o in choice["logprobs"]["text_offset"]]
                texts[i] += choice["text"]
                if "prompt_logprobs" in choice:
                    prompt_scores[i] = choice["prompt_logprobs"]
                if choice["finish_reason"]:
                    finish[i] = choice["finish_reason"]
    finally:
        handle.release()
    return {"id": cmpl_id, "object": "text_completion", "created": created, "model": handle.name,
            "choices": [{"index": i, "text": texts[i], "logprobs": logprobs[i] if req.logprobs is not None else None,
                         "finish_reason": finish[i],
                         **({"prompt_logprobs": prompt_scores[i]} if req.prompt_logprobs is not None else {})}
                        for i in range(total)],
            "usage": totals}


def _cmpl_chunk(cmpl_id: str, created: int, handle: ModelHandle, index: int, text: str,
                logprobs: dict[str, Any] | None, finish: str | None, **extra: Any) -> dict[str, Any]:
    return {"id": cmpl_id, "object": "text_completion", "created": created, "model": handle.name,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, **extra}]}


def _vllm_prompt_logprobs(handle: ModelHandle, entries: list[TokenLogprobs | None]) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, {token id: {logprob, rank, decoded_token}} (None first)."""
    out: list[dict[str, Any] | None] = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        ranked = sorted(lp.top.items(), key=lambda kv: -kv[1])
        row = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": token_text(handle, t)}
               for r, (t, v) in enumerate(ranked)}
        if str(lp.token_id) not in row:
            row[str(lp.token_id)] = {"logprob": lp.logprob, "rank": None,
                                     "decoded_token": token_text(handle, lp.token_id)}
        out.append(row)
    return out


def echo_texts(req: CompletionRequest, prompts: list[list[int]], handle: ModelHandle) -> list[str]:
    """The prompt as the client sent it (text prompts verbatim), never with the BOS the server added."""
    given = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    return [given[i] if isinstance(given[i], str) else handle.model.tokenizer.decode(p, skip_special_tokens=True)
            for i, p in enumerate(prompts)]


def _legacy_logprobs(handle: ModelHandle, entries: list[TokenLogprobs | None],
                     token_ids: list[int] | None = None) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object; `token_ids` names the tokens of entries that are None (a prompt's first)."""
    ids = [lp.token_id if lp is not None else token_ids[i] for i, lp in enumerate(entries)]  # type: ignore[index]
    special = {handle.model.tokenizer.bos_id}
    tokens = [token_text(handle, t) for t in ids]
    offsets, position = [], 0
    for token_id, token in zip(ids, tokens):
        offsets.append(position)
        position += 0 if token_id in special else len(token)  # BOS is not part of the echoed text
    return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for lp in entries],
            "top_logprobs": [None if lp is None else {token_text(handle, t): v for t, v in lp.top.items()}
                             for lp in entries],
            "text_offset": offsets}


# --- models, tokenizer, version ---


def model_card(row: Listed) -> dict[str, Any]:
    """One `/v1/models` entry: the default model's names, then the stored models (`name:tag`)."""
    pool = server_state().pool
    handle = pool.default_handle() if row.default else None
    created = handle.created if handle is not None else (
        int(row.stored.modified.timestamp()) if row.stored is not None else int(server_state().started))
    card = {"id": row.name, "object": "model", "created": created, "owned_by": "inferflux",
            "root": str(pool.default.path) if row.default else row.name, "parent": None}
    if handle is not None:
        card["max_model_len"] = handle.max_model_len
    return card


def find_model(model_id: str) -> Listed:
    """The listed model called `model_id` (`name` also matches `name:latest`), or a 404."""
    for row in server_state().pool.names():
        if model_id == row.name or tagged(model_id) == tagged(row.name):
            return row
    raise model_not_found(model_id)


@bp.get("/v1/models")
async def list_models() -> Any:
    rows = await asyncio.to_thread(server_state().pool.names)
    return {"object": "list", "data": [model_card(row) for row in rows]}


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Any:
    return model_card(await asyncio.to_thread(find_model, model_id))


@bp.post("/tokenize")
async def tokenize() -> Any:
    req = await body(TokenizeRequest)
    if not req.messages and req.prompt is None:  # an empty list is no conversation either
        raise bad_request("give `prompt` or a non-empty `messages`", param="prompt")
    handle = await acquire(req.model)
    try:
        if req.messages:
            if handle.engine is None:
                raise bad_request(f"the model `{handle.name}` is an embedding model; it has no chat template",
                                  param="messages")
            ids = chat_prompt(ChatCompletionRequest(model=handle.name, messages=req.messages,
                                                    add_generation_prompt=req.add_generation_prompt), handle)
        else:
            ids = handle.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": handle.max_model_len}
    finally:
        handle.release()


@bp.get("/tokenizer_info")
async def tokenizer_info() -> Any:
    """vLLM's tokenizer facts, which lm-evaluation-harness reads to tokenize through the server (`/tokenize`)."""
    handle = await acquire(request.args.get("model"))
    try:
        tokenizer = handle.tokenizer

        def text(token_id: int | None) -> str | None:
            return None if token_id is None else tokenizer.id_to_token(token_id)

        template = handle.model.chat_template if handle.engine is not None else None
        return {"tokenizer_class": "InferFluxTokenizer", "model_max_length": handle.max_model_len,
                "vocab_size": tokenizer.vocab_size, "bos_token": text(tokenizer.bos_id),
                "eos_token": text(tokenizer.eos_id), "pad_token": None, "add_bos_token": tokenizer.add_bos,
                "chat_template": None if template is None or template.is_fallback else template.source}
    finally:
        handle.release()


@bp.post("/detokenize")
async def detokenize() -> Any:
    req = await body(DetokenizeRequest)
    handle = await acquire(req.model)
    try:
        vocab = handle.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise bad_request(f"token ids must be in 0..{vocab - 1}", param="tokens")
        return {"prompt": handle.tokenizer.decode(req.tokens)}
    finally:
        handle.release()


@bp.get("/version")
async def version() -> Any:
    return {"version": __version__}


# --- WebSocket chat ---


@bp.websocket("/v1/chat/completions/ws")
async def chat_websocket() -> None:
    """One JSON chat request in; its chunk objects out; then `{"object": "done"}` and close."""
    try:
        req = validate(ChatCompletionRequest, parse_json(await websocket.receive()))
        handle = generative(await server_state().acquire(req.model, parse_keep_alive(req.ttl)))
    except APIError as exc:
        await websocket.send(json.dumps(exc.body()))
        await websocket.close(1008)
        return
    try:
        prompt = chat_prompt(req, handle)
        stream = await submit(handle, prompt, sampling_for(req, len(prompt), handle))
        async for obj in chat_chunks(req, handle, stream, req.include_usage, _Tracker()):
            await websocket.send(json.dumps(obj, ensure_ascii=False))
        await websocket.send(json.dumps({"object": "done"}))
    except APIError as exc:
        await websocket.send(json.dumps(exc.body()))
    finally:
        handle.release()
    await websocket.close(1000)
