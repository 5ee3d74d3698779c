"""One request's record: who asked, which route and model, how many tokens, how it ended.

The request path (docs/security.md) is auth -> scope -> tenant limit -> policy -> engine, and two
things must happen exactly once when a request *ends*: the tenant's limits are reconciled with
what it really used, and one audit line is written. "Ends" is not one place in Quart: a JSON answer
is done when `after_request` runs, but a streamed body is still running then, and its token counts
are known only when the generation closes. So the record is reference-counted: the request itself
holds it (released by the app's `after_request`), and a `Generation` or embedding call holds it
while it runs (released in its `close`). When the count reaches zero the app's finish hooks run in
the order they were added, each guarded: a hook that fails is logged, never raised into a response.

`begin()` makes the record in the app's first `before_request`, so even a request refused by auth
(401) or a limit (429) gets one. Code without a request context (tests, `LLM`) sees `current()`
return None and skips all of this.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from quart import g, has_request_context, has_websocket_context

log = logging.getLogger(__name__)

FinishHook = Callable[["RequestRecord"], None]
_HOOKS = "inferflux.finish_hooks"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclasses.dataclass
class RequestRecord:
    """What the audit log and the limiter need to know about one request (never a secret)."""

    request_id: str
    method: str
    route: str  # the Quart endpoint name (`openai.chat_completions`), "" when no route matched
    path: str
    started: float  # time.time() at arrival
    principal: Any = None  # access.keys.Principal when a key or token was checked, else None
    model: str | None = None
    adapter: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0
    policy: str | None = None  # the policy decision, once policies exist ("allow", "deny:<rule>", ...)
    error: str | None = None  # the error code of a refused or failed request
    # Per-subsystem state that must travel with the request (e.g. the limiter's reservation).
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    _hooks: list[FinishHook] = dataclasses.field(default_factory=list, repr=False)
    _holds: int = dataclasses.field(default=1, repr=False)

    @property
    def tenant(self) -> str | None:
        return getattr(self.principal, "tenant", None)

    @property
    def key_id(self) -> str | None:
        return getattr(self.principal, "key_id", None)

    @property
    def finished(self) -> bool:
        return self._holds <= 0

    def add_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count tokens a generation or embedding used (called once per finished part)."""
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def hold(self) -> None:
        """Keep the record open past `after_request` (a streamed body is still running)."""
        self._holds += 1

    def release(self) -> None:
        """Drop one hold; the last one runs the finish hooks."""
        self._holds -= 1
        if self._holds != 0:
            return
        for hook in self._hooks:
            try:
                hook(self)
            except Exception:  # a finish hook must never turn a served answer into an error
                log.exception("request %s: finish hook %s failed", self.request_id, getattr(hook, "__name__", hook))


def new_request_id() -> str:
    """A short random id, sent back as `x-request-id` (OpenAI's header) and written in the audit log."""
    return "req_" + secrets.token_hex(12)


def begin(app: Any, method: str, route: str, path: str, request_id: str | None = None) -> RequestRecord:
    """Make this request's record (on `g.record`); the app's finish hooks run when it finishes.

    A client's own `x-request-id` is kept when it is a short plain token (so a caller can find its
    request in the audit log); anything else gets a fresh id.
    """
    rid = request_id if request_id and _REQUEST_ID.fullmatch(request_id) else new_request_id()
    record = RequestRecord(rid, method, route, path, time.time(), _hooks=finish_hooks(app))
    g.record = record
    return record


def add_finish_hook(app: Any, hook: FinishHook) -> None:
    """Run `hook(record)` when each of `app`'s requests finishes (after the hooks added before it)."""
    app.extensions.setdefault(_HOOKS, []).append(hook)


def finish_hooks(app: Any) -> list[FinishHook]:
    return list(app.extensions.get(_HOOKS, ()))


def current() -> RequestRecord | None:
    """This request's record, or None outside a request (or before `begin`)."""
    if not (has_request_context() or has_websocket_context()):
        return None
    return g.get("record")


__all__ = ["FinishHook", "RequestRecord", "add_finish_hook", "begin", "current", "finish_hooks", "new_request_id"]
