"""PII detection: EMAIL, PHONE, CREDIT_CARD, US_SSN, IP_ADDRESS, IBAN (docs/security.md, "Policy").

Each detector is a regex that finds candidates plus a check the regex cannot express (Luhn for
cards, the SSA's never-issued ranges for SSNs, `ipaddress` for addresses, ISO 13616 mod-97 for
IBANs), so a random 16-digit number or `999-12-3456` is not reported. Hand-written on purpose: the
rules ARE the spec, and a library such as Presidio would bring spaCy models for six patterns.

Two properties the rest of the policy code relies on:

- Every pattern is bounded: no unbounded repetition, no nested quantifiers, so a call on any text
  is linear in its length (tests/test_pii.py fuzzes them with hypothesis under a timeout) and no
  match is longer than `MAX_ENTITY` characters.
- A match that starts before `len(text) - MAX_ENTITY - 1` does not change when more text is
  appended. The streamed output scrubber (`scrub.py`) holds back that many characters, which is
  why streamed and non-streamed output are scrubbed identically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Mapping

ENTITIES = ("EMAIL", "PHONE", "CREDIT_CARD", "US_SSN", "IP_ADDRESS", "IBAN")
ACTIONS = ("mask", "redact", "hash", "block")
MAX_ENTITY = 192  # the longest match any pattern below can make (EMAIL: 183; the stream hold-back is derived from it)


@dataclasses.dataclass(frozen=True)
class Entity:
    kind: str
    start: int
    end: int
    text: str


class PIIBlocked(Exception):
    """A `block` action fired: the request (or the output) carries an entity the policy forbids."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"the text contains a {kind} entity, which this server's policy does not allow")
        self.kind = kind


_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,20}){0,2}"
                    r"\.[A-Za-z]{2,12}(?![\w-])")
# E.164 (+ and 8-15 digits, with optional spaces/dots/dashes and one bracketed area code), and the
# common national shapes: (415) 555-0100, 415-555-0100, 415.555.0100, 020 7946 0958, 06-1234-5678.
_PHONE = re.compile(r"(?<![\w+])(?:\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
                    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4}|0\d{1,4}[ -]\d{3,4}[ -]\d{3,4})(?![\w])")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w])")
_SSN = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}\.\d{1,3}\.\d{1,3})?"
                   r"(?![\w:])")
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w])")
# ISO 13616 lengths of the countries most often seen; others are checked by mod-97 and 15..34 alone.
_IBAN_LENGTHS = {"DE": 22, "FR": 27, "GB": 22, "ES": 24, "IT": 27, "NL": 18, "BE": 16, "CH": 21, "AT": 20,
                 "IE": 22, "PL": 28, "PT": 25, "SE": 24, "DK": 18, "NO": 15, "FI": 18, "LU": 20}


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _phone_ok(match: str) -> bool:
    n = len(_digits(match))
    return 8 <= n <= 15 if match.startswith("+") else 9 <= n <= 12


def _card_ok(match: str) -> bool:
    digits = _digits(match)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn(digits)


def _ssn_ok(m: re.Match[str]) -> bool:
    area, group, serial = m.group(1), m.group(3), m.group(4)
    # Never issued: area 000, 666 and 900-999; group 00; serial 0000 (SSA, Presidio's rules), and the
    # advertising numbers 078-05-1120 and 219-09-9999.
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return f"{area}{group}{serial}" not in ("078051120", "219099999")


def _ip_ok(match: str) -> bool:
    try:
        ipaddress.ip_address(match)
    except ValueError:
        return False
    return any(c.isdigit() or c in "abcdefABCDEF" for c in match)


def iban_ok(match: str) -> bool:
    code = match.replace(" ", "")
    if not 15 <= len(code) <= 34 or _IBAN_LENGTHS.get(code[:2], len(code)) != len(code):
        return False
    moved = code[4:] + code[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


_DETECTORS: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], bool]]] = [
    ("EMAIL", _EMAIL, lambda m: True),
    ("IBAN", _IBAN, lambda m: iban_ok(m.group())),
    ("CREDIT_CARD", _CARD, lambda m: _card_ok(m.group())),
    ("US_SSN", _SSN, _ssn_ok),
    ("IP_ADDRESS", _IPV4, lambda m: _ip_ok(m.group())),
    ("IP_ADDRESS", _IPV6, lambda m: m.group().count(":") >= 2 and _ip_ok(m.group())),
    ("PHONE", _PHONE, lambda m: _phone_ok(m.group())),
]
_PRIORITY = {kind: i for i, (kind, _, _) in enumerate(_DETECTORS)}


def detect(text: str, kinds: frozenset[str] | set[str] | None = None) -> list[Entity]:
    """The entities in `text`, non-overlapping, in order (at a tie: the longer, then the more specific kind)."""
    found: list[Entity] = []
    for kind, pattern, ok in _DETECTORS:
        if kinds is not None and kind not in kinds:
            continue
        for m in pattern.finditer(text):
            if ok(m):
                found.append(Entity(kind, m.start(), m.end(), m.group()))
    found.sort(key=lambda e: (e.start, -(e.end - e.start), _PRIORITY[e.kind]))
    chosen: list[Entity] = []
    for entity in found:
        if not chosen or entity.start >= chosen[-1].end:
            chosen.append(entity)
    return chosen


def replacement(entity: Entity, action: str, salt: bytes) -> str:
    """What an entity becomes: `[EMAIL]`, nothing, or `[EMAIL:<12 hex of HMAC-SHA256(salt, value)>]`."""
    if action == "block":
        raise PIIBlocked(entity.kind)
    if action == "redact":
        return ""
    if action == "hash":
        digest = hmac.new(salt, entity.text.encode(), hashlib.sha256).hexdigest()[:12]
        return f"[{entity.kind}:{digest}]"
    return f"[{entity.kind}]"


def scrub(text: str, actions: Mapping[str, str], salt: bytes = b"") -> tuple[str, list[str]]:
    """`text` with each entity the policy names replaced; also the kinds found (PIIBlocked on `block`)."""
    if not actions or not text:
        return text, []
    entities = detect(text, frozenset(actions))
    if not entities:
        return text, []
    out, at = [], 0
    for entity in entities:
        out.append(text[at:entity.start])
        out.append(replacement(entity, actions[entity.kind], salt))
        at = entity.end
    out.append(text[at:])
    return "".join(out), [e.kind for e in entities]


__all__ = ["ACTIONS", "ENTITIES", "MAX_ENTITY", "Entity", "PIIBlocked", "detect", "iban_ok", "luhn",
           "replacement", "scrub"]
