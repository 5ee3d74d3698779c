"""PII detectors (inferflux/server/policy/pii.py) and the streamed output scrubber (scrub.py)."""

from __future__ import annotations

import random
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferflux.server.errors import APIError
from inferflux.server.policy.document import PolicyDocument
from inferflux.server.policy.pii import ENTITIES, detect, iban_ok, luhn, scrub
from inferflux.server.policy.scrub import Filters, OutputScrubber, scrub_input

FOUND = [
    ("mail bob.smith@example.co.uk today", "EMAIL", "bob.smith@example.co.uk"),
    ("call +44 20 7946 0958 now", "PHONE", "+44 20 7946 0958"),
    ("call +14155550100.", "PHONE", "+14155550100"),
    ("office (415) 555-0100", "PHONE", "(415) 555-0100"),
    ("office 415-555-0100", "PHONE", "415-555-0100"),
    ("card 4111 1111 1111 1111 ok", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("card 5500-0000-0000-0004", "CREDIT_CARD", "5500-0000-0000-0004"),
    ("ssn 123-45-6789", "US_SSN", "123-45-6789"),
    ("from 192.168.1.1 to", "IP_ADDRESS", "192.168.1.1"),
    ("v6 2001:db8::ff00:42:8329 up", "IP_ADDRESS", "2001:db8::ff00:42:8329"),
    ("iban GB82 WEST 1234 5698 7654 32.", "IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("iban DE89370400440532013000", "IBAN", "DE89370400440532013000"),
]
NOT_FOUND = [
    "card 4111 1111 1111 1112 (bad Luhn)",
    "ssn 666-12-3456, 000-12-3456, 912-34-5678, 123-00-4567, 123-45-0000",
    "ip 256.1.1.1 and 1.2.3",
    "time 12:30:45 and the ratio 3:4",
    "iban GB82 WEST 1234 5698 7654 33 (bad checksum)",
    "a version 1.2.3.4.5 string",
    "no at sign: user at example dot com",
    "an order number 1234567890123456",
]


@pytest.mark.parametrize(("text", "kind", "value"), FOUND)
def test_found(text: str, kind: str, value: str) -> None:
    assert [(e.kind, e.text) for e in detect(text)] == [(kind, value)]


@pytest.mark.parametrize("text", NOT_FOUND)
def test_not_found(text: str) -> None:
    assert detect(text) == []


def test_checksums() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_actions() -> None:
    text = "write bob@example.com or 4111111111111111"
    assert scrub(text, {"EMAIL": "mask", "CREDIT_CARD": "redact"})[0] == "write [EMAIL] or "
    hashed = scrub(text, {"EMAIL": "hash"}, b"salt")[0]
    assert hashed.startswith("write [EMAIL:") and "bob" not in hashed
    assert hashed == scrub(text, {"EMAIL": "hash"}, b"salt")[0] != scrub(text, {"EMAIL": "hash"}, b"other")[0]
    doc = PolicyDocument(pii={"EMAIL": "block"})
    with pytest.raises(APIError) as caught:
        scrub_input(text, doc, Filters(doc), b"", [])
    assert caught.value.status == 400 and caught.value.code == "content_policy_violation"


def _stream(doc: PolicyDocument, pieces: list[str]) -> tuple[str, bool]:
    scrubber = OutputScrubber(doc, Filters(doc), b"salt")
    out = "".join(scrubber.feed(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces))
    return out, scrubber.stopped


def test_stream_split_anywhere_is_the_same() -> None:
    doc = PolicyDocument(pii={"EMAIL": "mask", "CREDIT_CARD": "hash", "PHONE": "redact"}, blocked_terms=["forbidden"])
    text = "Mail alice.jones@example.com, card 4111-1111-1111-1111, tel +1 415 555 0100. " * 3 + "forbidden tail"
    whole = _stream(doc, [text])
    assert whole[1] and "alice" not in whole[0] and "forbidden" not in whole[0] and whole[0].count("[EMAIL]") == 3
    rng = random.Random(7)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 80)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        streamed = []
        scrubber = OutputScrubber(doc, Filters(doc), b"salt")
        for i, piece in enumerate(pieces):
            sent = scrubber.feed(piece, i == len(pieces) - 1)
            streamed.append(sent)
            assert "alice" not in "".join(streamed)  # never leaks, not even a prefix of it so far
        assert ("".join(streamed), scrubber.stopped) == whole


class _Timeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise _Timeout


_TEXT = st.text(alphabet=st.sampled_from(list("0123456789abcdefABCDEF@.:+-() ") + ["\n", "é", "x"]), max_size=3000)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_TEXT, st.text(max_size=2000)))
def test_fuzz_detectors_bounded(text: str) -> None:
    """No exception, and each call ends within 2 s (no catastrophic backtracking on 3 KB of near-misses)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(2)
    try:
        entities = detect(text)
        for e in entities:
            assert e.kind in ENTITIES and text[e.start:e.end] == e.text and e.end - e.start <= 192
        scrub(text, dict.fromkeys(ENTITIES, "mask"))
        doc = PolicyDocument(pii=dict.fromkeys(ENTITIES, "mask"))
        _stream(doc, [text[:len(text) // 2], text[len(text) // 2:]])
    except _Timeout:
        pytest.fail(f"a detector ran past 2 s on {len(text)} characters")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
