"""StreamDetokenizer: stop strings cut streamed text exactly, and nothing is held back longer than needed.

Every stream here is checked against an oracle that knows nothing of the class's
tail-window search: after each pushed token it re-reads the whole text decoded so
far (from a fresh `IncrementalDecoder`, which the tokenizer tests already pin to a
full decode), finds the first token at which any stop string is complete, and works
out the least text that must still be held back. The class must match it exactly
after every single push, on real byte-level BPE and SentencePiece tokenizers and on
text with multi-byte characters that arrive over several tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from inferflux.engine.detokenizer import StreamDetokenizer
from inferflux.formats.tokenizer import Tokenizer

KINDS = ["llama3", "qwen2", "spm"]

# Words the random texts are built from: ASCII, accents, CJK (three UTF-8 bytes, often
# several byte tokens), emoji (four bytes; byte-fallback tokens in SentencePiece), and
# characters that look like stop-string material.
WORDS = [
    "the", "quick", "fox", "model", "token", "stream", "stop", "END", "###", "ab", "a", "b", "abab",
    "東京", "タワー", "こんにちは", "世界", "猫", "😀", "🐙", "🚀", "👍🏽", "héllo", "naïve", "über", "ß",
    "Ω", "12", "3.14", ".", ",", "!", "?", "<", ">", "</", "\n", "\t", "  ",
]  # fmt: skip
SEPARATORS = ["", " ", " ", " ", "\n"]
PROMPTS = ["", "Hi", "Question: 東京?", "Tell me 😀"]


@pytest.fixture(scope="module")
def toks(llama3_tokenizer_dir: Path, qwen2_tokenizer_dir: Path, spm_tokenizer_dir: Path) -> dict[str, Tokenizer]:
    return {
        "llama3": Tokenizer.from_hf_dir(llama3_tokenizer_dir),
        "qwen2": Tokenizer.from_hf_dir(qwen2_tokenizer_dir),
        "spm": Tokenizer.from_hf_dir(spm_tokenizer_dir),
    }


def random_text(rng: random.Random, words: int = 12) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(3, words))).strip(" ")


@dataclass
class Case:
    """One generation: its ids and what the plain incremental decoder makes of each of them."""

    tok: Tokenizer
    prompt: list[int]
    ids: list[int]
    raw: list[str]  # IncrementalDecoder.step output per token: the text the detokenizer consumes
    flush: str

    @property
    def full(self) -> str:
        return "".join(self.raw) + self.flush

    def token_of_char(self) -> list[int]:
        """For each character of the text, the index of the token whose push produced it."""
        return [i for i, piece in enumerate(self.raw) for _ in piece] + [len(self.raw)] * len(self.flush)


def make_case(tok: Tokenizer, text: str, prompt_text: str = "", skip_special_tokens: bool = True) -> Case:
    prompt = tok.encode(prompt_text) if prompt_text else []
    ids = tok.encode(text, add_special_tokens=False)
    decoder = tok.incremental_decoder(prompt, skip_special_tokens)
    raw = [decoder.step(i) for i in ids]
    return Case(tok, prompt, ids, raw, decoder.flush())


def chunked_case(tok: Tokenizer, chunks: Sequence[str]) -> tuple[Case, list[int]]:
    """A byte-level BPE case whose token boundaries include the given chunk boundaries.

    Returns the case and, per chunk, the index of its last token. Byte-level BPE decodes a
    concatenation of encodings to the concatenation of the texts, so a test can decide
    exactly which text arrives with which push.
    """
    ids: list[int] = []
    ends: list[int] = []
    for chunk in chunks:
        ids += tok.encode(chunk, add_special_tokens=False)
        ends.append(len(ids) - 1)
    decoder = tok.incremental_decoder([])
    raw = [decoder.step(i) for i in ids]
    case = Case(tok, [], ids, raw, decoder.flush())
    assert case.full == "".join(chunks)
    return case, ends


def oracle_stop(case: Case, stops: Sequence[str]) -> tuple[int, int] | None:
    """(push index, cut) of the first push after which some stop string is in the text, by brute force.

    The cut is the earliest start of any stop string in the text at that moment; push index
    len(ids) stands for finish(), whose flushed text is checked too.
    """
    stops = [s for s in stops if s]
    texts = ["".join(case.raw[: i + 1]) for i in range(len(case.raw))] + [case.full]
    for i, text in enumerate(texts):
        starts = [text.find(s) for s in stops if s in text]
        if starts:
            return i, min(starts)
    return None


def oracle_held(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters must wait: from the first position whose rest could still grow into a stop."""
    for start in range(len(text)):
        if any(len(s) > len(text) - start and s.startswith(text[start:]) for s in stops if s):
            return len(text) - start
    return 0


