"""The tokenizer the runtime uses, from a Hugging Face folder or a GGUF file.

Both sources end up as one `tokenizers.Tokenizer` (the Rust library does the
work; nothing here loops over merges) plus the few facts the engine needs:
which id is BOS, which ids end generation, whether the model wants BOS added.
The rules follow llama.cpp where the two ecosystems differ, so a model tokenizes
the same whether it is served from its GGUF file or its original folder:

* BOS is added once: not when the text already starts with it (chat templates
  often render `bos_token` themselves);
* generation stops on every end-of-generation token llama.cpp would stop on
  (`<|eot_id|>`, `<|im_end|>`, ...), not only on the configured EOS;
* decoding never "cleans up" spaces, so decode(encode(text)) gives back text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gguf
import tokenizers
from gguf.vocab import SpecialVocab, bytes_to_unicode

from inferflux.errors import ModelFormatError
from inferflux.formats.gguf_tokenizer import SPM_SPACE, GGUFVocab, build_tokenizer, default_add_bos
from inferflux.formats.json_file import read_json_object

if TYPE_CHECKING:
    from inferflux.formats.gguf_file import GGUFFile

# Token texts llama.cpp treats as end-of-generation whatever the configured EOS is
# (llama-vocab.cpp, special_eog_ids); a chat model ends its turn with one of these.
EOG_TOKEN_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
        "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    }
)  # fmt: skip

PieceStyle = Literal["byte_level", "sentencepiece", "text"]

_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}
# How many prompt tokens the incremental decoder re-decodes as context (as vLLM does).
_CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class SpecialIds:
    """The special-token facts the runtime needs, whatever the tokenizer's source."""

    bos_id: int | None
    eos_id: int | None
    eos_ids: frozenset[int]
    add_bos: bool
    add_eos: bool


