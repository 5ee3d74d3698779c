"""The server side of the /debug token trace: switch it on per engine, label requests, render tokens.

The engine records sampled tokens (engine/token_trace.py) only once a `TokenTrace` is attached to its
core. `follow` attaches one the first time a request runs on an engine while the app serves `/debug`
(so a model loaded on demand is traced from its first request) and labels the engine's request ids
with the HTTP request's id, model and tenant, which is how the page names them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from quart import current_app, has_app_context

from inferflux.engine.token_trace import TokenTrace
from inferflux.server import record

ENABLED = "inferflux.debug_ui"  # app.extensions flag: the app serves /debug
MAX_REQUESTS = 32  # the page shows the last this-many requests per model
TOP_N = 5  # alternatives per token in the trace, whether or not the request asked for logprobs


def follow(handle: Any, requests: Sequence[Any]) -> None:
    """Trace these engine requests' tokens when the app serves /debug (a no-op otherwise)."""
    if not has_app_context() or not current_app.extensions.get(ENABLED):
        return
    engine = getattr(handle, "engine", None)
    if engine is None:
        return
    trace = engine.core.token_trace
    if trace is None:
        # One attribute write: the engine sees it next token. The trace shows TOP_N alternatives of every token
        # (or what runtime.max_logprobs allows), also for requests that asked for none.
        top_n = min(TOP_N, engine.core.config.runtime.max_logprobs)
        trace = engine.core.token_trace = TokenTrace(MAX_REQUESTS, top_n)
    rec = record.current()
    for request in requests:
        trace.describe(request.request_id, {
            "request_id": rec.request_id if rec else None, "model": handle.name, "route": rec.route if rec else None,
            "tenant": rec.tenant if rec else None, "prompt_tokens": len(request.prompt_ids),
            "max_tokens": request.params.max_tokens})


def _logprob(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else round(value, 4)


def render(handle: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """One traced request as JSON: per sample, each token with its text, logprob, alternatives and gap."""
    tokenizer = handle.engine.core.tokenizer

    def text(token_id: int) -> str:  # as the OpenAI dialect's logprobs write a token
        return tokenizer.token_to_piece(token_id).decode("utf-8", errors="replace")

    samples = []
    for index, tokens in sorted(entry["samples"].items()):
        rows, previous = [], None
        for token_id, logprob, top, at in tokens:
            rows.append({"id": token_id, "text": text(token_id), "logprob": _logprob(logprob),
                         "top": [{"id": t, "text": text(t), "logprob": _logprob(v)} for t, v in top],
                         "gap_ms": None if previous is None else round((at - previous) * 1000, 3)})
            previous = at
        samples.append({"index": index, "finish_reason": entry["finish_reasons"].get(index), "tokens": rows})
    return {**summary(handle, entry), "samples": samples}


def summary(handle: Any, entry: dict[str, Any]) -> dict[str, Any]:
    labels = entry["labels"]
    return {"engine_request_id": entry["engine_request_id"], "request_id": labels.get("request_id"),
            "model": labels.get("model", handle.name), "route": labels.get("route"), "tenant": labels.get("tenant"),
            "prompt_tokens": labels.get("prompt_tokens"), "started": entry["started"],
            "age_s": round(time.time() - entry["started"], 3),
            "output_tokens": sum(len(t) for t in entry["samples"].values()),
            "finished": bool(entry["finish_reasons"]) and len(entry["finish_reasons"]) >= len(entry["samples"])}
