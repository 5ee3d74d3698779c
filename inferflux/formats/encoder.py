"""Loading BERT-family embedding models from a sentence-transformers / Hugging Face folder or a GGUF file.

Both sources end up as one `EncoderModel`: the encoder's shape, its weights as
float32 numpy arrays under our short names, the tokenizer, and the
sentence-transformers pipeline around the encoder (pooling, normalization,
maximum input length), so the same model embeds the same way from either file.

Folder (as sentence-transformers saves it):
  * `config.json` of a `bert` model; weights named as `BertModel` saves them or
    with the `bert.` prefix of `BertForMaskedLM` & co. (heads are ignored);
  * `modules.json` lists Transformer -> Pooling -> (Normalize); the Pooling
    module's `config.json` names the mode (`pooling_mode` or the legacy
    `pooling_mode_*_token(s)` booleans). A plain Hugging Face folder without
    `modules.json` gets **mean pooling and no normalization**: the most common
    sentence-transformers setup, and what sentence-transformers itself builds
    for such a folder;
  * `sentence_bert_config.json` gives `max_seq_length` (else the position table's
    size) and `do_lower_case` (sentence-transformers lowercases text itself then).

GGUF (llama.cpp's `bert` architecture): hyperparameters from `bert.*` metadata,
pooling from `bert.pooling_type` (llama.cpp's enum: 1 mean, 2 cls, 3 last; absent
means mean). GGUF does not record normalization; llama.cpp's embedding server
normalizes by default, and so do we. The maximum input length is
`bert.context_length`. Quantized tensors are dequantized to float32 at load.

The WordPiece vocabulary of a GGUF file is stored in llama.cpp's "phantom space"
form (word-initial pieces get a leading U+2581, continuation pieces lose their
`##`). `Tokenizer.from_gguf` only knows SentencePiece and byte-level BPE, so this
module rebuilds the Hugging Face BERT tokenizer from that vocabulary: the
original `##` spelling, Hugging Face's BERT normalizer (lowercasing and accent
stripping when the vocabulary is uncased, i.e. has no upper-case pieces) and
`[CLS] ... [SEP]` around every input. That reproduces the tokenizer the file was
converted from, which is what the model was trained with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import tokenizers
from tokenizers import (
    AddedToken,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from inferflux.errors import ModelFormatError
from inferflux.formats.gguf_file import GGUFFile
from inferflux.formats.hf_folder import SafetensorsFolder
from inferflux.formats.json_file import read_json_object
from inferflux.formats.quants import dequantize_raw
from inferflux.formats.tokenizer import SpecialIds, Tokenizer
from inferflux.formats.weights import QuantizedWeight

PoolingMode = Literal["mean", "cls", "lasttoken"]

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")
# llama.cpp's `enum llama_pooling_type` (gguf.PoolingType) -> our pooling mode.
GGUF_POOLING = {1: "mean", 2: "cls", 3: "lasttoken", 4: "cls"}  # 4 rank: a reranker's [CLS] (gguf_rerank.py)
# sentence-transformers' legacy pooling flags -> our pooling mode (unsupported modes map to their own name).
ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
PHANTOM_SPACE = "\u2581"

# (our name, Hugging Face name without the `bert.` prefix, GGUF name); "{i}" is the layer index.
GLOBAL_NAMES: tuple[tuple[str, str, str], ...] = (
    ("embed", "embeddings.word_embeddings.weight", "token_embd.weight"),
    ("pos_embed", "embeddings.position_embeddings.weight", "position_embd.weight"),
    ("type_embed", "embeddings.token_type_embeddings.weight", "token_types.weight"),
    ("embed_norm", "embeddings.LayerNorm.weight", "token_embd_norm.weight"),
    ("embed_norm_bias", "embeddings.LayerNorm.bias", "token_embd_norm.bias"),
)
LAYER_NAMES: tuple[tuple[str, str, str], ...] = (
    ("q", "attention.self.query.weight", "attn_q.weight"),
    ("q_bias", "attention.self.query.bias", "attn_q.bias"),
    ("k", "attention.self.key.weight", "attn_k.weight"),
    ("k_bias", "attention.self.key.bias", "attn_k.bias"),
    ("v", "attention.self.value.weight", "attn_v.weight"),
    ("v_bias", "attention.self.value.bias", "attn_v.bias"),
    ("o", "attention.output.dense.weight", "attn_output.weight"),
    ("o_bias", "attention.output.dense.bias", "attn_output.bias"),
    ("attn_norm", "attention.output.LayerNorm.weight", "attn_output_norm.weight"),
    ("attn_norm_bias", "attention.output.LayerNorm.bias", "attn_output_norm.bias"),
    ("up", "intermediate.dense.weight", "ffn_up.weight"),
    ("up_bias", "intermediate.dense.bias", "ffn_up.bias"),
    ("down", "output.dense.weight", "ffn_down.weight"),
    ("down_bias", "output.dense.bias", "ffn_down.bias"),
    ("out_norm", "output.LayerNorm.weight", "layer_output_norm.weight"),
    ("out_norm_bias", "output.LayerNorm.bias", "layer_output_norm.bias"),
)
# Names prefixed by task-head wrappers (BertForMaskedLM, BertForSequenceClassification, ...).
HF_PREFIXES = ("bert.", "model.")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The shape of a BERT encoder; every field the forward pass needs, nothing else."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass
class EncoderModel:
    """Everything needed to turn text into embedding vectors, whatever file it came from."""

    path: Path
    format: str  # "gguf" or "safetensors"
    config: EncoderConfig
    weights: dict[str, np.ndarray]  # float32, our names (see GLOBAL_NAMES / LAYER_NAMES)
    tokenizer: Tokenizer
    pooling: PoolingMode
    normalize: bool
    max_seq_length: int  # tokens per input, [CLS] and [SEP] included
    lowercase_input: bool = False  # sentence-transformers' do_lower_case: text is lowercased before tokenizing

    @property
    def dimensions(self) -> int:
        return self.config.hidden_size


def iter_names(num_layers: int) -> list[tuple[str, str, str]]:
    """Every (ours, hf, gguf) name triple of an encoder with `num_layers` layers."""
    names = list(GLOBAL_NAMES)
    for i in range(num_layers):
        names += [(f"layers.{i}.{o}", f"encoder.layer.{i}.{h}", f"blk.{i}.{g}") for o, h, g in LAYER_NAMES]
    return names


def load_encoder(path: str | Path) -> EncoderModel:
    """A sentence-transformers / Hugging Face folder or a GGUF file -> `EncoderModel`."""
    path = Path(path).expanduser()
    if path.is_file():
        return load_encoder_gguf(path)
    if path.is_dir():
        return load_encoder_folder(path)
    raise ModelFormatError(path, "no such file or folder")


def read_encoder_config(path: str | Path) -> EncoderConfig:
    """The encoder's shape from a folder's config.json or a GGUF file's `bert.*` metadata; no weights read."""
    path = Path(path).expanduser()
    if path.is_file():
        return _gguf_encoder_config(GGUFFile(path))
    return _hf_encoder_config(path)


