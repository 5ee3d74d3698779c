"""The `/llm` namespace's `predict` channel (the SDK's `respond()` and `complete()`) and `applyPromptTemplate`.

`predict` gets a chat history and a prediction config stack (LM Studio's KV layers). The history becomes
chat messages rendered with the model's template, as every dialect's chat does; the SDK's `complete()`
sends its prompt as one user message plus a `completeModeFormatting` layer whose template only
concatenates the messages, which is a raw completion here (the text tokenized as `/v1/completions`
does). The generation's text streams back as `fragment` messages and ends with `success`: the
stats (`stopReason`, tokens, tokens per second, time to first token), the instance's info and the
configs that applied. A `cancel` from the client stops the generation (`stopReason: userStopped`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, cast

from inferflux.engine.sampling_params import SamplingParams
from inferflux.server import generation
from inferflux.server.errors import bad_request
from inferflux.server.generation import Finished, Generation, GenerationSpec, Limits, Prompt, ReasoningDelta, TextDelta
from inferflux.server.handle import ModelHandle
from inferflux.server.lmstudio_sdk.framing import Channel, ChannelHandler, Rpc
from inferflux.server.lmstudio_sdk.models import held, instance_info, load_config, specified_model
from inferflux.server.structured import openai_constraint

Json = dict[str, Any]

# The template the SDK's complete() sends (lmstudio/_kv_config.py `_get_completion_config_layer`).
COMPLETION_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
_ROLES = ("system", "user", "assistant")


def config_fields(stack: Any) -> Json:
    """A KV config stack's fields, key -> value; a later layer's value wins, as LM Studio collapses stacks."""
    fields: Json = {}
    layers = stack.get("layers", []) if isinstance(stack, dict) else []
    for layer in layers if isinstance(layers, list) else []:
        config = layer.get("config", {}) if isinstance(layer, dict) else {}
        for field in config.get("fields", []) if isinstance(config, dict) else []:
            if isinstance(field, dict) and isinstance(field.get("key"), str):
                fields[field["key"]] = field.get("value")
    return fields


def _checked(value: Any) -> Any:
    """A checkbox field's value when it is checked (`{"checked": true, "value": v}`), else None."""
    if isinstance(value, dict):
        return value.get("value") if value.get("checked") else None
    return value