@dataclass
class Result:
    pushes: list[str]
    tail: str
    det: StreamDetokenizer
    released_promptly: int  # pushes after which nothing could begin a stop string and all text was out


def stream(case: Case, stop: Sequence[str] | None, skip_special_tokens: bool = True) -> Result:
    """Push every token, checking the detokenizer against the oracles after each push."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    det = StreamDetokenizer(case.tok, case.prompt, stop, skip_special_tokens)
    hit = oracle_stop(case, stops)
    final = case.full if hit is None else case.full[: hit[1]]
    pushes: list[str] = []
    promptly = 0
    for i, token_id in enumerate(case.ids):
        was_stopped = det.stopped
        pushes.append(det.push(token_id))
        out = "".join(pushes)
        if was_stopped:
            assert pushes[-1] == "", "push() after a stop must return nothing"
        assert final.startswith(out), (out, final, stops)  # nothing past a stop string's start, ever
        assert not any(s in out for s in stops if s), (out, stops)
        assert det.stopped == (hit is not None and i >= hit[0]), (i, hit, out)
        assert det.text == out
        if not det.stopped:
            decoded = "".join(case.raw[: i + 1])
            held = oracle_held(decoded, stops)
            assert out == decoded[: len(decoded) - held], (decoded, out, held, stops)  # held back: minimal
            assert held <= max((len(s) - 1 for s in stops), default=0)
            promptly += held == 0 and bool(stops)
    tail = det.finish()
    assert det.finish() == ""  # a second finish() gives nothing more
    assert "".join(pushes) + tail == final == det.text, (pushes, tail, final)
    assert det.stopped == (hit is not None)
    if hit is not None and hit[0] < len(case.ids):
        assert tail == ""  # stopped before the end: finish() has nothing to add
    with pytest.raises(RuntimeError):
        det.push(case.ids[0] if case.ids else 0)
    return Result(pushes, tail, det, promptly)


def pick_stop(rng: random.Random, case: Case, kind: str) -> str:
    """A stop string copied out of the text: inside one token's text, across 2 or 3, or starting mid-token."""
    owner = case.token_of_char()
    full = case.full
    bounds = [0]  # where each non-empty push's text starts, and the end
    for piece in case.raw:
        if piece:
            bounds.append(bounds[-1] + len(piece))
    starts = bounds[:-1]
    if kind == "within":
        k = rng.randrange(len(starts))
        a = rng.randrange(starts[k], bounds[k + 1])
        return full[a : rng.randint(a + 1, bounds[k + 1])]
    if kind in ("span2", "span3"):
        n = int(kind[-1])
        if len(starts) < n:
            return ""
        k = rng.randrange(len(starts) - n + 1)
        a = rng.randrange(starts[k], bounds[k + 1])
        b = rng.randint(bounds[k + n - 1] + 1, bounds[k + n])
        assert len(set(owner[a:b])) == n
        return full[a:b]
    assert kind == "mid_start"
    inner = [a for a in range(1, len(full)) if owner[a - 1] == owner[a]]
    if not inner:
        return ""
    a = rng.choice(inner)
    return full[a : rng.randint(a + 1, min(len(full), a + 6))]


# --- no stop strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_without_stop_strings_every_push_is_the_decoders_text(toks: dict[str, Tokenizer], kind: str) -> None:
    """Nothing is held back without stop strings, and the stream adds up to the full decode."""
    tok = toks[kind]
    rng = random.Random(1)
    waited = 0
    for n in range(40):
        case = make_case(tok, random_text(rng), rng.choice(PROMPTS))
        head = tok.decode(case.prompt, skip_special_tokens=True)
        whole = tok.decode(case.prompt + case.ids, skip_special_tokens=True)
        assert whole.startswith(head)
        result = stream(case, None if n % 2 else [])
        assert result.pushes == case.raw  # no hold-back beyond the decoder's own (half characters)
        assert "".join(result.pushes) + result.tail == whole[len(head) :]
        assert not result.det.stopped and result.det.stop_string is None
        waited += result.pushes.count("")
    assert waited > 0  # some characters did arrive over several tokens


