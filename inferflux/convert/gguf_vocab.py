"""Write a Hugging Face tokenizer folder as GGUF `tokenizer.ggml.*` metadata, as llama.cpp's converter does.

A GGUF file we write must tokenize the same under llama.cpp as under the original
Hugging Face tokenizer, so this follows `convert_hf_to_gguf.py`:

* a folder with `tokenizer.model` is a SentencePiece vocab (`_set_vocab_sentencepiece`):
  model `llama`, pre `default`, pieces with scores and types (byte pieces are BYTE),
  added tokens from `added_tokens.json` and `tokenizer_config.json` as user-defined or control;
* a folder with a byte-level BPE `tokenizer.json` is a GPT-2 style vocab (`get_vocab_base`):
  model `gpt2` with merges, and `tokenizer.ggml.pre` naming the pre-tokenizer.

llama.cpp picks `tokenizer.ggml.pre` by hashing the tokens of a check string, which
only recognises the exact vocabularies it was generated from; we recognise the
pre-tokenizer itself (its Split regex) instead, and refuse one we do not know.
Special token ids, add_bos/add_eos and merges come from `gguf.SpecialVocab`, the
converter's own code. The chat template is left to the caller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
from gguf.vocab import SentencePieceVocab, SpecialVocab
from tokenizers import Tokenizer

from inferflux.errors import ModelFormatError
from inferflux.formats.gguf_tokenizer import GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX
from inferflux.formats.json_file import read_json_object

# Split regex in tokenizer.json -> the llama.cpp `tokenizer.ggml.pre` that reproduces it.
_PRE_BY_SPLIT_REGEX = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}

Vocab = tuple[list[bytes], list[float], list[int]]  # tokens, scores, token types


def add_vocab(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    """Add the `tokenizer.ggml.*` keys (not the chat template) for the tokenizer in `hf_dir`."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "tokenizer.model").is_file():
        _add_sentencepiece_vocab(writer, hf_dir)
        return
    tokenizer_json = hf_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelFormatError(hf_dir, "no tokenizer.model or tokenizer.json to convert")
    spec = read_json_object(tokenizer_json)
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        _add_byte_level_bpe_vocab(writer, hf_dir, spec)
        return
    raise ModelFormatError(
        tokenizer_json,
        f"unsupported tokenizer (model {model.get('type')!r}, decoder {decoder.get('type')!r}); "
        "expected a byte-level BPE tokenizer.json or a SentencePiece tokenizer.model",
    )


# --- SentencePiece -------------------------------------------------------------------------------


def _add_sentencepiece_vocab(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    """Model `llama`: every piece with its score and type, padded to config.json's vocab_size."""
    tokens, scores, types = _sentencepiece_vocab(hf_dir)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_vocab(writer, hf_dir, load_merges=False, n_vocab=len(tokens))


def _sentencepiece_vocab(hf_dir: Path) -> Vocab:
    """Pieces from tokenizer.model (+ added_tokens.json), then tokenizer_config's added tokens on top."""
    try:
        spm_vocab = SentencePieceVocab(hf_dir)
    except Exception as err:  # sentencepiece missing (RuntimeError) or a corrupt file (its own errors)
        raise ModelFormatError(hf_dir / "tokenizer.model", f"cannot read the SentencePiece model: {err}") from err
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, kind in spm_vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    _apply_added_tokens_decoder(hf_dir, tokens, scores, types)
    _pad_to_config_vocab_size(hf_dir, tokens, scores, types)
    return tokens, scores, types


def _apply_added_tokens_decoder(hf_dir: Path, tokens: list[bytes], scores: list[float], types: list[int]) -> None:
    """tokenizer_config.json's added tokens override pieces: control if special, else user-defined."""
    config_file = hf_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return
    added = read_json_object(config_file).get("added_tokens_decoder") or {}
    for key, entry in added.items():
        token_id, content = int(key), entry["content"]
        if token_id >= len(tokens):
            _extend(tokens, scores, types, token_id + 1)
        if entry.get("special") or _looks_special(content):
            types[token_id] = gguf.TokenType.CONTROL
        else:
            content = content.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalized
            types[token_id] = gguf.TokenType.USER_DEFINED
        scores[token_id] = -1000.0
        tokens[token_id] = content.encode("utf-8")


def _pad_to_config_vocab_size(hf_dir: Path, tokens: list[bytes], scores: list[float], types: list[int]) -> None:
    """The model's embedding may be larger than the tokenizer; fill the gap with unused [PADn] tokens."""
    config_file = hf_dir / "config.json"
    if config_file.is_file():
        vocab_size = read_json_object(config_file).get("vocab_size")
        if isinstance(vocab_size, int) and vocab_size > len(tokens):
            _extend(tokens, scores, types, vocab_size)


def _extend(tokens: list[bytes], scores: list[float], types: list[int], size: int) -> None:
    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)


