"""The hook interface and `Guard`, the one object `server/generation.py` talks to.

A hook (`PolicyHook`) sees a generation request after auth and limits: `pre` may rewrite the prompts
(text, messages, tool results) in place or deny by raising an `APIError`; `post` may return an
`OutputHook` per choice that rewrites the text as it streams or stops it (`stopped`: the choice
then finishes with `finish_reason: "content_filter"`); `tool_call` may rewrite or stop each tool call
the model writes. The built-in guardrail (`ScrubHook`: PII and content filters from the policy
documents) is the first hook; `policy.hooks` adds others by `module:Class`. Requests outside an
HTTP request (tests, `LLM`) pass through untouched.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
from typing import Any, Protocol

from quart import current_app

from inferflux.server.policy.document import PolicyDocument, merge, scopes_for
from inferflux.server.policy.scrub import Filters, OutputScrubber, scrub_input
from inferflux.server.policy.watch import Watcher
from inferflux.server.tool_calls import ToolCall

log = logging.getLogger(__name__)
_EXTENSION = "inferflux.policy"


@dataclasses.dataclass
class PolicyContext:
    """What a hook knows about the request: who, which route and model, and the policy that applies."""

    tenant: str | None
    key_id: str | None
    scopes: list[str]
    route: str
    model: str
    adapter: str | None
    document: PolicyDocument
    version: int
    salt: bytes
    found: list[str] = dataclasses.field(default_factory=list)  # PII kinds replaced (input and output)


class OutputHook(Protocol):
    stopped: bool

    def feed(self, text: str, final: bool) -> str: ...


class PolicyHook:
    """Subclass and override either method; configured hooks are built with no arguments."""

    def pre(self, ctx: PolicyContext, prompts: list[Any]) -> None:
        """Rewrite `prompts` (generation.Prompt objects) in place, or raise an APIError to deny."""

    def post(self, ctx: PolicyContext, choice: int) -> OutputHook | None:
        """A filter for one choice's text, or None to leave it alone."""
        return None

    def tool_call(self, ctx: PolicyContext, call: ToolCall) -> ToolCall | None:
        """A tool call the model wrote (parsed by server/tool_calls/): the call to send, or None to stop the
        choice (it finishes with `content_filter`, the call is not sent)."""
        return call


class ScrubHook(PolicyHook):
    """The built-in guardrail: the merged policy document's PII actions and content filters."""

    def pre(self, ctx: PolicyContext, prompts: list[Any]) -> None:
        doc = ctx.document
        if doc.empty():
            return
        filters = Filters(doc)

        def clean(text: str) -> str:
            return scrub_input(text, doc, filters, ctx.salt, ctx.found)

        for prompt in prompts:
            if prompt.text is not None:
                prompt.text = clean(prompt.text)
            if prompt.messages is not None:  # user, system, assistant and tool-result contents alike
                prompt.messages = [_clean_message(m, clean) for m in prompt.messages]

    def post(self, ctx: PolicyContext, choice: int) -> OutputHook | None:
        doc = ctx.document
        if not (doc.pii and doc.pii_output) and not (doc.blocked_terms or doc.blocked_patterns):
            return None
        scrubber = OutputScrubber(doc, Filters(doc), ctx.salt)
        scrubber.found = ctx.found
        return scrubber

    def tool_call(self, ctx: PolicyContext, call: ToolCall) -> ToolCall | None:
        """The output rules on each string in the call's arguments (keys and the tool's name are left alone)."""
        doc = ctx.document
        if not (doc.pii and doc.pii_output) and not (doc.blocked_terms or doc.blocked_patterns):
            return call
        filters = Filters(doc)

        def clean(value: Any) -> Any:
            if isinstance(value, str):
                scrubber = OutputScrubber(doc, filters, ctx.salt)
                scrubber.found = ctx.found
                text = scrubber.feed(value, True)
                if scrubber.stopped:  # a blocked term, pattern or `block` entity
                    raise _Stop
                return text
            if isinstance(value, list):
                return [clean(v) for v in value]
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        try:
            return dataclasses.replace(call, arguments=clean(call.arguments))
        except _Stop:
            return None


