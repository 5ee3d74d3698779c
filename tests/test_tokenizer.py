"""Tokenizer parity: GGUF-built tokenizers against llama.cpp, HF-folder tokenizers against `tokenizers`/transformers.

For each fixture tokenizer (Llama-3 byte-level BPE, Qwen2 byte-level BPE, Llama-2
style SentencePiece) we convert the folder to a vocab-only GGUF file with our
`add_vocab`, open it with llama.cpp (llama-cpp-python, vocab_only), and check a few
hundred strings: hand-picked edge cases plus seeded random mixes of scripts,
whitespace, digits, emoji, code and special tokens.
"""

from __future__ import annotations

import ctypes
import json
import random
import shutil
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import pytest
import tokenizers
from transformers import AutoTokenizer

from inferflux.convert.gguf_vocab import add_vocab
from inferflux.errors import ModelFormatError
from inferflux.formats.gguf_file import GGUFFile
from inferflux.formats.gguf_tokenizer import tokenizer_from_gguf
from inferflux.formats.tokenizer import Tokenizer
from tests.fixtures.tokenizers import CORPUS, LLAMA3_SPECIAL_TOKENS, QWEN2_SPECIAL_TOKENS

KINDS = ["llama3", "qwen2", "spm"]
ARCH = {"llama3": "llama", "qwen2": "qwen2", "spm": "llama"}
ALL_SPECIALS = LLAMA3_SPECIAL_TOKENS + QWEN2_SPECIAL_TOKENS + ["<s>", "</s>", "<unk>"]

# --- test strings ------------------------------------------------------------------------------

EDGE_CASES = [
    "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", "\r\n", " \n ", "\n \n\n \t \t\t \t\n",
    "Hello", " Hello", "Hello ", "  Hello  world  ", "\tHello\n", "Hello\n\nworld", "a\r\nb", "trailing   ",
    "1", "12", "123", "1234", "12345", "12345678901234567890", "3.14159", "1,000,000", "-42", "$5.99", "0x1F",
    "3..3 3...3 33 333 3333", "Hello, world!", "What?!", "...", "!!!???", "don't", "I'VE", "they'll", "'s",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "café", "naïve", "Ünïcödé", "Grüße aus München", "ÀÉÎÕÜ àéîõü", "Zażółć gęślą jaźń",
    "東京", "我想在apple工作1314151天～", "안녕하세요", "Привет, мир", "Ωμέγα", "مرحبا بالعالم", "नमस्ते",
    "កាន់តែពិសេសអាច😁", "😀", "🦙🦙", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "❤️", "👍🏽", "😶‍🌫️", "🚀 (normal) ✅",
    "ℝ ∑ ∞ ≠ ≤", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u00a0nbsp", "zero\u200bwidth", "\ufeffbom", "x\x7fy", "tab\there",
    "def f(x):\n    return x ** 2\n", "    indented", "if (a && b) { return -1; }", "<html><p>Hi</p></html>",
    '{"key": [1, 2, 3], "ok": true}', "------======= '''''' ``````` \"\"\"\" ......",
    "<|eot_id|>", "<|begin_of_text|>Hello", "<|begin_of_text|><|begin_of_text|>x",
    "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "x<|im_end|>y",
    "<s>", "</s>", "<s>Hello</s>", "a</s>b", " <s> spaced </s> ", "<unk>", "<unk>x", "< s>", "<|eot_id",
    "<<|eot_id|>>", "<|eot_id|><|eot_id|>", "<|reserved_special_token_0|>", "[INST] Hi [/INST]",
]  # fmt: skip

# A decomposed "é" (e + U+0301): Qwen2's tokenizer.json NFC-normalizes it, llama.cpp does not.
NON_NFC = "Cafe\u0301 and re\u0301sume\u0301"