class Tokenizer:
    """Text <-> token ids for one model, with BOS/EOS rules and incremental detokenization."""

    def __init__(self, backend: tokenizers.Tokenizer, special: SpecialIds, piece_style: PieceStyle) -> None:
        self._backend = backend
        self._literal: tokenizers.Tokenizer | None = None  # same tokenizer, special tokens read as text
        self._special = special
        self._piece_style = piece_style
        self._pieces: list[bytes] | None = None

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json; BOS/EOS and add_bos from tokenizer_config.json, the post-processor and config files."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise ModelFormatError(file, "missing tokenizer.json (only fast Hugging Face tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises a bare Exception for any parse error
            raise ModelFormatError(file, f"corrupt tokenizer.json: {err}") from err
        return cls(backend, _hf_special_ids(folder, backend), _hf_piece_style(file))

    @classmethod
    def from_gguf(cls, file: GGUFFile) -> Tokenizer:
        """Build from the file's `tokenizer.ggml.*` metadata, with llama.cpp's defaults for missing keys."""
        vocab = GGUFVocab(file)
        backend = build_tokenizer(vocab)
        style: PieceStyle = "sentencepiece" if vocab.model == "llama" else "byte_level"
        return cls(backend, _gguf_special_ids(vocab), style)

    # --- facts ----------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return self._special.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._special.eos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends generation: EOS plus end-of-turn tokens such as <|eot_id|> or <|im_end|>."""
        return self._special.eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether encode(add_special_tokens=True) puts BOS in front, as the model was trained."""
        return self._special.add_bos and self._special.bos_id is not None

    @property
    def add_eos(self) -> bool:
        return self._special.add_eos and self._special.eos_id is not None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for offsets, batch encoding and the like)."""
        return self._backend

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry for an id as stored (e.g. 'Ġhello' or '▁hello'), or None if out of range."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # --- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for `text`.

        add_special_tokens: add BOS (and EOS) if the model wants them; BOS is not added again
        when the text already starts with it. parse_special: match special tokens written in the
        text (`<|eot_id|>`, `<s>`) as single ids; off for untrusted text that must stay literal.
        """
        backend = self._backend if parse_special else self._literal_backend()
        ids = backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and not (ids and ids[0] == self.bos_id):
                ids.insert(0, self._special.bos_id)  # type: ignore[arg-type]
            if self.add_eos:
                ids.append(self._special.eos_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`; bytes that do not form complete UTF-8 characters come out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_piece(self, token_id: int) -> bytes:
        """The bytes this token adds to decoded text (llama.cpp's token_to_piece with special=True).

        Bytes, not str: a byte-fallback or byte-level token can hold part of a UTF-8 character.
        No leading space is stripped; special tokens give their text.
        """
        pieces = self._piece_table()
        if not 0 <= token_id < len(pieces):
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {len(pieces)})")
        return pieces[token_id]

    def incremental_decoder(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False
    ) -> IncrementalDecoder:
        """A streaming detokenizer for tokens generated after `prompt_ids`."""
        return IncrementalDecoder(self, prompt_ids, skip_special_tokens)

    # --- internals ------------------------------------------------------------------------------

    def _literal_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that reads special tokens in text as plain text (made on first use)."""
        if self._literal is None:
            literal = tokenizers.Tokenizer.from_str(self._backend.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal

    def _piece_table(self) -> list[bytes]:
        if self._pieces is None:
            added = self._backend.get_added_tokens_decoder()
            style = self._piece_style
            self._pieces = [
                added[i].content.encode() if i in added else _piece_bytes(self._backend.id_to_token(i), style)
                for i in range(self.vocab_size)
            ]
        return self._pieces

    def _starts_a_character(self, token_id: int) -> bool:
        """False when the token's bytes begin inside a UTF-8 character (a continuation byte)."""
        piece = self.token_to_piece(token_id) if 0 <= token_id < self.vocab_size else b""
        return not piece or (piece[0] & 0xC0) != 0x80


class IncrementalDecoder:
    """Streams text as tokens arrive, never splitting a UTF-8 character.

    Decoding token by token is wrong twice over: a character can span several byte tokens,
    and SentencePiece decoders strip the space at the start of what they decode. So, as vLLM
    does, each step decodes a short window twice, from `prefix_offset` to `read_offset` (text
    already emitted) and to the end, and emits the difference once it does not end in U+FFFD.
    Both decodes start at the same token, so whatever the decoder does at the start cancels out.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = self._context_start()

    @property
    def ids(self) -> list[int]:
        """Prompt and generated ids so far."""
        return list(self._ids)

    def step(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ('' while a character is unfinished)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (incomplete bytes become U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        window = self._ids[self._prefix_offset :]
        emitted = decode(self._ids[self._prefix_offset : self._read_offset], self._skip_special)
        text = decode(window, self._skip_special)
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(emitted) :]

    def _context_start(self) -> int:
        """Where the first window starts: a few prompt tokens back, at the start of a character."""
        start = max(self._read_offset - _CONTEXT_TOKENS, 0)
        while start < self._read_offset and not self._tokenizer._starts_a_character(self._ids[start]):
            start += 1
        return start


# --- Hugging Face folders ----------------------------------------------------------------------


def _hf_special_ids(folder: Path, backend: tokenizers.Tokenizer) -> SpecialIds:
    """BOS/EOS ids and add_bos/add_eos as llama.cpp's converter reads them (gguf.SpecialVocab), plus EOG ids."""
    config = read_json_object(folder / "tokenizer_config.json", missing_ok=True)
    generation = read_json_object(folder / "generation_config.json", missing_ok=True)
    model_config = read_json_object(folder / "config.json", missing_ok=True)
    try:
        with _quiet("gguf.vocab"):  # it warns about pair templates, which only matter to sentence-pair models
            special = SpecialVocab(folder, load_merges=False, n_vocab=backend.get_vocab_size(with_added_tokens=True))
    except ValueError as err:
        raise ModelFormatError(folder, f"bad special token settings: {err}") from err
    ids = special.special_token_ids
    add = special.add_special_token
    bos_id, eos_id = ids.get("bos"), ids.get("eos")
    if eos_id is None:  # no tokenizer_config.json entry: fall back to config.json's first EOS
        eos_id = next(iter(_ids_in(model_config.get("eos_token_id"))), None)
    eos_ids = {i for i in (eos_id, ids.get("eot"), ids.get("eom")) if i is not None}
    eos_ids |= set(_ids_in(generation.get("eos_token_id"))) | set(_ids_in(model_config.get("eos_token_id")))
    eos_ids |= _eog_ids_by_text(backend.get_vocab(with_added_tokens=True))
    add_bos = bool(add.get("bos", config.get("add_bos_token", False)))
    add_eos = bool(add.get("eos", config.get("add_eos_token", False)))
    return SpecialIds(bos_id, eos_id, frozenset(eos_ids), add_bos, add_eos)


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library logger's warnings for the duration of one call."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _hf_piece_style(file: Path) -> PieceStyle:
    """Byte-level (GPT-2 alphabet), SentencePiece-like (▁ and <0xNN>) or plain text, from the decoder."""
    decoder = json.loads(file.read_text(encoding="utf-8")).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        return "sentencepiece"
    return "text"


def _ids_in(value: Any) -> list[int]:
    """An id or a list of ids (config files use both)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _eog_ids_by_text(vocab: dict[str, int]) -> set[int]:
    return {vocab[text] for text in EOG_TOKEN_TEXTS if text in vocab}


# --- GGUF files --------------------------------------------------------------------------------


def _gguf_special_ids(vocab: GGUFVocab) -> SpecialIds:
    """Ids from `tokenizer.ggml.*_token_id`, add_bos from the file or llama.cpp's default for the model."""
    keys = gguf.Keys.Tokenizer
    bos_id, eos_id = vocab.special_id(keys.BOS_ID), vocab.special_id(keys.EOS_ID)
    eos_ids = {i for i in (eos_id, vocab.special_id(keys.EOT_ID), vocab.special_id(keys.EOM_ID)) if i is not None}
    eos_ids |= _eog_ids_by_text({token: i for i, token in enumerate(vocab.tokens)})
    add_bos = vocab.get(keys.ADD_BOS)
    add_eos = vocab.get(keys.ADD_EOS)
    return SpecialIds(
        bos_id=bos_id,
        eos_id=eos_id,
        eos_ids=frozenset(eos_ids),
        add_bos=default_add_bos(vocab) if add_bos is None else bool(add_bos),
        add_eos=bool(add_eos),
    )


# --- pieces ------------------------------------------------------------------------------------


def _piece_bytes(token: str | None, style: PieceStyle) -> bytes:
    """The bytes one vocabulary entry stands for."""
    if token is None:
        return b""
    if style == "byte_level":
        try:
            return bytes(_BYTE_OF_CHAR[char] for char in token)
        except KeyError:  # not in the byte alphabet: a token stored as plain text
            return token.encode()
    if style == "sentencepiece":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace(SPM_SPACE, " ").encode()
    return token.encode()