# --- byte-level BPE ------------------------------------------------------------------------------


def _add_byte_level_bpe_vocab(writer: gguf.GGUFWriter, hf_dir: Path, spec: dict[str, Any]) -> None:
    """Model `gpt2`: tokens and types from tokenizer.json, merges and special ids via SpecialVocab."""
    tokens, types = _byte_level_bpe_vocab(hf_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(hf_dir / "tokenizer.json", spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _add_special_vocab(writer, hf_dir, load_merges=True)


def _byte_level_bpe_vocab(hf_dir: Path) -> tuple[list[str], list[int]]:
    """Every id up to the vocab size: NORMAL, CONTROL (special added), USER_DEFINED (other added) or UNUSED gaps."""
    path = hf_dir / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise ModelFormatError(path, f"cannot load tokenizer.json: {err}") from err
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    size = max(vocab.values()) + 1
    config_file = hf_dir / "config.json"
    if config_file.is_file():
        size = max(size, read_json_object(config_file).get("vocab_size") or 0)
    by_id = {token_id: token for token, token_id in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            special = added[token_id].special or _looks_special(token)
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer_name(path: Path, pre_tokenizer: dict[str, Any] | None) -> str:
    """The `tokenizer.ggml.pre` value for a tokenizer.json pre-tokenizer, recognised by its Split regex."""
    steps = _flatten(pre_tokenizer)
    splits = [s["pattern"] for s in steps if s.get("type") == "Split" and isinstance(s.get("pattern"), dict)]
    regexes = [pattern.get("Regex") for pattern in splits]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(regexes) == 1 and regexes[0] in _PRE_BY_SPLIT_REGEX and len(steps) == 2 and byte_level:
        if not byte_level[0].get("use_regex", True):
            return _PRE_BY_SPLIT_REGEX[regexes[0]]
    if len(steps) == 1 and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own ByteLevel regex, which is GPT2_REGEX
    raise ModelFormatError(
        path,
        f"unsupported pre-tokenizer {json.dumps(pre_tokenizer)[:300]}; recognised: Split with the Llama-3 "
        f"or Qwen2 regex + ByteLevel, or GPT-2's ByteLevel (regex {GPT2_REGEX!r})",
    )


def _flatten(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [step for inner in pre_tokenizer.get("pretokenizers", []) for step in _flatten(inner)]
    return [pre_tokenizer]


# --- shared --------------------------------------------------------------------------------------


def _add_special_vocab(writer: gguf.GGUFWriter, hf_dir: Path, load_merges: bool, n_vocab: int | None = None) -> None:
    """Merges, bos/eos/unk/pad ids and add_bos/add_eos, read by gguf's SpecialVocab; no chat template."""
    try:
        special = SpecialVocab(hf_dir, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, json.JSONDecodeError) as err:
        raise ModelFormatError(hf_dir, f"cannot read special tokens: {err}") from err
    special.chat_template = None  # the converter writes the template itself
    special.add_to_gguf(writer, quiet=True)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's `does_token_look_special`: added tokens some models forget to mark special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