_POOLS = {
    "ascii": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "digits": "0123456789",
    "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "latin": "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœŒÆÇÉÈÊËÎÏÔÙÛÜŸđĐăĂơƠưƯ",
    "cyrillic": "абвгдежзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИЙКЛМН",
    "greek": "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕ",
    "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年日本語東京北京今天气",
    "hangul": "가나다라마바사아자차카타파하한국어서울",
    "emoji": "😀😃😄😁🚀🦙✅❤👍🏽🎉🔥💡🤖🌍🍕🍣👏👌🙈🧠⚡",
    "rare": "ʘ∮⌘☃♞⚙✈❄⨀ⴰᚠ𐍈𓂀🜁",
}
_WHITESPACE = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\t", " \t", "\r\n", "    ", " \n  "]


def _random_strings(rng: random.Random, count: int) -> list[str]:
    """Mixes of corpus words, random characters from many scripts, numbers, whitespace runs and special tokens."""
    words = CORPUS.split()
    makers: list[Callable[[], str]] = [
        lambda: rng.choice(words),
        lambda: "".join(rng.choice(_POOLS[rng.choice(list(_POOLS))]) for _ in range(rng.randint(1, 6))),
        lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25))),
        lambda: rng.choice(_WHITESPACE),
        lambda: rng.choice(ALL_SPECIALS),
        lambda: CORPUS[(start := rng.randrange(len(CORPUS) - 80)) : start + rng.randint(5, 80)],
    ]
    weights = [6, 4, 1, 3, 1, 1]
    out = []
    for _ in range(count):
        parts = [rng.choices(makers, weights)[0]() for _ in range(rng.randint(1, 10))]
        out.append("".join(p + (rng.choice(_WHITESPACE) if rng.random() < 0.5 else "") for p in parts))
    return out


TEST_STRINGS = EDGE_CASES + [NON_NFC] + _random_strings(random.Random(20240611), 200)


def _has_special(text: str) -> bool:
    return any(s in text for s in ALL_SPECIALS)


# --- fixtures: one vocab-only GGUF per tokenizer, opened by us and by llama.cpp -----------------


