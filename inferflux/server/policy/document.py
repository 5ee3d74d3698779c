"""A policy document (one per scope: global, a tenant, a tenant+model) and how the scopes combine.

A scope is named `global`, `TENANT` or `TENANT:MODEL` (a tenant name has no `:`, a model name may).
The document that applies to a request is the three merged, the most specific last: its `pii`
actions override per entity, its term and pattern lists add to the others'. An empty document
means "nothing from this scope".
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inferflux.server.access.limits import check_tenant
from inferflux.server.errors import bad_request
from inferflux.server.policy.pii import MAX_ENTITY

Kind = Literal["EMAIL", "PHONE", "CREDIT_CARD", "US_SSN", "IP_ADDRESS", "IBAN"]
Action = Literal["mask", "redact", "hash", "block"]
GLOBAL = "global"


class PolicyDocument(BaseModel):
    """What one scope asks for (docs/security.md, "Policy")."""

    model_config = ConfigDict(extra="forbid")

    # The action per PII entity; an entity not named passes through.
    pii: dict[Kind, Action] = Field(default_factory=dict)
    pii_input: bool = True  # scrub the prompt, messages and tool results
    pii_output: bool = True  # scrub the generated text (streamed with a hold-back window)
    # Refused in the input (400 content_policy_violation), stop the output (finish_reason content_filter).
    blocked_terms: list[str] = Field(default_factory=list, max_length=1000)  # case-insensitive substrings
    blocked_patterns: list[str] = Field(default_factory=list, max_length=100)  # Python regexes

    @field_validator("blocked_terms")
    @classmethod
    def _terms(cls, terms: list[str]) -> list[str]:
        for term in terms:
            if not term.strip() or len(term) > MAX_ENTITY:
                raise ValueError(f"a blocked term must be 1 to {MAX_ENTITY} characters")
        return terms

    @field_validator("blocked_patterns")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                if re.compile(pattern).fullmatch(""):
                    raise ValueError(f"the pattern {pattern!r} matches empty text")
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from None
        return patterns

    def empty(self) -> bool:
        return not (self.pii or self.blocked_terms or self.blocked_patterns)


def merge(documents: list[PolicyDocument]) -> PolicyDocument:
    """The documents combined, later ones (more specific) winning per entity and per switch."""
    merged = PolicyDocument()
    for doc in documents:
        merged.pii.update(doc.pii)
        merged.pii_input, merged.pii_output = doc.pii_input, doc.pii_output
        merged.blocked_terms += [t for t in doc.blocked_terms if t not in merged.blocked_terms]
        merged.blocked_patterns += [p for p in doc.blocked_patterns if p not in merged.blocked_patterns]
    return merged


def check_scope(scope: str) -> str:
    """`global`, `TENANT` or `TENANT:MODEL`; a 400 otherwise."""
    if scope == GLOBAL:
        return scope
    tenant, _, model = scope.partition(":")
    try:
        check_tenant(tenant)
    except Exception:  # noqa: BLE001 - the tenant rule's own error names the rule
        raise bad_request(f"bad policy scope {scope!r}: `global`, `TENANT` or `TENANT:MODEL`", param="scope") from None
    if ":" in scope and not model.strip():
        raise bad_request(f"bad policy scope {scope!r}: the model after `:` is empty", param="scope")
    return scope


def scopes_for(tenant: str | None, model: str) -> list[str]:
    """The scopes that apply to a request, least specific first."""
    return [GLOBAL] if tenant is None else [GLOBAL, tenant, f"{tenant}:{model}"]


def parse_document(data: Any) -> PolicyDocument:
    """A document from JSON/YAML data; a 400 naming the problem otherwise."""
    from pydantic import ValidationError

    try:
        return PolicyDocument.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise bad_request(f"bad policy document: {where}: {first['msg']}", param="document") from None


__all__ = ["GLOBAL", "PolicyDocument", "check_scope", "merge", "parse_document", "scopes_for"]
