"""The built-in guardrail: PII actions and content filters on a request's input and its output stream.

Input (prompt text, chat message contents, tool results) is scrubbed before the template renders
it, so the model, an `echo`, the logs and traces all see `[EMAIL]`, never the address. A `block`
action or a blocked term/pattern refuses the request: 400 `content_policy_violation`.

Output is scrubbed as it streams, with a hold-back window: the last `HOLD` characters of a choice
are not sent until more text arrives (or the choice ends), and a cut never falls inside a detected
entity. Since no PII match is longer than `pii.MAX_ENTITY` characters and no blocked term longer than
that either, a partial address or term is never sent. A `block` entity in the output stops it
before the entity (a 400 is too late once the answer has started). A blocked term or pattern in the output ends
the choice's text there: the stream finishes with `finish_reason: "content_filter"`. (A pattern whose
match is longer than the window can leak its start: prefer terms, or short patterns.)
"""

from __future__ import annotations

import re

from inferflux.server.errors import APIError
from inferflux.server.policy.document import PolicyDocument
from inferflux.server.policy.pii import MAX_ENTITY, Entity, PIIBlocked, detect, replacement

HOLD = MAX_ENTITY + 2  # one more for the look-ahead at a match's end


def violation(message: str) -> APIError:
    """The 400 every dialect shows in its own error shape."""
    return APIError(400, message, code="content_policy_violation")


class Filters:
    """A document's blocked terms and patterns, compiled once."""

    def __init__(self, doc: PolicyDocument) -> None:
        alternatives = [re.escape(t) for t in doc.blocked_terms] + [f"(?:{p})" for p in doc.blocked_patterns]
        self.pattern = re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None

    def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
        return None if self.pattern is None else self.pattern.search(text, pos)


def scrub_input(text: str, doc: PolicyDocument, filters: Filters, salt: bytes, found: list[str]) -> str:
    """One piece of input scrubbed; a `violation` (400) for a blocked entity, term or pattern."""
    if filters.search(text) is not None:
        raise violation("the request contains text this server's content policy blocks")
    if not doc.pii or not doc.pii_input:
        return text
    actions: dict[str, str] = {str(k): str(v) for k, v in doc.pii.items()}
    entities = detect(text, frozenset(actions))
    if not entities:
        return text
    out, at = [], 0
    try:
        for entity in entities:
            out += [text[at:entity.start], replacement(entity, actions[entity.kind], salt)]
            at = entity.end
    except PIIBlocked as exc:
        raise violation(str(exc)) from None
    found += [e.kind for e in entities]
    out.append(text[at:])
    return "".join(out)


class OutputScrubber:
    """One choice's output: feed the model's text, get the text the client may see (see the module docstring)."""

    def __init__(self, doc: PolicyDocument, filters: Filters, salt: bytes) -> None:
        self.actions: dict[str, str] = {str(k): str(v) for k, v in doc.pii.items()} if doc.pii_output else {}
        self.kinds = frozenset(self.actions)
        self.filters = filters
        self.salt = salt
        self.raw = ""  # everything the model wrote
        self.emitted = 0  # how much of `raw` has been decided (sent, replaced or dropped)
        self.stopped = False
        self.found: list[str] = []  # entity kinds replaced, for the record

    def feed(self, text: str, final: bool) -> str:
        """The text to send now; after a content-filter hit, `stopped` is set and nothing more is sent."""
        if self.stopped:
            return ""
        self.raw += text
        limit = len(self.raw) if final else max(self.emitted, len(self.raw) - HOLD)
        hit = self.filters.search(self.raw, max(0, self.emitted - HOLD))
        if hit is not None and hit.start() < len(self.raw):
            self.stopped, final = True, True  # everything before the hit is decided now
            limit = max(self.emitted, hit.start())
        base = max(0, self.emitted - HOLD)  # a match starting before `emitted` was decided already
        entities = [e for e in detect(self.raw[base:], self.kinds) if e.start + base >= self.emitted] \
            if self.kinds and limit > self.emitted else []
        out, at = [], self.emitted
        for found in entities:
            entity = Entity(found.kind, found.start + base, found.end + base, found.text)
            if entity.start >= limit:
                break
            if entity.end > limit and not final:
                limit = entity.start  # never cut inside an entity: hold it until it is complete
                break
            if entity.end > limit:  # the output stopped (content filter) inside it: drop the piece
                limit = entity.start
                break
            action = self.actions[entity.kind]
            if action == "block":  # too late for a 400: the output stops before the entity
                self.stopped, limit = True, entity.start
                break
            out += [self.raw[at:entity.start], replacement(entity, action, self.salt)]
            self.found.append(entity.kind)
            at = entity.end
        out.append(self.raw[at:limit])
        self.emitted = max(self.emitted, limit)
        return "".join(out)


__all__ = ["HOLD", "Filters", "OutputScrubber", "scrub_input", "violation"]