# --- folders -------------------------------------------------------------------------------------


def load_encoder_folder(folder: str | Path) -> EncoderModel:
    """Load a sentence-transformers folder (or a plain Hugging Face BERT folder: mean pooling, no normalize)."""
    folder = Path(folder)
    modules = _st_modules(folder)
    model_dir = folder / modules.get("Transformer", "")
    config = _hf_encoder_config(model_dir)
    st_config = read_json_object(model_dir / "sentence_bert_config.json", missing_ok=True)
    pooling: PoolingMode = "mean"
    if "Pooling" in modules:
        pooling = _st_pooling_mode(folder / modules["Pooling"] / "config.json")
    max_len = _positive_int(st_config.get("max_seq_length") or config.max_position,
                            model_dir / "sentence_bert_config.json", "max_seq_length")
    tokenizer = Tokenizer.from_hf_dir(model_dir)
    # tokenizer.json may carry fixed padding/truncation settings (MiniLM's pads to 128); we pad and check ourselves.
    tokenizer.backend.no_padding()
    tokenizer.backend.no_truncation()
    return EncoderModel(
        path=folder,
        format="safetensors",
        config=config,
        weights=_hf_encoder_weights(model_dir, config),
        tokenizer=tokenizer,
        pooling=pooling,
        normalize="Normalize" in modules,
        max_seq_length=min(max_len, config.max_position),
        lowercase_input=bool(st_config.get("do_lower_case", False)),
    )


