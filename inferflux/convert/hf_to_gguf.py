"""Convert a Hugging Face safetensors folder to one GGUF file that llama.cpp and InferFlux load.

What goes in: the architecture's hyper-parameters, the tokenizer (as
`tokenizer.ggml.*`), the chat template, and every weight at the requested
type. Choices follow llama.cpp's own converter so the file behaves like one
made there:
- 1-D tensors (norms, biases) stay F32;
- a matrix whose rows do not split into whole blocks of the requested type
  falls back to the type llama.cpp falls back to (`quantize.fallback_type`);
- `llama` Q/K rows are interleaved for llama.cpp's rotary convention;
- llama3 rope scaling is written as a `rope_freqs` tensor.

Tensors are streamed: headers first, then one tensor read, quantized and
written at a time, so converting needs memory for one tensor, not the model.
The file appears under its final name only when complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from inferflux.convert.bert_gguf import convert_bert_to_gguf, is_bert_folder
from inferflux.convert.gguf_vocab import add_vocab
from inferflux.convert.quantize import fallback_type, quantize
from inferflux.errors import ModelFormatError
from inferflux.files import atomic_write
from inferflux.formats.chat_template import template_from_hf_dir
from inferflux.formats.hf_folder import SafetensorsFolder
from inferflux.formats.model_config import ModelConfig, llama3_rope_factors
from inferflux.formats.weights import GGUF_ROPE_FREQS, apply_llama_rope_permutation, iter_names

OUTPUT_TYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q4_K": (gguf.GGMLQuantizationType.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "Q6_K": (gguf.GGMLQuantizationType.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
}

Progress = Callable[[str, int, int], None]


def convert_hf_to_gguf(
    src: str | Path,
    dst: str | Path,
    out_type: str = "F16",
    *,
    name: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write `src` (a Hugging Face folder) as a GGUF file at `dst` with weights at `out_type`.

    `progress(tensor_name, done, total)` is called after each tensor.
    """
    src, dst = Path(src), Path(dst)
    key = out_type.upper()
    if key not in OUTPUT_TYPES:
        raise ValueError(f"unsupported output type {out_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    qtype, file_type = OUTPUT_TYPES[key]
    if is_bert_folder(src):  # an embedding model or cross-encoder: llama.cpp's `bert` layout (convert/bert_gguf.py)
        return convert_bert_to_gguf(src, dst, qtype, file_type, name or src.name, progress)
    config = ModelConfig.from_hf_dir(src)
    tensors = SafetensorsFolder(src)
    plan = _plan(config, tensors, qtype)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, config.architecture)
        try:
            _add_metadata(writer, config, file_type, name or src.name)
            add_vocab(writer, src)
            template = template_from_hf_dir(src)
            if template:
                writer.add_chat_template(template)
            for gguf_name, _, shape, tensor_type in plan:
                nbytes = _nbytes(shape, tensor_type)
                writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for done, (gguf_name, read, shape, tensor_type) in enumerate(plan, start=1):
                data = read().astype(np.float32).reshape(shape)
                writer.write_tensor_data(quantize(data if data.ndim > 1 else data[None, :], tensor_type))
                if progress is not None:
                    progress(gguf_name, done, len(plan))
        finally:
            writer.close()

    atomic_write(dst, write)
    return dst


def _plan(
    config: ModelConfig, tensors: SafetensorsFolder, qtype: gguf.GGMLQuantizationType
) -> list[tuple[str, Callable[[], np.ndarray], tuple[int, ...], gguf.GGMLQuantizationType]]:
    """(gguf name, reader, shape, type) for every tensor the file will hold, in file order."""
    available = set(tensors.names)
    plan = []
    for ours, hf_name, gguf_name in iter_names(config.num_layers):
        if hf_name not in available:
            if ours == "lm_head" and config.tie_word_embeddings:
                continue
            if ours.endswith("_bias"):
                continue
            raise ModelFormatError(tensors.folder, f"missing tensor {hf_name!r}")
        if ours == "lm_head" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        shape = tensors.shape(hf_name)
        tensor_type = qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        tensor_type = fallback_type(tensor_type, shape[-1])
        plan.append((gguf_name, _reader(tensors, hf_name, ours, config), shape, tensor_type))
    inv_freq_factors = _rope_freq_factors(config)
    if inv_freq_factors is not None:
        plan.append((GGUF_ROPE_FREQS, lambda: inv_freq_factors, inv_freq_factors.shape, gguf.GGMLQuantizationType.F32))
    return plan


def _reader(tensors: SafetensorsFolder, hf_name: str, ours: str, config: ModelConfig) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        data = np.asarray(tensors.read(hf_name), dtype=np.float32)
        if config.architecture == "llama" and ours.rsplit(".", 1)[-1] in ("q", "q_bias"):
            return apply_llama_rope_permutation(data, config.num_heads)
        if config.architecture == "llama" and ours.rsplit(".", 1)[-1] in ("k", "k_bias"):
            return apply_llama_rope_permutation(data, config.num_kv_heads)
        return data

    return read


def _rope_freq_factors(config: ModelConfig) -> np.ndarray | None:
    if config.rope_scaling is None or config.rope_scaling.kind != "llama3":
        return None
    return llama3_rope_factors(config.rope_scaling, config.rope_base_inv_freq()).astype(np.float32)


def _add_metadata(writer: gguf.GGUFWriter, config: ModelConfig, file_type: int, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if config.head_dim != config.hidden_size // config.num_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.rope_scaling is not None and config.rope_scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block_size * type_size
