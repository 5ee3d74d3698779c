"""Build a `tokenizers.Tokenizer` from the `tokenizer.ggml.*` metadata of a GGUF file.

A GGUF file carries its vocabulary in llama.cpp's terms, not as a tokenizer.json.
Rather than port llama.cpp's tokenizers, we express each one with the building
blocks of the Hugging Face `tokenizers` library, chosen so the ids come out the
same as llama.cpp's `llama_tokenize(..., parse_special=True)`:

* `llama` (SentencePiece): llama.cpp merges adjacent symbols by the score of the
  merged token and falls back to `<0xNN>` byte tokens. That is a BPE whose merge
  ranks follow the scores, with byte fallback; the dummy-prefix space is a
  Prepend normalizer, which (like llama.cpp) applies to every run of text
  between special tokens.
* `gpt2` (byte-level BPE): the merges as stored, a Split regex chosen by
  `tokenizer.ggml.pre`, then the GPT-2 byte-to-unicode mapping.

Control, unknown and user-defined tokens become added tokens, so they are
matched inside text as llama.cpp does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from inferflux.errors import ModelFormatError

if TYPE_CHECKING:
    from inferflux.formats.gguf_file import GGUFFile

logger = logging.getLogger(__name__)

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# Split regexes as Hugging Face tokenizer.json files spell them. llama.cpp spells the
# case-insensitive contractions out ('[sS]...) because its regex engine lacks (?i:); same language.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's fallback: four regexes, each splitting the pieces the previous one left.
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")


class _Pre:
    """How llama.cpp pre-tokenizes for one family of `tokenizer.ggml.pre` values."""

    def __init__(self, regexes: tuple[str, ...], ignore_merges: bool = False, add_bos: bool = False) -> None:
        self.regexes = regexes
        self.ignore_merges = ignore_merges  # llama.cpp takes a whole pre-token that is in the vocab as is
        self.add_bos = add_bos  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = _Pre((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_QWEN2 = _Pre((QWEN2_REGEX,))
_GPT2 = _Pre((GPT2_REGEX,))
_DEFAULT = _Pre(DEFAULT_REGEXES)

# `tokenizer.ggml.pre` values (as llama.cpp's llama-vocab.cpp names them) that we reproduce.
BPE_PRE_TOKENIZERS: dict[str, _Pre] = {
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "gpt-2": _GPT2,
    "default": _DEFAULT,
}

# GGUF token types (gguf.TokenType) that llama.cpp matches in text before tokenizing the rest.
_MATCHED_IN_TEXT = {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, gguf.TokenType.USER_DEFINED}


class GGUFVocab:
    """The `tokenizer.ggml.*` metadata of one GGUF file, read once, with llama.cpp's defaults."""

    def __init__(self, file: GGUFFile) -> None:
        self.path = path = file.path
        self._file = file
        self.model = self._get(gguf.Keys.Tokenizer.MODEL)
        if self.model is None:
            raise ModelFormatError(path, "no tokenizer in the file (tokenizer.ggml.model is missing)")
        tokens = self._get(gguf.Keys.Tokenizer.LIST)
        if not tokens:
            raise ModelFormatError(path, "tokenizer.ggml.tokens is missing or empty")
        self.tokens: list[str] = tokens
        n = len(tokens)
        self.types: list[int] = self._get(gguf.Keys.Tokenizer.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * n
        self.scores: list[float] = self._get(gguf.Keys.Tokenizer.SCORES) or [0.0] * n
        if len(self.types) < n or len(self.scores) < n:
            raise ModelFormatError(path, f"tokenizer.ggml token types/scores are shorter than the {n} tokens")
        self.merges: list[str] = self._get(gguf.Keys.Tokenizer.MERGES) or []
        self.pre: str | None = self._get(gguf.Keys.Tokenizer.PRE)
        self.add_space_prefix: bool = bool(self._get(gguf.Keys.Tokenizer.ADD_PREFIX, True))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value by its full key, or `default` when the file lacks it."""
        return self._get(key, default)

    def special_id(self, key: str) -> int | None:
        """A `tokenizer.ggml.*_token_id` value, or None when absent or out of the vocabulary's range."""
        value = self._get(key)
        if isinstance(value, int) and 0 <= value < len(self.tokens):
            return value
        return None

    def _get(self, key: str, default: Any = None) -> Any:
        return self._file.value(key, default)


def tokenizer_from_gguf(file: GGUFFile) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's tokenizer for this GGUF file."""
    return build_tokenizer(GGUFVocab(file))


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """Dispatch on `tokenizer.ggml.model`; anything but `llama` and `gpt2` is refused by name."""
    if vocab.model == "llama":
        tokenizer = _sentencepiece_tokenizer(vocab)
    elif vocab.model == "gpt2":
        tokenizer = _byte_level_bpe_tokenizer(vocab)
    else:
        raise ModelFormatError(
            vocab.path, f"unsupported tokenizer.ggml.model {vocab.model!r} (supported: 'llama', 'gpt2')"
        )
    _add_text_matched_tokens(tokenizer, vocab)
    return tokenizer


def bpe_pre_tokenizer(vocab: GGUFVocab) -> _Pre:
    """The pre-tokenizer for `tokenizer.ggml.pre`; an unknown value is an error, as in llama.cpp."""
    if not vocab.pre:
        logger.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer", vocab.path)
        return _DEFAULT
    pre = BPE_PRE_TOKENIZERS.get(vocab.pre)
    if pre is None:
        raise ModelFormatError(
            vocab.path,
            f"unsupported tokenizer.ggml.pre {vocab.pre!r} (supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))})",
        )
    return pre


def default_add_bos(vocab: GGUFVocab) -> bool:
    """llama.cpp's add_bos when the file does not say: on for SentencePiece and Llama-3, off otherwise."""
    if vocab.model == "llama":
        return True
    if vocab.model == "gpt2":
        return bpe_pre_tokenizer(vocab).add_bos
    return False


def _unique_vocab(vocab: GGUFVocab) -> dict[str, int]:
    """token -> id; on a duplicate token text the last id wins, as in llama.cpp's token_to_id."""
    return {token: token_id for token_id, token in enumerate(vocab.tokens)}


def _sentencepiece_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """llama.cpp's SPM tokenizer: merge by score, byte fallback, optional dummy-prefix space."""
    token_ids = _unique_vocab(vocab)
    unk_id = vocab.special_id(gguf.Keys.Tokenizer.UNK_ID)
    model = models.BPE(
        vocab=token_ids,
        merges=_merges_from_scores(vocab),
        unk_token=vocab.tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", SPM_SPACE)]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    chain: list[decoders.Decoder] = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        chain.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(chain)
    return tokenizer


def _merges_from_scores(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges whose ranks follow the SentencePiece scores of the merged tokens.

    llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring token; a BPE ranks each (left, right) pair by that token's score instead.
    Only normal tokens take part: byte, control and user-defined tokens are never merged into.
    """
    normal = {
        token: (score, token_id)
        for token_id, (token, score, kind) in enumerate(zip(vocab.tokens, vocab.scores, vocab.types))
        if kind == gguf.TokenType.NORMAL
    }
    ranked: list[tuple[float, int, str, str]] = []
    for token, (score, token_id) in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-score, token_id, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _byte_level_bpe_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """llama.cpp's BPE tokenizer: Split regex(es) for `tokenizer.ggml.pre`, byte-level BPE with the stored merges."""
    pre = bpe_pre_tokenizer(vocab)
    if not vocab.merges:
        raise ModelFormatError(vocab.path, "tokenizer.ggml.merges is missing (a gpt2 tokenizer needs its merges)")
    model = models.BPE(
        vocab=_unique_vocab(vocab),
        merges=[_split_merge(vocab, merge) for merge in vocab.merges],
        ignore_merges=pre.ignore_merges,
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False) for regex in pre.regexes]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _split_merge(vocab: GGUFVocab, merge: str) -> tuple[str, str]:
    """'left right' -> (left, right), splitting at the first space after the first character, as llama.cpp does."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ModelFormatError(vocab.path, f"malformed entry in tokenizer.ggml.merges: {merge!r}")
    return merge[:cut], merge[cut + 1 :]


def _add_text_matched_tokens(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    """Register control/unknown (special) and user-defined (not special) tokens as added tokens.

    Added tokens are matched in raw text before the normalizer and model run, which is how
    llama.cpp treats these token types when parse_special is on (user-defined ones always).
    """
    added = [
        AddedToken(token, special=kind != gguf.TokenType.USER_DEFINED, normalized=False)
        for token, kind in zip(vocab.tokens, vocab.types)
        if kind in _MATCHED_IN_TEXT
    ]
    if added:
        tokenizer.add_special_tokens([t for t in added if t.special])
        tokenizer.add_tokens([t for t in added if not t.special])