def messages_of(history: Any) -> list[Json]:
    """The chat history's messages as chat-template messages (text parts joined)."""
    items = history.get("messages") if isinstance(history, dict) else None
    if not isinstance(items, list) or not items:
        raise bad_request("`history.messages` must be a non-empty list")
    out = []
    for i, message in enumerate(items):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise bad_request(f"history message {i} has role {role!r}: this server takes system, user and assistant "
                              "messages (tool use, the SDK's act(), is not served)")
        parts = message.get("content", [])
        texts = []
        for part in parts if isinstance(parts, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise bad_request(f"history message {i} has a {kind!r} part: only text is served (no files or images)")
            texts.append(str(part.get("text", "")))
        out.append({"role": role, "content": "".join(texts)})
    return out


def _constraint(structured: Any) -> Any:
    if not isinstance(structured, dict) or structured.get("type") in (None, "none"):
        return None
    if structured.get("type") == "json":
        return openai_constraint({"json_schema": structured.get("jsonSchema") or {}})
    if structured.get("type") == "gbnf":
        return openai_constraint({"grammar": structured.get("gbnfGrammar")})
    raise bad_request(f"structured output of type {structured.get('type')!r} is not served (json or gbnf)")


def prediction_spec(param: Any) -> tuple[GenerationSpec, Json]:
    """The `predict` channel's creation parameter as a GenerationSpec, and the config fields it applied."""
    if not isinstance(param, dict):
        raise bad_request("`creationParameter` must be an object")
    fields = config_fields(param.get("predictionConfigStack"))
    tools = fields.get("llm.prediction.tools")
    if isinstance(tools, dict) and tools.get("type") == "toolArray" and tools.get("tools"):
        raise bad_request("tool use (the SDK's act(), tool definitions) is not served: call respond() without tools")
    messages = messages_of(param.get("history"))
    template = fields.get("llm.prediction.promptTemplate")
    prompt = Prompt(messages=messages)
    if isinstance(template, dict):
        if template.get("type") != "jinja":
            raise bad_request(f"prompt templates of type {template.get('type')!r} are not served (jinja only)")
        source = (template.get("jinjaPromptTemplate") or {}).get("template")
        if source == COMPLETION_TEMPLATE:  # complete(): the prompt as is
            prompt = Prompt(text="".join(m["content"] for m in messages))
        elif isinstance(source, str) and source:
            prompt = Prompt(messages=messages, template=source)
    stop = fields.get("llm.prediction.stopStrings")
    temperature = fields.get("llm.prediction.temperature")
    top_k = fields.get("llm.prediction.topKSampling")
    top_p = _checked(fields.get("llm.prediction.topPSampling"))
    min_p = _checked(fields.get("llm.prediction.minPSampling"))
    repeat = _checked(fields.get("llm.prediction.repeatPenalty"))
    max_tokens = _checked(fields.get("llm.prediction.maxPredictedTokens"))
    try:
        params = SamplingParams(max_tokens=None, temperature=1.0 if temperature is None else float(temperature),
                                top_p=1.0 if top_p is None else float(top_p), top_k=int(top_k or 0),
                                min_p=float(min_p or 0.0), repetition_penalty=1.0 if repeat is None else float(repeat),
                                stop=[str(s) for s in stop] if isinstance(stop, list) and stop else None)
    except (TypeError, ValueError) as exc:
        raise bad_request(f"a prediction setting has the wrong type: {exc}") from None
    params.constraint = _constraint(fields.get("llm.prediction.structured"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise bad_request("`maxTokens` must be a positive integer (or false for no limit)")
    spec = GenerationSpec(model=specified_model(param.get("modelSpecifier")), prompts=[prompt], params=params,
                          limits=Limits(max_tokens=max_tokens, overflow="cap"))
    return spec, fields


def _stop_reason(done: Finished | None, cancelled: bool) -> str:
    if cancelled or done is None:
        return "userStopped"
    if done.reason == "length":
        return "maxPredictedTokensReached"
    return "stopStringFound" if isinstance(done.stop_reason, str) else "eosFound"


def _stats(done: Finished | None, cancelled: bool) -> Json:
    stats: Json = {"stopReason": _stop_reason(done, cancelled)}
    if done is not None:
        t = done.timings
        span = (t.last_token - t.first_token) if t.last_token is not None and t.first_token is not None else 0.0
        stats.update(promptTokensCount=done.prompt_tokens, predictedTokensCount=done.completion_tokens,
                     totalTokensCount=done.prompt_tokens + done.completion_tokens,
                     tokensPerSecond=(done.completion_tokens - 1) / span if span > 0 else 0.0,
                     timeToFirstTokenSec=round(t.ttft or 0.0, 4))
    return stats


def _fragment(handle: ModelHandle, text: str, reasoning: str) -> Json:
    return {"type": "fragment", "fragment": {
        "content": text, "tokensCount": len(handle.tokenizer.encode(text, add_special_tokens=False)) if text else 0,
        "containsDrafted": False, "reasoningType": reasoning}}


async def predict(channel: Channel, param: Any) -> None:
    spec, fields = prediction_spec(param)
    gen = await Generation.start(spec)
    handle, done, cancelled, thinking = gen.handle, None, False, False
    events = cast(AsyncGenerator[Any, None], gen.events())  # an async generator: closed at once on a cancel
    try:
        async for event in events:
            if channel.cancelled.is_set():
                cancelled = True
                break
            if isinstance(event, ReasoningDelta) and event.text:
                if not thinking:
                    thinking = True
                    await channel.send(_fragment(handle, "<think>", "reasoningStartTag"))
                await channel.send(_fragment(handle, event.text, "reasoning"))
            elif isinstance(event, TextDelta) and event.text:
                if thinking:
                    thinking = False
                    await channel.send(_fragment(handle, "</think>", "reasoningEndTag"))
                await channel.send(_fragment(handle, event.text, "none"))
            elif isinstance(event, Finished):
                done = event
    finally:
        await events.aclose()  # a cancelled prediction stops in the engine now
        gen.close()
    if thinking:
        await channel.send(_fragment(handle, "</think>", "reasoningEndTag"))
    await channel.send({"type": "success", "stats": _stats(done, cancelled),
                        "modelInfo": await instance_info(handle, "llm"),
                        "loadModelConfig": load_config(handle, "llm"),
                        "predictionConfig": {"fields": [{"key": k, "value": v} for k, v in fields.items()]}})


async def apply_prompt_template(param: Any) -> Json:
    """The history rendered with the model's chat template (what `llm.apply_prompt_template()` returns)."""
    if not isinstance(param, dict):
        raise bad_request("`parameter` must be an object")
    messages = messages_of(param.get("history"))
    handle = await held(specified_model(param.get("specifier")))
    try:
        if not handle.generative:
            raise bad_request(f"the model `{handle.name}` is an embedding model: it has no prompt template")
        rendered: list[str | None] = []
        generation.encode(Prompt(messages=messages), handle, rendered)
        return {"formatted": rendered[0] or ""}
    finally:
        handle.release()


def llm_endpoints() -> tuple[dict[str, Rpc], dict[str, ChannelHandler]]:
    return {"applyPromptTemplate": apply_prompt_template}, {"predict": predict}