# --- one stop string ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stop_string_from_inside_the_text_cuts_before_its_first_occurrence(
    toks: dict[str, Tokenizer], kind: str
) -> None:
    tok = toks[kind]
    rng = random.Random(2)
    seen = {"span2": 0, "span3": 0, "mid_start": 0, "multibyte_over_tokens": 0}
    for n in range(60):
        case = make_case(tok, random_text(rng, 16), rng.choice(PROMPTS))
        how = ["within", "span2", "span3", "mid_start"][n % 4]
        stop = pick_stop(rng, case, how)
        if not stop:
            continue
        result = stream(case, [stop])
        first = case.full.find(stop)
        assert result.det.text == case.full[:first]
        assert result.det.stopped and result.det.stop_string == stop
        owner = case.token_of_char()
        tokens = len(set(owner[first : first + len(stop)]))
        seen["span2"] += tokens >= 2
        seen["span3"] += tokens >= 3
        seen["mid_start"] += first > 0 and owner[first - 1] == owner[first]
        seen["multibyte_over_tokens"] += tokens >= 2 and any(len(c.encode()) > 1 for c in stop)
    assert all(count > 0 for count in seen.values()), seen


@pytest.mark.parametrize("kind", KINDS)
def test_stop_string_at_the_very_start_gives_empty_text(toks: dict[str, Tokenizer], kind: str) -> None:
    tok = toks[kind]
    rng = random.Random(3)
    for length in (1, 2, 3, 5, 8):
        case = make_case(tok, random_text(rng), rng.choice(PROMPTS))
        stop = case.full[:length]
        result = stream(case, [stop])
        assert result.det.stopped and result.det.text == "" and result.tail == ""
        assert all(p == "" for p in result.pushes)


@pytest.mark.parametrize("kind", KINDS)
def test_absent_stop_string_leaves_the_text_whole(toks: dict[str, Tokenizer], kind: str) -> None:
    """A stop string that never completes: full text, not stopped; a held-back tail comes out in finish()."""
    tok = toks[kind]
    rng = random.Random(4)
    tails = 0
    for n in range(30):
        case = make_case(tok, random_text(rng), rng.choice(PROMPTS))
        near_miss = case.full[-rng.randint(1, 3) :] + "\x00"  # the text ends with its start: held till finish
        stops = ["\x00never\x00", near_miss] if n % 2 else ["\x00never\x00"]
        assert not any(s in case.full for s in stops)
        result = stream(case, stops)
        assert result.det.text == case.full and not result.det.stopped and result.det.stop_string is None
        if n % 2:
            assert result.tail == near_miss[:-1]  # the tail was held back, and is released at the end
            tails += 1
    assert tails > 0


def test_stop_given_as_a_bare_string_and_empty_stops_are_handled(toks: dict[str, Tokenizer]) -> None:
    """A bare str is one stop string (not one per character); empty stop strings stop nothing."""
    case, _ = chunked_case(toks["llama3"], ["one two", " three"])
    assert stream(case, "two").det.text == "one "  # type: ignore[arg-type]
    result = stream(case, ["", "\x00"])
    assert result.det.text == "one two three" and not result.det.stopped
    assert result.pushes == case.raw  # "" is not a prefix that holds anything back


# --- several stop strings -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_earliest_starting_stop_string_wins(toks: dict[str, Tokenizer], kind: str) -> None:
    """With several stop strings the cut is at the earliest one, whatever order they are listed in."""
    tok = toks[kind]
    rng = random.Random(5)
    checked = 0
    for _ in range(60):
        case = make_case(tok, random_text(rng, 16), rng.choice(PROMPTS))
        full = case.full
        picked = [pick_stop(rng, case, rng.choice(["within", "span2", "mid_start"])) for _ in range(3)]
        stops = list(dict.fromkeys(s for s in picked if s))
        if len(stops) < 2:
            continue
        spans = sorted((full.find(s), full.find(s) + len(s), s) for s in stops)
        if min(end for _, end, _ in spans) < spans[0][1] or spans[0][0] == spans[1][0]:
            continue  # a later-starting one completes first, or a tie: covered by the oracle, not here
        stops.sort(key=full.find, reverse=True)  # the winner is listed last
        result = stream(case, stops)
        assert result.det.text == full[: spans[0][0]]
        assert result.det.stop_string == spans[0][2]
        checked += 1
    assert checked >= 10


