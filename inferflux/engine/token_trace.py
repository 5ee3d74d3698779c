"""The last N requests' sampled tokens, for the `/debug` page's token trace.

The engine thread appends one entry per sampled token (id, logprob, the top alternatives the step
computed, the time); the HTTP side reads a copy. Only the engine writes tokens and only under the
lock, so a reader never sees a half-appended entry. Text is not decoded here: the engine thread
must stay on the step loop, so the reader decodes ids when it renders them.

While a trace is attached every sampled row asks its step for at least `top_n` alternatives (the
engine's `_chunk`), so a request that asked for no logprobs still shows what else the model
considered; its response carries only what it asked for. The sampler computes one static top-N
(`runtime.max_logprobs`) for the whole batch and runs it only when some row wants any, so with no
trace attached a step whose rows want no logprobs still skips that work.

Off unless the server serves `/debug` (`server.debug_ui`, or `security.auth: required` for the
`admin` scope): the engine's hook is then a `None` check per token and nothing else.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

MAX_TOKENS_PER_REQUEST = 4096  # a runaway generation must not grow the trace without bound


class TokenTrace:
    """A bounded, thread-safe ring of per-request token lists (oldest request dropped first)."""

    def __init__(self, max_requests: int = 32, top_n: int = 0) -> None:
        self.max_requests = max_requests
        self.top_n = top_n  # alternatives recorded per token, whatever the request asked for
        self._lock = threading.Lock()
        self._requests: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def _entry(self, request_id: str) -> dict[str, Any]:
        entry = self._requests.get(request_id)
        if entry is None:
            entry = self._requests[request_id] = {"engine_request_id": request_id, "started": time.time(),
                                                  "labels": {}, "samples": {}}
            while len(self._requests) > self.max_requests:
                self._requests.popitem(last=False)
        return entry

    def describe(self, engine_request_id: str, labels: dict[str, Any]) -> None:
        """Attach the server's view of a request (its HTTP request id, model, tenant) to its trace."""
        with self._lock:
            self._entry(engine_request_id)["labels"].update(labels)

    def token(self, request_id: str, sample: int, token_id: int, logprob: float, top_ids: Sequence[int],
              top_logprobs: Sequence[float], now: float) -> None:
        """One sampled token (engine thread). `now` is the step's monotonic time."""
        with self._lock:
            tokens = self._entry(request_id)["samples"].setdefault(sample, [])
            if len(tokens) < MAX_TOKENS_PER_REQUEST:
                # -inf: a step that skipped the top-N (a speculative verify step whose rows asked for none)
                top = [(int(t), float(v)) for t, v in zip(top_ids, top_logprobs) if math.isfinite(v)]
                tokens.append((int(token_id), float(logprob), top, now))

    def finish(self, request_id: str, sample: int, reason: str | None) -> None:
        with self._lock:
            entry = self._requests.get(request_id)
            if entry is not None:
                entry.setdefault("finish_reasons", {})[sample] = reason

    def snapshot(self) -> list[dict[str, Any]]:
        """A copy of every kept request, newest first (token lists copied, so readers never race the engine)."""
        with self._lock:
            return [{**entry, "labels": dict(entry["labels"]),
                     "finish_reasons": dict(entry.get("finish_reasons", {})),
                     "samples": {k: list(v) for k, v in entry["samples"].items()}}
                    for entry in reversed(self._requests.values())]
