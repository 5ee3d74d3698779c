"""`Guard`: the policy steps of one generation request, as `server/generation.py` calls them.

`before` (after auth, before the template renders): the hooks' `pre`, which may rewrite or deny.
`admit` (once prompts are encoded and max_tokens known, after the tenant's limits): the OPA
decision. `after` wraps the event stream: each choice's text goes through the hooks' `post`
filters and its tool calls through their `tool_call`; a stopped choice sends no more text, its
engine request is aborted (the generation's `stop_choice`), and it finishes with `content_filter`.
`embedding_inputs` runs the pre-hooks on an embedding request's texts. The decision lands
on the request's record (`record.policy`, in the audit log): `allow`, `scrubbed`, `deny:content`,
`deny:opa` or `content_filter`, plus ` opa=<decision id>` when OPA was asked.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable
from typing import Any

from inferflux.server import record
from inferflux.server.access.errors import PermissionDenied
from inferflux.server.errors import APIError
from inferflux.server.policy.document import merge, scopes_for
from inferflux.server.policy.hooks import OutputHook, PolicyContext, Runtime, runtime


class Guard:
    """Nothing to do: requests outside an HTTP request, and the base of `ActiveGuard`."""

    async def admit(self, requests: list[Any]) -> None:
        return None

    def after(self, events: AsyncGenerator[Any, None],
              stop: Callable[[int], None] | None = None) -> AsyncGenerator[Any, None]:
        """The events through the post-hooks; `stop(choice)` is called once when a hook stops a choice
        (the generation aborts the engine request then: `Generation.stop_choice`)."""
        return events


NO_GUARD = Guard()


def before(spec: Any, handle: Any) -> Guard:
    """Run the pre-hooks on `spec.prompts` (in place); a Guard for the rest of the request."""
    rec = record.current()
    if rec is None:
        return NO_GUARD
    rt = runtime()
    return ActiveGuard(rt, _pre(rt, rec, handle.name, spec.prompts), rec)


def embedding_inputs(inputs: Any, model: str) -> Any:
    """An embedding request's text inputs through the same pre-hooks as a prompt (PII scrub or 400, filters).

    What is embedded is what a completion's model would have seen: `[EMAIL]`, not the address. Token-id
    inputs pass through (there is no text to scrub)."""
    from inferflux.server.generation import Prompt

    rec = record.current()
    if rec is None:
        return inputs
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    where = [i for i, x in enumerate(texts) if isinstance(x, str)]
    if not where:
        return inputs
    prompts = [Prompt(text=texts[i]) for i in where]
    _pre(runtime(), rec, model, prompts)
    for i, prompt in zip(where, prompts):
        texts[i] = prompt.text
    return texts[0] if isinstance(inputs, str) else texts


def _pre(rt: Runtime, rec: record.RequestRecord, model: str, prompts: list[Any]) -> PolicyContext:
    """The request's policy context (from the documents in memory), after every hook's `pre` ran on `prompts`."""
    version, documents = rt.snapshot()  # in memory: the watcher (watch.py) keeps it current, no store read here
    principal = rec.principal
    tenant = getattr(principal, "tenant", None)
    docs = [documents[s] for s in scopes_for(tenant, model) if s in documents]
    ctx = PolicyContext(tenant, getattr(principal, "key_id", None), sorted(getattr(principal, "scopes", ()) or ()),
                        rec.route, model, rec.adapter, merge(docs), version,
                        rt.salt() if docs else b"")
    set_version_metric(version)
    rec.policy = "allow"
    try:
        for hook in rt.hooks:
            hook.pre(ctx, prompts)
    except APIError as exc:
        rec.policy = "deny:content" if exc.code == "content_policy_violation" else "deny:hook"
        raise
    if ctx.found:
        rec.policy = "scrubbed"
    return ctx


def set_version_metric(version: int) -> None:
    """`inferflux:policy_version` on the server's registry (made on first use: the metrics object is the model's)."""
    from prometheus_client import Gauge

    from inferflux.server.http import server_state

    metrics = server_state().metrics
    gauge = getattr(metrics, "_policy_version", None)
    if gauge is None:
        gauge = Gauge("inferflux:policy_version", "The newest policy document version this server applies.",
                      ("model_name", "backend"), registry=metrics.registry).labels(metrics.model, metrics.backend)
        metrics._policy_version = gauge  # type: ignore[attr-defined]
    gauge.set(version)


class ActiveGuard(Guard):
    def __init__(self, rt: Runtime, ctx: PolicyContext, rec: record.RequestRecord) -> None:
        self.rt, self.ctx, self.rec = rt, ctx, rec

    async def admit(self, requests: list[Any]) -> None:
        """The OPA decision (403 `permission_error` with its reason on a deny)."""
        if self.rt.opa is None:
            return
        ctx = self.ctx
        request = {"tenant": ctx.tenant, "key_id": ctx.key_id, "scopes": ctx.scopes, "route": ctx.route,
                   "model": ctx.model, "adapter": ctx.adapter,
                   "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
                   "max_tokens": max((r.params.max_tokens for r in requests), default=0),
                   "policy_version": ctx.version}
        opa = self.rt.opa  # a remote call in a thread; the in-process engine answers in microseconds
        decision = await asyncio.to_thread(opa.decide, request) if opa.remote else opa.decide(request)
        suffix = f" opa={decision.decision_id}" if decision.decision_id else ""
        if not decision.allow:
            self.rec.policy = "deny:opa" + suffix
            raise PermissionDenied(f"denied by policy: {decision.reason}")
        self.rec.policy = (self.rec.policy or "allow") + suffix

    async def after(self, events: AsyncGenerator[Any, None],  # type: ignore[override]
                    stop: Callable[[int], None] | None = None) -> AsyncGenerator[Any, None]:
        """Each choice's answer text and reasoning text through the post-hooks (a filter each), its tool
        calls through the hooks' `tool_call`; a stopped choice is reported to `stop` once."""
        from inferflux.server.generation import Finished, ReasoningDelta, TextDelta, ToolCallDelta

        halted: set[int] = set()

        def halt(choice: int) -> None:
            if choice not in halted:
                halted.add(choice)
                if stop is not None:
                    stop(choice)

        filters: dict[tuple[int, bool], list[OutputHook]] = {}

        def hooks(choice: int, reasoning: bool) -> list[OutputHook]:
            found = filters.get((choice, reasoning))
            if found is None:
                found = filters[choice, reasoning] = [h for h in (x.post(self.ctx, choice) for x in self.rt.hooks) if h]
            return found

        def feed(chain: list[OutputHook], text: str, final: bool) -> str:
            for hook in chain:
                text = hook.feed(text, final)
            return text

        try:
            async for event in events:
                choice: int | None = getattr(event, "choice", None)
                answer = hooks(choice, False) if choice is not None else []
                if choice is None or not answer and not isinstance(event, ToolCallDelta):
                    yield event
                    continue
                thought = hooks(choice, True)
                stopped = choice in halted or any(h.stopped for h in answer + thought)
                if isinstance(event, ToolCallDelta):
                    calls = [] if stopped else self._calls(event.calls)
                    if calls is None:
                        halt(choice)
                    elif calls:
                        yield ToolCallDelta(choice, calls, event.first)
                elif isinstance(event, ReasoningDelta):
                    text = feed(thought, event.text, False)
                    if text:
                        yield ReasoningDelta(choice, text)
                elif isinstance(event, (TextDelta, Finished)):
                    final = isinstance(event, Finished)
                    if final and (rest := feed(thought, "", True)):
                        yield ReasoningDelta(choice, rest)
                    text = feed(answer, event.text if isinstance(event, TextDelta) else "", final)
                    logprobs = event.logprobs if isinstance(event, TextDelta) and not stopped else None
                    if text or logprobs:
                        yield TextDelta(choice, text, logprobs)
                    if isinstance(event, Finished):
                        yield self._finished(event, choice in halted or any(h.stopped for h in answer + thought))
                elif not stopped:
                    yield event
                if choice not in halted and any(h.stopped for h in answer + thought):
                    halt(choice)  # nothing more of this choice is sent: stop generating it
        finally:
            await events.aclose()

    def _calls(self, calls: list[Any]) -> list[Any] | None:
        """The calls as the hooks rewrite them; None when one stopped the choice (its calls are dropped)."""
        out = []
        for call in calls:
            for hook in self.rt.hooks:
                call = hook.tool_call(self.ctx, call)
                if call is None:
                    return None
            out.append(call)
        return out

    def _finished(self, event: Any, stopped: bool) -> Any:
        """The choice's end, `content_filter` when a hook stopped it; the record says what the policy did."""
        decision, _, detail = (self.rec.policy or "allow").partition(" ")
        if stopped:
            # tool_calls=0: every dialect reads a count of calls as "the model called tools" and would
            # say so (finish_reason tool_calls) over the content filter
            decision, event = "content_filter", dataclasses.replace(event, reason="content_filter", stop_reason=None,
                                                                    tool_calls=0)
        elif self.ctx.found and decision == "allow":
            decision = "scrubbed"
        self.rec.policy = f"{decision} {detail}".strip()
        return event


__all__ = ["NO_GUARD", "ActiveGuard", "Guard", "before", "embedding_inputs", "set_version_metric"]