def test_first_stop_to_complete_ends_the_stream(toks: dict[str, Tokenizer]) -> None:
    """Stop strings are checked as text arrives: one that completes first wins over a longer, earlier one.

    "abcd" starts earlier, but "bc" is complete one push before "d" arrives; at that
    point "abcd" is not there yet, and the engine must stop now (vLLM does the same).
    When both complete in the same push, the earliest start wins.
    """
    tok = toks["llama3"]
    case, _ = chunked_case(tok, ["x a", "bc", "d"])
    assert stream(case, ["abcd", "bc"]).det.text == "x a"
    case, _ = chunked_case(tok, ["x", " the"])
    assert len(case.ids) == 2  # " the" is one token: "he" and "the" complete in the same push
    assert stream(case, ["he", "the"]).det.text == "x "


# --- hold-back ----------------------------------------------------------------------------------


def test_held_back_text_is_released_as_soon_as_it_cannot_start_a_stop(toks: dict[str, Tokenizer]) -> None:
    tok = toks["llama3"]
    case, ends = chunked_case(tok, ["Hello wor", "ld E", "N", "x more", " E", "ND tail"])
    det = StreamDetokenizer(tok, [], ["END"])
    out = []
    after_chunk = []
    for i, token_id in enumerate(case.ids):
        out.append(det.push(token_id))
        if i in ends:
            after_chunk.append("".join(out))
    assert after_chunk == [
        "Hello wor",
        "Hello world ",  # "E" may begin "END": held
        "Hello world ",  # "EN" too
        "Hello world ENx more",  # "ENx" cannot: released with the new text at once
        "Hello world ENx more ",
        "Hello world ENx more ",
    ]
    assert det.stopped and det.text == "Hello world ENx more " and det.finish() == ""


@pytest.mark.parametrize("kind", KINDS)
def test_text_that_cannot_begin_a_stop_string_is_out_at_once(toks: dict[str, Tokenizer], kind: str) -> None:
    """After a push whose text ends with no prefix of a stop string, everything decoded so far is out."""
    tok = toks[kind]
    rng = random.Random(6)
    promptly = 0
    for _ in range(30):
        case = make_case(tok, random_text(rng), rng.choice(PROMPTS))
        stops = ["\x00", "a" + "\x00" * 3, "東京\x00", "😀\x00"]  # prefixes "a", "東", "東京", "😀" recur
        result = stream(case, stops)  # checks emitted == decoded minus the minimal held tail, every push
        promptly += result.released_promptly
        assert result.det.text == case.full
    assert promptly > 50


def test_finish_returns_held_text_and_the_decoders_flush(toks: dict[str, Tokenizer]) -> None:
    """A truncated character only appears at the very end, after the held-back text."""
    tok = toks["spm"]
    octopus = [i for i in tok.encode("🐙", add_special_tokens=False) if tok.token_to_piece(i)[0] >= 0x80]
    assert len(octopus) == 4  # byte-fallback tokens
    ids = tok.encode("x ab", add_special_tokens=False) + octopus[:1]
    det = StreamDetokenizer(tok, [], ["b🐙"])
    pushed = "".join(det.push(i) for i in ids)
    assert pushed == "x a" and det.finish() == "b\ufffd" and not det.stopped
    det = StreamDetokenizer(tok, [], ["b\ufffd"])  # the flushed text is still checked for stop strings
    assert "".join(det.push(i) for i in ids) == "x a" and det.finish() == "" and det.stopped
    assert det.text == "x a"


# --- special tokens -----------------------------------------------------------------------------


def test_special_tokens_follow_skip_special_tokens(toks: dict[str, Tokenizer]) -> None:
    tok = toks["llama3"]
    eot = tok.token_to_id("<|eot_id|>")
    assert eot is not None
    ids = tok.encode("done", add_special_tokens=False) + [eot]
    skipping = StreamDetokenizer(tok, [], ["<|eot"])
    assert "".join(skipping.push(i) for i in ids) + skipping.finish() == "done" and not skipping.stopped
    keeping = StreamDetokenizer(tok, [], ["<|eot"], skip_special_tokens=False)
    assert "".join(keeping.push(i) for i in ids) + keeping.finish() == "done" and keeping.stopped
    literal = StreamDetokenizer(tok, [], None, skip_special_tokens=False)
    assert "".join(literal.push(i) for i in ids) == "done<|eot_id|>"