def _st_modules(folder: Path) -> dict[str, str]:
    """Module kind (Transformer, Pooling, Normalize) -> its sub-folder, from modules.json.

    Modules that change the vectors in ways we do not implement (Dense, LayerNorm, ...) are
    refused by name rather than silently skipped, since skipping them gives wrong embeddings.
    """
    file = folder / "modules.json"
    if not file.is_file():
        return {}
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelFormatError(file, f"cannot read JSON: {err}") from None
    if not isinstance(entries, list):
        raise ModelFormatError(file, "expected a JSON list of modules")
    kinds: dict[str, str] = {}
    for entry in entries:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""
        if kind not in ("Transformer", "Pooling", "Normalize"):
            raise ModelFormatError(file, f"unsupported sentence-transformers module {kind or entry!r} "
                                         "(supported: Transformer, Pooling, Normalize)")
        kinds[kind] = str(entry.get("path", ""))
    return kinds


def _st_pooling_mode(file: Path) -> PoolingMode:
    """The Pooling module's mode: `pooling_mode` (new) or exactly one legacy flag; none set means mean."""
    config = read_json_object(file)
    mode = config.get("pooling_mode")
    if mode is None:
        active = [name for flag, name in ST_POOLING_FLAGS.items() if config.get(flag)]
        mode = active if len(active) > 1 else (active[0] if active else "mean")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in ("mean", "cls", "lasttoken"):
        raise ModelFormatError(file, f"unsupported pooling mode {mode!r} (supported: mean, cls, lasttoken)")
    return mode  # type: ignore[return-value]


def _hf_encoder_config(folder: Path) -> EncoderConfig:
    file = folder / "config.json"
    raw = read_json_object(file)
    model_type = raw.get("model_type")
    if model_type != "bert":
        raise ModelFormatError(file, f"unsupported encoder model_type {model_type!r} (supported: 'bert')")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ModelFormatError(file, f"unsupported position_embedding_type {raw['position_embedding_type']!r}")
    act = str(raw.get("hidden_act", "gelu"))
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelFormatError(file, f"unsupported hidden_act {act!r} (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    return _checked_config(file, EncoderConfig(
        num_layers=_positive_int(raw.get("num_hidden_layers"), file, "num_hidden_layers"),
        hidden_size=_positive_int(raw.get("hidden_size"), file, "hidden_size"),
        num_heads=_positive_int(raw.get("num_attention_heads"), file, "num_attention_heads"),
        intermediate_size=_positive_int(raw.get("intermediate_size"), file, "intermediate_size"),
        max_position=_positive_int(raw.get("max_position_embeddings", 512), file, "max_position_embeddings"),
        type_vocab_size=_positive_int(raw.get("type_vocab_size", 2), file, "type_vocab_size"),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
        hidden_act=act,
        vocab_size=_positive_int(raw.get("vocab_size"), file, "vocab_size"),
    ))


def _hf_encoder_weights(folder: Path, config: EncoderConfig) -> dict[str, np.ndarray]:
    """Every encoder tensor as float32 under our names; `bert.`-prefixed and old gamma/beta names accepted."""
    tensors = SafetensorsFolder(folder)
    available = {_hf_canonical(name): name for name in tensors.names}
    weights: dict[str, np.ndarray] = {}
    for ours, hf, _ in iter_names(config.num_layers):
        if hf not in available:
            raise ModelFormatError(folder, f"missing tensor {hf!r} (nor with a 'bert.' prefix)")
        weights[ours] = np.asarray(tensors.read(available[hf]), np.float32)
    _check_shapes(weights, config, folder)
    return weights