class _Stop(Exception):
    """A tool call's arguments hit a stop rule."""


def _clean_message(message: dict[str, Any], clean: Any) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": clean(content)}
    if isinstance(content, list):
        parts = [{**p, "text": clean(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                 for p in content]
        return {**message, "content": parts}
    return message


class Runtime:
    """One app's hooks, store and OPA client, and the documents of the newest policy_version.

    Requests read the documents held here (`snapshot`, no store access); the watcher thread
    (`watch.py`: Redis pub/sub plus a `policy.poll_seconds` version poll) and this server's own
    `/admin/policies` changes call `refresh` to move them.
    """

    def __init__(self, app: Any) -> None:
        from inferflux.server.policy.opa import Opa
        from inferflux.server.policy.store import open_policy_store

        config = app.extensions["inferflux"].config
        self.store = open_policy_store(config.state.backend, config.state.redis_url, config.home_path)
        self.hooks: list[PolicyHook] = [ScrubHook(), *(_load(spec) for spec in config.policy.hooks.split(",")
                                                       if spec.strip())]
        opa = config.policy.opa
        self.opa = Opa(opa) if opa.url or opa.rego_file else None
        self._lock = threading.Lock()
        self._current: tuple[int, dict[str, PolicyDocument]] = (-1, {})  # swapped whole: readers take no lock
        self._salt: bytes | None = None
        self.refresh()
        self.watcher: Watcher | None = None
        if config.policy.poll_seconds or config.state.backend == "redis":
            self.watcher = Watcher(self, config.policy.poll_seconds,
                                   config.state.redis_url if config.state.backend == "redis" else None)
            self.watcher.start()

    @property
    def version(self) -> int:
        return self._current[0]

    @property
    def documents(self) -> dict[str, PolicyDocument]:
        return self._current[1]

    def snapshot(self) -> tuple[int, dict[str, PolicyDocument]]:
        """The policy_version and documents in memory: what a request applies (no store read)."""
        return self._current

    def refresh(self) -> int:
        """Reload the documents if the stored policy_version moved (one read when it did not).

        Called from the watcher thread and from admin requests, serialized. The version kept is that of
        the newest document actually loaded, not the sequence's: Redis bumps the sequence just before it
        writes the document (and publishes), so a reload in between must not mark the new version as
        applied, or the message that follows would find nothing to do."""
        with self._lock:
            if self.store.version() != self._current[0]:
                rows = self.store.current()
                documents = {scope: PolicyDocument.model_validate(row["document"]) for scope, row in rows.items()}
                self._current = (max((r["version"] for r in rows.values()), default=0), documents)
            return self._current[0]

    def salt(self) -> bytes:
        if self._salt is None:
            self._salt = self.store.salt()
        return self._salt


def _load(spec: str) -> PolicyHook:
    module, _, name = spec.strip().partition(":")
    hook = getattr(importlib.import_module(module), name)()
    if not isinstance(hook, PolicyHook):
        raise TypeError(f"policy.hooks: {spec} is not a PolicyHook")
    return hook


def runtime(app: Any = None) -> Runtime:
    app = app or current_app
    found = app.extensions.get(_EXTENSION)
    if found is None:
        try:
            found = Runtime(app)
        except Exception as exc:  # noqa: BLE001 - a bad policy.hooks class or .rego file: say which, never a 500
            from inferflux.server.errors import unavailable

            log.error("policy setup failed: %s", exc)
            raise unavailable(f"the server's policy setup failed ({type(exc).__name__}: {exc}); "
                              "check policy.hooks and policy.opa") from None
        app.extensions[_EXTENSION] = found
    return found


__all__ = ["OutputHook", "PolicyContext", "PolicyHook", "Runtime", "ScrubHook", "runtime", "scopes_for", "merge"]
