"""Convert a BERT folder (a sentence-transformers bi-encoder or a `*ForSequenceClassification` cross-encoder) to a
llama.cpp `bert` GGUF file that InferFlux and llama.cpp both load.

The encoder is written as llama.cpp's converter writes it (`bert.*` hyper-parameters, `token_embd`,
`position_embd`, `token_types`, `blk.N.*`, the WordPiece vocabulary in its phantom-space form). A
cross-encoder also gets its head under the names llama.cpp's rank pooling (`LLAMA_POOLING_TYPE_RANK`)
reads, and `bert.pooling_type = 4` (rank):

  * `cls.weight` / `cls.bias`: BERT's pooler dense (`bert.pooler.dense`), applied with tanh;
  * `cls.output.weight` / `cls.output.bias`: the classifier (`classifier`).

llama.cpp's rank graph computes `cls.output(tanh(cls(h_[CLS])))`, which is exactly
`BertForSequenceClassification`'s head. llama.cpp's own `convert_hf_to_gguf.py` drops the pooler of
a BERT model ("we are only using BERT for embeddings"), so a reranker converted there scores
`classifier(h_[CLS])` and cannot reproduce `CrossEncoder.predict`; this converter keeps it.

GGUF has no key for what sentence-transformers applies to the logits or for the pair length it
truncates to, so two InferFlux keys carry them (llama.cpp ignores unknown keys):
`inferflux.cross_encoder.activation` (sigmoid, identity or tanh) and
`inferflux.cross_encoder.max_length`. A file without them (one made by llama.cpp) gets
CrossEncoder's defaults: Sigmoid for one label, the position table's length.

Position and token-type tables and the (tiny) head stay F32, as llama.cpp keeps them; the other
matrices take the requested type (with llama.cpp's fallback when a row does not split into blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from inferflux.convert.quantize import fallback_type, quantize
from inferflux.files import atomic_write
from inferflux.formats.cross_encoder import ClassifierHead, load_classifier_head
from inferflux.formats.encoder import PHANTOM_SPACE, EncoderModel, iter_names, load_encoder_folder
from inferflux.formats.gguf_rerank import ACTIVATION_KEY, HEAD_TENSORS, MAX_LENGTH_KEY
from inferflux.formats.json_file import read_json_object

POOLING_TYPES = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
KEEP_F32 = ("position_embd.weight", "token_types.weight")  # llama.cpp never quantizes these


def is_bert_folder(path: str | Path) -> bool:
    """A folder whose config.json says `model_type: bert` (what this converter handles)."""
    return read_json_object(Path(path) / "config.json", missing_ok=True).get("model_type") == "bert"


def convert_bert_to_gguf(src: str | Path, dst: str | Path, qtype: gguf.GGMLQuantizationType,
                         file_type: gguf.LlamaFileType, name: str | None = None,
                         progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write the BERT folder `src` as a `bert` GGUF at `dst`; a cross-encoder gets its rank head.

    `progress(tensor_name, done, total)` is called after each tensor, as `convert_hf_to_gguf` does.
    """
    src, dst = Path(src), Path(dst)
    model = load_encoder_folder(src)
    head = load_classifier_head(src)
    tensors = _tensors(model, head, qtype)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "bert")
        try:
            _add_metadata(writer, model, head, file_type, name or src.name)
            _add_wordpiece_vocab(writer, model)
            for tensor_name, data, tensor_type in tensors:
                writer.add_tensor_info(tensor_name, data.shape, data.dtype, data.nbytes, raw_dtype=tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, (tensor_name, data, _) in enumerate(tensors, start=1):
                writer.write_tensor_data(data)
                if progress is not None:
                    progress(tensor_name, done, len(tensors))
        finally:
            writer.close()

    atomic_write(dst, write)
    return dst


def _tensors(model: EncoderModel, head: ClassifierHead | None, qtype: gguf.GGMLQuantizationType,
             ) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    out = []
    for ours, _, gguf_name in iter_names(model.config.num_layers):
        weight = model.weights[ours]
        if weight.ndim == 2 and gguf_name not in KEEP_F32:
            out.append((gguf_name, *_encode(weight, fallback_type(qtype, weight.shape[1]))))
        else:
            out.append((gguf_name, weight.astype(np.float32), gguf.GGMLQuantizationType.F32))
    if head is not None:
        for ours, gguf_name in HEAD_TENSORS.items():
            out.append((gguf_name, head.weights[ours].astype(np.float32), gguf.GGMLQuantizationType.F32))
    return out


def _encode(weight: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if qtype == gguf.GGMLQuantizationType.F32:
        return weight.astype(np.float32), qtype
    if qtype == gguf.GGMLQuantizationType.F16:
        return weight.astype(np.float16), qtype
    return quantize(weight.astype(np.float32), qtype), qtype


def _add_metadata(writer: gguf.GGUFWriter, model: EncoderModel, head: ClassifierHead | None,
                  file_type: gguf.LlamaFileType, name: str) -> None:
    config = model.config
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    if head is None:
        writer.add_pooling_type(POOLING_TYPES[model.pooling])
        return
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_classifier_output_labels([f"LABEL_{i}" for i in range(head.num_labels)])
    writer.add_string(ACTIVATION_KEY, head.activation)
    writer.add_uint32(MAX_LENGTH_KEY, head.max_length)


def _add_wordpiece_vocab(writer: gguf.GGUFWriter, model: EncoderModel) -> None:
    """The WordPiece vocabulary as llama.cpp's `BertModel.set_vocab` writes it (phantom-space pieces)."""
    backend = model.tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}

    def phantom(i: int, token: str) -> str:
        if i in special:
            return token
        return token[2:] if token.startswith("##") else PHANTOM_SPACE + token

    writer.add_tokenizer_model("bert")
    writer.add_token_list([phantom(i, t) for i, t in enumerate(tokens)])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_type_count(model.config.type_vocab_size)
    for text, add in (("[CLS]", writer.add_bos_token_id), ("[SEP]", writer.add_sep_token_id),
                      ("[UNK]", writer.add_unk_token_id), ("[PAD]", writer.add_pad_token_id),
                      ("[MASK]", writer.add_mask_token_id)):
        if text in vocab:
            add(vocab[text])