def write_vocab_gguf(hf_dir: Path, arch: str, path: Path) -> Path:
    """A GGUF file with minimal `arch` hyper-parameters and our tokenizer metadata, no tensors.

    llama.cpp's vocab_only load reads the architecture and the vocabulary and skips tensors,
    so none are needed (checked: it opens files without any).
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    add_vocab(writer, hf_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@dataclass
class Case:
    kind: str
    hf_dir: Path
    gguf_path: Path
    ours_gguf: Tokenizer
    ours_hf: Tokenizer
    hf: tokenizers.Tokenizer
    llama: llama_cpp.Llama

    @property
    def vocab(self) -> llama_cpp.llama_vocab_p:
        return llama_cpp.llama_model_get_vocab(self.llama.model)

    def llama_tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def llama_piece(self, token_id: int, lstrip: int = 0) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token_id, buf, len(buf), lstrip, True)
        assert n >= 0
        return buf.raw[:n]

    def llama_detokenize(self, ids: list[int]) -> bytes:
        """llama_detokenize(remove_special=False, unparse_special=True)."""
        tokens = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
        buf = ctypes.create_string_buffer(8 * len(ids) * 32 + 16)
        n = llama_cpp.llama_detokenize(self.vocab, tokens, len(ids), buf, len(buf), False, True)
        assert n >= 0
        return buf.raw[:n]


@contextmanager
def opened(kind: str, hf_dir: Path, work_dir: Path) -> Iterator[Case]:
    """Convert `hf_dir` to GGUF in `work_dir` and open it with our code and with llama.cpp."""
    path = write_vocab_gguf(hf_dir, ARCH[kind], work_dir / f"{kind}.gguf")
    llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        yield Case(
            kind=kind,
            hf_dir=hf_dir,
            gguf_path=path,
            ours_gguf=Tokenizer.from_gguf(GGUFFile(path)),
            ours_hf=Tokenizer.from_hf_dir(hf_dir),
            hf=tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json")),
            llama=llama,
        )
    finally:
        llama.close()


@pytest.fixture(scope="module", params=KINDS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    kind = request.param
    with opened(kind, request.getfixturevalue(f"{kind}_tokenizer_dir"), tmp_path_factory.mktemp(kind)) as c:
        yield c


def _mismatches(rows: list[tuple[str, object, object]]) -> str:
    bad = [(text, ours, ref) for text, ours, ref in rows if ours != ref]
    lines = [f"{len(bad)}/{len(rows)} differ"] + [f"  {t!r}: ours={o} ref={r}" for t, o, r in bad[:5]]
    return "\n".join(lines)


def _single_bos(ref: list[int], bos_id: int | None) -> list[int]:
    """Our rule: BOS is not added in front of text that already starts with it (llama.cpp adds a second)."""
    return ref[1:] if bos_id is not None and ref[:2] == [bos_id, bos_id] else ref


# --- the strings themselves ----------------------------------------------------------------------


def test_test_strings_cover_what_the_brief_asks() -> None:
    assert len(TEST_STRINGS) >= 250
    assert len(set(TEST_STRINGS)) > 240
    joined = "".join(TEST_STRINGS)
    for needle in ("  ", "\n\n", "\t", "1234567890", "é", "東", "😀", "<|eot_id|>", "<|im_start|>", "<s>", "</s>"):
        assert needle in joined
    assert sum(_has_special(s) for s in TEST_STRINGS) >= 40


# --- GGUF-built tokenizer vs llama.cpp ----------------------------------------------------------


def test_gguf_metadata_is_what_llama_cpp_expects(case: Case) -> None:
    reader = gguf.GGUFReader(case.gguf_path)
    field = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    expected = {"llama3": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"), "spm": ("llama", "default")}
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == expected[case.kind]
    assert "tokenizer.chat_template" not in reader.fields
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == case.hf.get_vocab_size(with_added_tokens=True)
    for special in {"llama3": LLAMA3_SPECIAL_TOKENS, "qwen2": QWEN2_SPECIAL_TOKENS, "spm": ["<s>", "</s>"]}[case.kind]:
        assert types[tokens.index(special)] == gguf.TokenType.CONTROL
    if case.kind == "spm":
        # tokenizer_config.json lists <unk> as a special added token, so the converter makes it CONTROL.
        assert types[tokens.index("<unk>")] == gguf.TokenType.CONTROL
        assert field("tokenizer.ggml.unknown_token_id") == tokens.index("<unk>")
        assert sum(t == gguf.TokenType.BYTE for t in types) == 256
        assert len(field("tokenizer.ggml.scores")) == len(tokens)
    else:
        hf_merges = json.loads((case.hf_dir / "tokenizer.json").read_text())["model"]["merges"]
        assert len(field("tokenizer.ggml.merges")) == len(hf_merges)


def test_gguf_ids_match_llama_cpp(case: Case) -> None:
    with_special = [
        (t, case.ours_gguf.encode(t), _single_bos(case.llama_tokenize(t, add_special=True), case.ours_gguf.bos_id))
        for t in TEST_STRINGS
    ]
    assert all(ours == ref for _, ours, ref in with_special), _mismatches(with_special)
    bare = [
        (t, case.ours_gguf.encode(t, add_special_tokens=False), case.llama_tokenize(t, add_special=False))
        for t in TEST_STRINGS
    ]
    assert all(ours == ref for _, ours, ref in bare), _mismatches(bare)


def test_gguf_ids_match_llama_cpp_without_special_parsing(case: Case) -> None:
    texts = [t for t in TEST_STRINGS if _has_special(t)]
    literal = lambda t: case.ours_gguf.encode(t, add_special_tokens=False, parse_special=False)  # noqa: E731
    rows = [(t, literal(t), case.llama_tokenize(t, add_special=False, parse_special=False)) for t in texts]
    assert all(ours == ref for _, ours, ref in rows), _mismatches(rows)
    specials = {case.ours_gguf.token_to_id(s) for s in ALL_SPECIALS} - {None, case.ours_gguf.token_to_id("<unk>")}
    assert not any(set(ours) & specials for _, ours, _ in rows)


def test_bos_is_added_once_and_only_when_wanted(case: Case) -> None:
    tok = case.ours_gguf
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(case.vocab) == (case.kind != "qwen2")
    assert tok.bos_id == case.ours_hf.bos_id
    plain = tok.encode("Hello world")
    bare = tok.encode("Hello world", add_special_tokens=False)
    if tok.add_bos:
        assert plain == [tok.bos_id] + bare
    else:
        assert plain == bare and tok.bos_id not in plain
    if tok.bos_id is not None:
        bos_text = tok.id_to_token(tok.bos_id)
        ids = tok.encode(bos_text + "Hello")
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
        llama_ids = case.llama_tokenize(bos_text + "Hello", add_special=True)
        assert llama_ids[:2] == [tok.bos_id, tok.bos_id]  # llama.cpp adds a second BOS (with a warning)


def test_eos_ids_match_llama_cpp(case: Case) -> None:
    n = case.llama.n_vocab()
    eog = {i for i in range(n) if llama_cpp.llama_vocab_is_eog(case.vocab, i)}
    assert case.ours_gguf.eos_ids == eog == case.ours_hf.eos_ids
    assert case.ours_gguf.eos_id == llama_cpp.llama_vocab_eos(case.vocab) == case.ours_hf.eos_id
    expected = {"llama3": {"<|end_of_text|>", "<|eot_id|>"}, "qwen2": {"<|endoftext|>", "<|im_end|>"}, "spm": {"</s>"}}
    assert {case.ours_gguf.id_to_token(i) for i in eog} == expected[case.kind]


def test_vocab_and_pieces_match_llama_cpp(case: Case) -> None:
    n = case.llama.n_vocab()
    assert case.ours_gguf.vocab_size == case.ours_hf.vocab_size == n
    rows = [(str(i), case.ours_gguf.token_to_piece(i), case.llama_piece(i)) for i in range(n)]
    assert all(ours == ref for _, ours, ref in rows), _mismatches(rows)
    assert all(case.ours_hf.token_to_piece(i) == case.ours_gguf.token_to_piece(i) for i in range(n))


def test_decode_matches_llama_cpp(case: Case) -> None:
    """Our decode is llama.cpp's text for the same ids, special tokens rendered.

    For SPM and Qwen2 that is llama_detokenize. For Llama-3 llama_detokenize also runs
    llama.cpp's clean-up of spaces before punctuation (" ?" -> "?"), its imitation of
    transformers' clean_up_tokenization_spaces; we never clean up (decode must round-trip and
    streamed text must equal the final text), so we compare with the concatenated pieces,
    which is exactly what llama.cpp's server streams.
    """
    rows = []
    for text in TEST_STRINGS:
        ids = case.ours_gguf.encode(text)
        if case.kind == "llama3":
            ref = b"".join(case.llama_piece(i) for i in ids)
        else:
            ref = case.llama_detokenize(ids)
        rows.append((text, case.ours_gguf.decode(ids), ref.decode("utf-8", errors="replace")))
    assert all(ours == ref for _, ours, ref in rows), _mismatches(rows)


def test_llama3_detokenize_cleanup_is_the_only_difference(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Documents the exclusion above: llama_detokenize differs from our decode only by its space clean-up."""
    with opened("llama3", request.getfixturevalue("llama3_tokenizer_dir"), tmp_path) as case:
        text = "Really ? Yes , it is . I 'm sure"
        ids = case.ours_gguf.encode(text, add_special_tokens=False)
        assert case.ours_gguf.decode(ids) == text
        assert case.llama_detokenize(ids).decode() == "Really? Yes, it is. I'm sure"