def _hf_canonical(name: str) -> str:
    """Strip a task-head prefix and map pre-2019 `LayerNorm.gamma/beta` to `weight/bias`."""
    for prefix in HF_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.endswith("LayerNorm.gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith("LayerNorm.beta"):
        return name[: -len("beta")] + "bias"
    return name


# --- GGUF ----------------------------------------------------------------------------------------


def load_encoder_gguf(path: str | Path) -> EncoderModel:
    """Load a llama.cpp `bert` GGUF file; its WordPiece vocabulary becomes a Hugging Face BERT tokenizer."""
    file = GGUFFile(path)
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch != "bert":
        raise ModelFormatError(file.path, f"unsupported encoder architecture {arch!r} (supported: 'bert')")
    config = _gguf_encoder_config(file)
    pooling_type = int(meta.get("bert.pooling_type", 1))
    if pooling_type not in GGUF_POOLING:
        raise ModelFormatError(file.path, f"unsupported bert.pooling_type {pooling_type} "
                                          "(supported: 1 mean, 2 cls, 3 last, 4 rank)")
    return EncoderModel(
        path=file.path,
        format="gguf",
        config=config,
        weights=_gguf_encoder_weights(file, config),
        tokenizer=wordpiece_tokenizer_from_gguf(file),
        pooling=GGUF_POOLING[pooling_type],  # type: ignore[arg-type]
        normalize=True,
        max_seq_length=config.max_position,
    )


def _gguf_encoder_config(file: GGUFFile) -> EncoderConfig:
    meta = file.metadata
    embed = file.tensors.get("token_embd.weight")
    types = file.tensors.get("token_types.weight")
    if embed is None or types is None:
        raise ModelFormatError(file.path, "missing tensor 'token_embd.weight' or 'token_types.weight'")

    def need(key: str) -> int:
        return _positive_int(meta.get(f"bert.{key}"), file.path, f"bert.{key}")

    return _checked_config(file.path, EncoderConfig(
        num_layers=need("block_count"),
        hidden_size=need("embedding_length"),
        num_heads=need("attention.head_count"),
        intermediate_size=need("feed_forward_length"),
        max_position=need("context_length"),
        type_vocab_size=int(types.shape[1]) if len(types.shape) > 1 else 1,
        layer_norm_eps=float(meta.get("bert.attention.layer_norm_epsilon", 1e-12)),
        hidden_act="gelu",  # llama.cpp's bert graph has no other; BERT was trained with the erf form
        vocab_size=int(embed.shape[1]),
    ))


def _gguf_encoder_weights(file: GGUFFile, config: EncoderConfig) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for ours, _, gguf_name in iter_names(config.num_layers):
        if gguf_name not in file.tensors:
            raise ModelFormatError(file.path, f"missing tensor {gguf_name!r}")
        weight = file.weight(gguf_name)
        if isinstance(weight, QuantizedWeight):
            weights[ours] = np.asarray(dequantize_raw(weight.raw, weight.qtype, weight.shape, name=gguf_name,
                                                      path=file.path))
        else:
            weights[ours] = np.asarray(weight, np.float32)
    _check_shapes(weights, config, file.path)
    return weights


def wordpiece_tokenizer_from_gguf(file: GGUFFile) -> Tokenizer:
    """The Hugging Face BERT tokenizer for a GGUF file with `tokenizer.ggml.model = "bert"`."""
    meta = file.metadata
    model = meta.get(gguf.Keys.Tokenizer.MODEL)
    if model != "bert":
        raise ModelFormatError(file.path, f"cannot tokenize for a bert encoder with tokenizer.ggml.model {model!r} "
                                          "(expected 'bert', a WordPiece vocabulary)")
    tokens: list[str] = meta.get(gguf.Keys.Tokenizer.LIST) or []
    if not tokens:
        raise ModelFormatError(file.path, "tokenizer.ggml.tokens is missing or empty")
    types: list[int] = meta.get(gguf.Keys.Tokenizer.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens)
    vocab = {_wordpiece_spelling(token): i for i, token in enumerate(tokens)}
    cls_id = _special(meta, tokens, (gguf.Keys.Tokenizer.BOS_ID, "tokenizer.ggml.cls_token_id"), "[CLS]", file)
    sep_id = _special(meta, tokens, (gguf.Keys.Tokenizer.SEP_ID, gguf.Keys.Tokenizer.EOS_ID), "[SEP]", file)
    unk_id = _special(meta, tokens, (gguf.Keys.Tokenizer.UNK_ID,), "[UNK]", file)
    uncased = not any(t != t.lower() for t in tokens if not _is_bracketed(t))
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=tokens[unk_id], max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=uncased, lowercase=uncased)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    cls, sep = tokens[cls_id], tokens[sep_id]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, cls_id), (sep, sep_id)])
    control = {i for i, kind in enumerate(types) if kind in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)}
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in sorted(control | {cls_id, sep_id, unk_id})])
    special = SpecialIds(bos_id=cls_id, eos_id=sep_id, eos_ids=frozenset({sep_id}), add_bos=True, add_eos=True)
    return Tokenizer(backend, special, "text")


def _wordpiece_spelling(token: str) -> str:
    """Undo llama.cpp's phantom-space vocabulary: '▁word' -> 'word', 'ing' -> '##ing', '[CLS]' stays."""
    if token.startswith(PHANTOM_SPACE):
        return token[1:]
    if _is_bracketed(token):
        return token
    return "##" + token


def _is_bracketed(token: str) -> bool:
    """'[CLS]', '[unused0]': kept as they are by llama.cpp's converter (and never word pieces)."""
    return len(token) > 1 and token.startswith("[") and token.endswith("]")


def _special(meta: dict[str, Any], tokens: list[str], keys: tuple[str, ...], text: str, file: GGUFFile) -> int:
    """A special token's id: the first metadata key present, else the token spelled `text`."""
    for key in keys:
        value = meta.get(key)
        if isinstance(value, int) and 0 <= value < len(tokens):
            return value
    if text in tokens:
        return tokens.index(text)
    raise ModelFormatError(file.path, f"no {text} token: none of {', '.join(keys)} and no {text!r} in the vocabulary")


# --- checks --------------------------------------------------------------------------------------


def _checked_config(path: Path, config: EncoderConfig) -> EncoderConfig:
    if config.hidden_size % config.num_heads:
        raise ModelFormatError(path, f"hidden size {config.hidden_size} is not divisible by "
                                     f"{config.num_heads} attention heads")
    return config


def _check_shapes(weights: dict[str, np.ndarray], config: EncoderConfig, path: Path) -> None:
    """Catch a config that does not match its tensors here, with names, not as an XLA shape error later."""
    h, f = config.hidden_size, config.intermediate_size
    expected = {
        "embed": (config.vocab_size, h), "type_embed": (config.type_vocab_size, h), "embed_norm": (h,),
        "embed_norm_bias": (h,),
    }
    for i in range(config.num_layers):
        for name in ("q", "k", "v", "o"):
            expected[f"layers.{i}.{name}"] = (h, h)
            expected[f"layers.{i}.{name}_bias"] = (h,)
        expected[f"layers.{i}.up"], expected[f"layers.{i}.up_bias"] = (f, h), (f,)
        expected[f"layers.{i}.down"], expected[f"layers.{i}.down_bias"] = (h, f), (h,)
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ModelFormatError(path, f"tensor {name!r} has shape {weights[name].shape}, expected {shape}")
    pos = weights["pos_embed"].shape
    if len(pos) != 2 or pos[1] != h or pos[0] < config.max_position:
        raise ModelFormatError(path, f"position table has shape {pos}, expected ({config.max_position}, {h})")


def _positive_int(value: Any, path: Path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFormatError(path, f"{key} must be a positive integer, got {value!r}")
    return value