def _variant(hf_dir: Path, out: Path, token: str, merge: list[str] | None) -> Path:
    """A copy of a fixture folder whose BPE vocab has `token` (and optionally one more merge).

    The new token takes over the id of the last trained token (and that token's merge is dropped),
    because `tokenizers` numbers added tokens right after the model's vocabulary.
    """
    shutil.copytree(hf_dir, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    last_id = max(vocab.values())
    last = next(t for t, i in vocab.items() if i == last_id)
    merges[:] = [m for m in merges if "".join(m) != last]
    assert not any(last in m for m in merges)
    del vocab[last]
    vocab[token] = last_id
    if merge is not None:
        merges.append(merge)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return out


@pytest.mark.parametrize(
    ("kind", "token", "merge", "texts"),
    [
        # Llama-3 takes a pre-token that is a whole vocab entry as is (ignore_merges), even one no merge can reach.
        ("llama3", "\u0120zyx", None, [" zyx", "zyx zyx", "a zyx.", " zyxzyx", "Hello zyx\n"]),
        # Qwen2 splits digits one by one, so a "12" merge never applies; Llama-3's regex would keep "123" whole.
        ("qwen2", "12", ["1", "2"], ["123", "12 12", "1212", "x12y", "3.12"]),
    ],
)
def test_pre_tokenizer_details_match_llama_cpp(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str, token: str, merge: list[str] | None, texts: list[str]
) -> None:
    """Vocabularies trained here cannot tell these rules apart, so each case adds the one entry that does."""
    folder = _variant(request.getfixturevalue(f"{kind}_tokenizer_dir"), tmp_path / "tok", token, merge)
    with opened(kind, folder, tmp_path) as case:
        for text in texts + EDGE_CASES:
            ref = case.llama_tokenize(text, add_special=False)
            assert case.ours_gguf.encode(text, add_special_tokens=False) == ref, text
            assert case.ours_hf.encode(text, add_special_tokens=False) == ref, text
        used = case.ours_gguf.token_to_id(token) in case.ours_gguf.encode(texts[0], add_special_tokens=False)
        assert used == (kind == "llama3")  # the added token is taken whole by Llama-3, never formed by Qwen2


# --- HF-folder tokenizer vs tokenizers / transformers, and vs the GGUF path ---------------------


def test_hf_dir_ids_match_tokenizers_and_transformers(case: Case) -> None:
    auto = AutoTokenizer.from_pretrained(str(case.hf_dir))
    rows, bare = [], []
    for text in TEST_STRINGS:
        ref = case.hf.encode(text).ids
        assert auto(text)["input_ids"] == ref, text
        rows.append((text, case.ours_hf.encode(text), _single_bos(ref, case.ours_hf.bos_id)))
        bare_ref = case.hf.encode(text, add_special_tokens=False).ids
        bare.append((text, case.ours_hf.encode(text, add_special_tokens=False), bare_ref))
    assert all(ours == ref for _, ours, ref in rows), _mismatches(rows)
    assert all(ours == ref for _, ours, ref in bare), _mismatches(bare)


def test_hf_dir_and_gguf_agree(case: Case) -> None:
    """The same model tokenizes the same from its folder and from our GGUF conversion of it."""
    rows = []
    for text in TEST_STRINGS:
        if case.kind == "qwen2" and unicodedata.normalize("NFC", text) != text:
            continue  # Qwen2's tokenizer.json NFC-normalizes; llama.cpp (and so our GGUF path) does not.
        rows.append((text, case.ours_hf.encode(text), case.ours_gguf.encode(text)))
    assert len(rows) >= 250
    assert all(ours == ref for _, ours, ref in rows), _mismatches(rows)
    for text in TEST_STRINGS:
        ids = case.ours_gguf.encode(text)
        for skip in (False, True):
            assert case.ours_hf.decode(ids, skip) == case.ours_gguf.decode(ids, skip), text


def test_qwen2_nfc_difference_is_real(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Documents the exclusion above with the reference tokenizers themselves, not with our code."""
    with opened("qwen2", request.getfixturevalue("qwen2_tokenizer_dir"), tmp_path) as case:
        hf_ids = case.hf.encode(NON_NFC).ids
        llama_ids = case.llama_tokenize(NON_NFC, add_special=False)
        nfc_ids = case.llama_tokenize(unicodedata.normalize("NFC", NON_NFC), add_special=False)
        assert hf_ids != llama_ids and hf_ids == nfc_ids


# --- round trips and incremental decoding --------------------------------------------------------


def _round_trips(kind: str, source: str, text: str) -> bool:
    """Whether decode(encode(text)) must give `text` back exactly.

    Two known, intended exceptions: SentencePiece adds its dummy-prefix space to text that
    follows a special token ("<s>hi" decodes as "<s> hi", in llama.cpp and transformers alike),
    and Qwen2's tokenizer.json NFC-normalizes text before encoding.
    """
    if kind == "spm" and _has_special(text):
        return False
    return not (kind == "qwen2" and source == "hf" and unicodedata.normalize("NFC", text) != text)


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_decode_round_trips(case: Case, source: str) -> None:
    tok = case.ours_gguf if source == "gguf" else case.ours_hf
    texts = [t for t in TEST_STRINGS if _round_trips(case.kind, source, t)]
    assert len(texts) >= 180
    rows = [(t, tok.decode(tok.encode(t, add_special_tokens=False)), t) for t in texts]
    assert all(ours == ref for _, ours, ref in rows), _mismatches(rows)
    with_bos = [(t, tok.decode(tok.encode(t), skip_special_tokens=True), t) for t in texts if not _has_special(t)]
    assert all(ours == ref for _, ours, ref in with_bos), _mismatches(with_bos)
    if case.kind == "spm":
        assert tok.decode(tok.encode("<s>hi", add_special_tokens=False)) == "<s> hi"


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_incremental_decode_concatenates_to_full_decode(case: Case, source: str) -> None:
    tok = case.ours_gguf if source == "gguf" else case.ours_hf
    rng = random.Random(7)
    held_back = 0
    for text in TEST_STRINGS:
        prompt = tok.encode(rng.choice(["", "Hi", "Question: 東京?", "<|im_start|>user\n", "Tell me 😀"]))
        generated = tok.encode(text, add_special_tokens=False)
        decoder = tok.incremental_decoder(prompt)
        pieces = [decoder.step(token_id) for token_id in generated]
        tail = decoder.flush()
        full, head = tok.decode(prompt + generated), tok.decode(prompt)
        assert full.startswith(head)
        assert "".join(pieces) + tail == full[len(head) :], (text, pieces)
        assert tail == ""  # valid text is complete once its last token arrives
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)
        held_back += sum(piece == "" for piece in pieces)
    assert held_back > 0  # some characters did span several tokens


def test_incremental_decode_holds_back_partial_characters(spm_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(spm_tokenizer_dir)
    ids = tok.encode("🐙", add_special_tokens=False)
    byte_tokens = [i for i in ids if len(tok.token_to_piece(i)) == 1 and tok.token_to_piece(i)[0] >= 0x80]
    assert len(byte_tokens) == 4  # not in the training corpus: four <0xNN> byte-fallback tokens
    decoder = tok.incremental_decoder([])
    assert [decoder.step(i) for i in ids][-4:] == ["", "", "", "🐙"]
    broken = tok.incremental_decoder([])
    assert broken.step(byte_tokens[0]) == "" and broken.flush() == "\ufffd"  # a truncated character only at the end
    skipping = tok.incremental_decoder(tok.encode("Hi"), skip_special_tokens=True)
    assert skipping.step(tok.eos_id) == "" and skipping.step(tok.encode("ok", add_special_tokens=False)[0]) != ""


def test_incremental_decode_prompt_context_starts_at_a_character(spm_tokenizer_dir: Path) -> None:
    """The few prompt tokens re-decoded as context must not begin inside a byte-fallback character."""
    tok = Tokenizer.from_hf_dir(spm_tokenizer_dir)
    prompt = tok.encode("x \U00013080\U00013080", add_special_tokens=False)  # two 4-byte characters, 8 byte tokens
    assert len(prompt) >= 8 and tok.token_to_piece(prompt[-5])[0] & 0xC0 == 0x80  # 5 tokens back is mid-character
    octopus = [i for i in tok.encode("🐙", add_special_tokens=False) if tok.token_to_piece(i)[0] >= 0x80]
    decoder = tok.incremental_decoder(prompt)  # byte tokens straight after byte tokens: one ByteFallback group
    assert [decoder.step(i) for i in octopus] == ["", "", "", "🐙"]


# --- errors --------------------------------------------------------------------------------------


def _tiny_gguf(path: Path, model: str, pre: str | None = None, merges: bool = True) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([gguf.TokenType.NORMAL] * 3)
    if merges:
        writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def test_tiny_gpt2_gguf_works(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "ok.gguf", "gpt2", "gpt-2")
    assert Tokenizer.from_gguf(GGUFFile(path)).encode("abab") == [2, 2]


def test_unknown_tokenizer_model_is_refused(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(ModelFormatError, match="bert") as err:
        tokenizer_from_gguf(GGUFFile(path))
    assert str(path) in str(err.value) and "tokenizer.ggml.model" in str(err.value)


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "pre.gguf", "gpt2", "made-up-pre")
    with pytest.raises(ModelFormatError, match="made-up-pre") as err:
        Tokenizer.from_gguf(GGUFFile(path))
    assert str(path) in str(err.value) and "tokenizer.ggml.pre" in str(err.value)


def test_missing_tokenizer_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "none.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.model") as err:
        Tokenizer.from_gguf(GGUFFile(path))
    assert str(path) in str(err.value)


def test_gpt2_without_merges_is_refused(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "nomerges.gguf", "gpt2", "gpt-2", merges=False)
    with pytest.raises(ModelFormatError, match="merges"):
        Tokenizer.from_gguf(GGUFFile(path))


@pytest.mark.parametrize("damage", ["truncated", "not_json", "missing"])
def test_corrupt_tokenizer_json_is_refused(llama3_tokenizer_dir: Path, tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(llama3_tokenizer_dir, folder)
    file = folder / "tokenizer.json"
    if damage == "truncated":
        file.write_text(file.read_text()[:5000])
    elif damage == "not_json":
        file.write_text('{"model": {"type": "BPE", "vocab": 7}}')
    else:
        file.unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json") as err:
        Tokenizer.from_hf_dir(folder)
    assert err.value.path == str(file)


def test_corrupt_tokenizer_config_is_refused(qwen2_tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(qwen2_tokenizer_dir, folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelFormatError) as err:
        Tokenizer.from_hf_dir(folder)
    assert err.value.path == str(folder / "tokenizer_config.json")


def test_add_vocab_refuses_unknown_pre_tokenizer(qwen2_tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(qwen2_tokenizer_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|."
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "qwen2")
    with pytest.raises(ModelFormatError, match="pre-tokenizer") as err:
        add_vocab(writer, folder)
    assert err.value.path == str(folder / "tokenizer.json")


def test_add_vocab_leaves_the_chat_template_out(llama3_tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(llama3_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    path = write_vocab_gguf(folder, "llama", tmp_path / "t.gguf")
    assert "tokenizer.chat_template" not in gguf.GGUFReader(path).fields


def test_generation_config_eos_ids_are_stop_tokens(llama3_tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(llama3_tokenizer_dir, folder)
    reserved = Tokenizer.from_hf_dir(folder).token_to_id("<|reserved_special_token_1|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1001, reserved]}))
    assert reserved in Tokenizer.from_hf_dir(folder).eos_ids


def test_vocab_is_padded_to_the_model_vocab_size(qwen2_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Like Qwen2 (151936 embeddings for 151665 tokens), config.json's vocab_size wins; the gap is unused."""
    folder = tmp_path / "tok"
    shutil.copytree(qwen2_tokenizer_dir, folder)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 1010}))
    with opened("qwen2", folder, tmp_path) as case:
        types = gguf.GGUFReader(case.gguf_path).fields["tokenizer.ggml.token_type"].contents()
        assert len(types) == case.llama.n_vocab() == case.ours_gguf.vocab_size == 1010
        assert types[-7:] == [gguf.TokenType.UNUSED] * 7
        for text in EDGE_CASES:
            assert case.ours_gguf.encode(text) == case.llama_tokenize(text, add_special=True), text
