"""Random-weight Llama models of real shapes, written straight to GGUF, for benchmarks.

    python -m benchmarks.make_model --shape tinyllama-1.1b --qtype Q4_K --out /tmp/x.gguf

The weights are noise but the shapes, quant types and vocabulary size are real, so the cost of a
token is the cost of the real model. Nothing is generated as floats and quantized: random bytes are
written directly into each GGML block layout, with the scale fields set to small finite values, so
even a 7-8B file takes about as long as the disk needs to write it. Every value is finite and a few
hundredths in magnitude (`tensor_stats` checks that through `gguf.quants.dequantize`), so logits stay
finite in InferFlux and in llama.cpp. Norm weights are F32 ones.

Tensor types follow llama.cpp's quantizer for the same file type:
- F16 / BF16 / Q8_0 / Q6_K: every matrix at that type, `output.weight` included;
- Q4_0 / Q4_K: every matrix at that type except `output.weight`, which is Q6_K (what `llama-quantize`
  gives the output matrix of every type below Q8_0); `token_embd.weight` keeps the requested type.
  Q4_K is labelled Q4_K_S; llama.cpp's Q4_K_S also puts a few early attn_v/ffn_down at Q5_K, this doesn't;
- Q4_K_M: Q4_K, with `attn_v` and `ffn_down` at Q6_K in the layers llama.cpp's `use_more_bits` picks
  (the first and last eighth and every third in between), output Q6_K: the common Ollama/LM Studio mix.
A matrix whose rows do not split into whole blocks falls back as llama.cpp does (`quantize.fallback_type`).

The vocabulary is the demo model's trained byte-level BPE tokenizer (`inferflux.convert.demo_model`, Llama-3
pre-tokenizer, so English prompts tokenize normally in both runtimes), padded with unused `[PADn]`
tokens up to the shape's vocabulary size, and written by `inferflux.convert.gguf_vocab` exactly as a converted
model's would be. Metadata is written by `inferflux.convert.hf_to_gguf`'s own code.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np

from inferflux.convert.demo_model import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer
from inferflux.convert.gguf_vocab import add_vocab
from inferflux.convert.hf_to_gguf import _add_metadata, _nbytes
from inferflux.convert.quantize import fallback_type
from inferflux.files import atomic_write
from inferflux.formats.model_config import ModelConfig
from inferflux.formats.weights import expected_shapes, ours_to_gguf

T = gguf.GGMLQuantizationType

# Hyper-parameters of public models (their Hugging Face config.json), plus `tiny` and `wide` for CI.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=4,
                 vocab_size=4096, rope_theta=10000.0, max_position=1024, rms_norm_eps=1e-5),
    # CI: the 1.1B model's width (where XLA:CPU's reductions of one row differ from several) in two layers
    "wide": dict(hidden_size=2048, intermediate_size=512, num_layers=2, num_heads=16, num_kv_heads=4,
                 vocab_size=4096, rope_theta=10000.0, max_position=1024, rms_norm_eps=1e-5),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                           vocab_size=32000, rope_theta=10000.0, max_position=2048, rms_norm_eps=1e-5),
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                       vocab_size=32000, rope_theta=10000.0, max_position=4096, rms_norm_eps=1e-5),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       vocab_size=128256, rope_theta=500000.0, max_position=8192, rms_norm_eps=1e-5),
}

# qtype -> (matrix type, output.weight type, GGUF general.file_type)
QTYPES: dict[str, tuple[T, T, gguf.LlamaFileType]] = {
    "F16": (T.F16, T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (T.BF16, T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (T.Q8_0, T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q6_K": (T.Q6_K, T.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
    "Q4_0": (T.Q4_0, T.Q6_K, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q4_K": (T.Q4_K, T.Q6_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": (T.Q4_K, T.Q6_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
}

# Scale fields written into every block (float16, normal numbers: XLA:CPU flushes subnormals). With the
# random quants each type then holds values of RMS about 0.02, like a trained model's weights.
Q8_0_D = 2.5e-4  # x = d * int8                  -> RMS ~ 74 d
Q4_0_D = 4e-3  # x = d * (q - 8), q in 0..15      -> RMS ~ 4.6 d
Q4_K_D = 1e-4  # x = d * sc * q - dmin * m, 6-bit sc and m, q in 0..15
Q4_K_DMIN = 7.5e-4  # 7.5 d: the mean of d*sc*q over the mean of m, so values centre on zero
Q6_K_D = 1.2e-4  # x = d * scale * (q - 32), q in 0..63, scales drawn in -16..15 -> RMS ~ 170 d
Q6_K_SCALE_RANGE = 16
# F16/BF16: random sign and mantissa, exponent 2^-7 or 2^-6, so |x| in [2^-7, 2^-5).
F16_EXPONENTS = (8, 9)  # biased by 15
BF16_EXPONENTS = (120, 121)  # biased by 127

_CHUNK_BYTES = 64 << 20  # random bytes are generated and patched this much at a time


def shape_config(shape: str) -> ModelConfig:
    """The `ModelConfig` of a named shape."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    s = SHAPES[shape]
    return ModelConfig(architecture="llama", head_dim=s["hidden_size"] // s["num_heads"], **s)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the layers Q4_K_M stores attn_v and ffn_down at Q6_K."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_plan(config: ModelConfig, qtype: str) -> list[tuple[str, tuple[int, ...], T]]:
    """(GGUF name, shape `[rows, cols]` or `[n]`, GGML type) of every tensor, in file order."""
    if qtype not in QTYPES:
        raise ValueError(f"unsupported qtype {qtype!r}; choose one of {', '.join(QTYPES)}")
    matrix_type, output_type, _ = QTYPES[qtype]
    names = ours_to_gguf(config.num_layers)
    plan = []
    for ours, shape in expected_shapes(config).items():
        if len(shape) == 1:
            tensor_type = T.F32
        elif ours == "lm_head":
            tensor_type = output_type
        elif qtype == "Q4_K_M" and ours.rsplit(".", 1)[-1] in ("v", "down") and use_more_bits(
                int(ours.split(".")[1]), config.num_layers):
            tensor_type = T.Q6_K
        else:
            tensor_type = matrix_type
        if tensor_type != T.F32:
            tensor_type = fallback_type(tensor_type, shape[-1])
        plan.append((names[ours], shape, tensor_type))
    return plan


def make_gguf(shape: str, qtype: str, out_path: str | Path, seed: int = 0,
              progress: Callable[[str], None] | None = None, attention_scale: float = 1.0) -> Path:
    """Write a random-weight model of `shape` at `qtype` to `out_path` (atomically) and return the path.

    `progress(line)` gets a line per layer; None prints nothing. `attention_scale` multiplies every
    `attn_output` matrix (its blocks' scale fields): well below 1, attention barely moves the residual
    stream, so the next token depends mainly on the current one and the model repeats text it wrote before,
    a stand-in for a trained model quoting its prompt (benchmarks/bench_speculative.py). Same bytes, same cost.
    """
    qtype = qtype.upper()
    config = shape_config(shape)
    plan = tensor_plan(config, qtype)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.SFC64(seed))
    total = sum(_nbytes(s, t) for _, s, t in plan)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, config.architecture)
        try:
            _add_metadata(writer, config, int(QTYPES[qtype][2]), f"random-{shape}-{qtype}")
            with tempfile.TemporaryDirectory() as vocab_dir:
                add_vocab(writer, write_vocab_folder(Path(vocab_dir), config.vocab_size, config.max_position))
            writer.add_chat_template(CHAT_TEMPLATE)
            for name, tensor_shape, tensor_type in plan:
                writer.add_tensor_info(name, tensor_shape, np.dtype(np.float32), _nbytes(tensor_shape, tensor_type),
                                       raw_dtype=tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            start, written = time.perf_counter(), 0
            for name, tensor_shape, tensor_type in plan:
                data = random_tensor(tensor_shape, tensor_type, rng)
                if attention_scale != 1.0 and name.endswith("attn_output.weight"):
                    scale_blocks(data, tensor_type, attention_scale)
                writer.write_tensor_data(data)
                written += data.nbytes
                del data
                if progress is not None and (name.endswith("ffn_down.weight") or not name.startswith("blk.")):
                    elapsed = time.perf_counter() - start
                    progress(f"{name:28s} {written / 1e9:7.2f} / {total / 1e9:.2f} GB  "
                             f"{written / 1e6 / max(elapsed, 1e-9):6.0f} MB/s")
        finally:
            writer.close()

    atomic_write(out_path, write)
    return out_path


def write_vocab_folder(folder: Path, vocab_size: int, max_position: int) -> Path:
    """A Hugging Face tokenizer folder: the demo tokenizer, `config.json` asking for `vocab_size` ids.

    `inferflux.convert.gguf_vocab.add_vocab` pads the token list with unused `[PADn]` tokens up to that size,
    as it does for a real model whose embedding is larger than its tokenizer.
    """
    tokenizer = train_tokenizer()
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the demo tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_position,
    }))
    (folder / "config.json").write_text(json.dumps({
        "vocab_size": vocab_size, "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
    }))
    return folder


# --- random blocks -------------------------------------------------------------------------------


def random_tensor(shape: tuple[int, ...], qtype: T, rng: np.random.Generator) -> np.ndarray:
    """The file bytes of a random tensor: F32 ones for vectors, random blocks with small scales otherwise.

    Returns uint8 `[rows, bytes_per_row]` for matrices (what `GGUFWriter.write_tensor_data` takes).
    """
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    rows, cols = shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = cols // block_size * type_size
    out = np.empty((rows, row_bytes), np.uint8)
    flat = out.reshape(-1)
    # Whole rows per chunk, so a chunk is whole blocks.
    rows_per_chunk = max(1, _CHUNK_BYTES // row_bytes)
    for first in range(0, rows, rows_per_chunk):
        chunk = flat[first * row_bytes:min(rows, first + rows_per_chunk) * row_bytes]
        _fill_random(chunk, rng)
        _PATCH[qtype](chunk.reshape(-1, type_size) if block_size > 1 else chunk)
    return out


def _fill_random(buf: np.ndarray, rng: np.random.Generator) -> None:
    """Uniform random bytes into `buf` (uint8, 1-D), 8 at a time (about 3 GB/s)."""
    words = -(-buf.size // 8)
    raw = rng.integers(0, np.iinfo(np.uint64).max, size=words, dtype=np.uint64, endpoint=True).view(np.uint8)
    buf[:] = raw[:buf.size]


def _f16_bytes(value: float) -> np.ndarray:
    return np.array([value], np.float16).view(np.uint8)


def _patch_float(buf: np.ndarray, exponents: tuple[int, int], mantissa_bits: int) -> None:
    """Random 16-bit floats -> keep sign and mantissa, exponent one of two small values (never Inf/NaN)."""
    bits = buf.view(np.uint16)
    exp = bits >> np.uint16(mantissa_bits)
    exp &= np.uint16(exponents[1] - exponents[0])  # one random bit (the two exponents differ by one)
    exp += np.uint16(exponents[0])
    exp <<= np.uint16(mantissa_bits)
    bits &= np.uint16(0x8000 | ((1 << mantissa_bits) - 1))
    bits |= exp


def _patch_q8_0(blocks: np.ndarray) -> None:  # [n, 34]: f16 d, 32 int8
    blocks[:, 0:2] = _f16_bytes(Q8_0_D)


def _patch_q4_0(blocks: np.ndarray) -> None:  # [n, 18]: f16 d, 16 bytes of nibbles
    # d * (q - 8) averages -d/2; a random sign on d keeps the matrix centred on zero.
    sign = blocks[:, 1] & np.uint8(0x80)
    blocks[:, 0:2] = _f16_bytes(Q4_0_D)
    blocks[:, 1] |= sign


def _patch_q4_k(blocks: np.ndarray) -> None:  # [n, 144]: f16 d, f16 dmin, 12 bytes 6-bit scales/mins, 128 qs
    blocks[:, 0:2] = _f16_bytes(Q4_K_D)
    blocks[:, 2:4] = _f16_bytes(Q4_K_DMIN)


def _patch_q6_k(blocks: np.ndarray) -> None:  # [n, 210]: 128 ql, 64 qh, 16 int8 scales, f16 d
    scales = blocks[:, 192:208]
    scales &= np.uint8(2 * Q6_K_SCALE_RANGE - 1)
    scales.view(np.int8)[...] -= np.int8(Q6_K_SCALE_RANGE)  # -16..15
    blocks[:, 208:210] = _f16_bytes(Q6_K_D)


# Byte offsets of each block's f16 scale fields: scaling them scales the dequantized values exactly as much.
_SCALE_FIELDS: dict[T, tuple[int, ...]] = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_K: (0, 2), T.Q6_K: (208,)}


def scale_blocks(data: np.ndarray, qtype: T, factor: float) -> None:
    """Multiply a tensor's values (the bytes `random_tensor` returns) by `factor`, in place."""
    if qtype == T.F16:
        data.view(np.float16)[...] *= np.float16(factor)
        return
    if qtype not in _SCALE_FIELDS:
        raise ValueError(f"cannot scale a {qtype.name} tensor")
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = data.reshape(-1, type_size)
    for offset in _SCALE_FIELDS[qtype]:
        field = np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16)
        blocks[:, offset:offset + 2] = (field * np.float16(factor)).view(np.uint8)


_PATCH: dict[T, Callable[[np.ndarray], None]] = {
    T.F16: lambda buf: _patch_float(buf, F16_EXPONENTS, 10),
    T.BF16: lambda buf: _patch_float(buf, BF16_EXPONENTS, 7),
    T.Q8_0: _patch_q8_0,
    T.Q4_0: _patch_q4_0,
    T.Q4_K: _patch_q4_k,
    T.Q6_K: _patch_q6_k,
}


# --- checking ------------------------------------------------------------------------------------


def tensor_stats(path: str | Path, names: list[str] | None = None) -> Iterator[dict]:
    """Per tensor (all, or `names`): type and statistics of its values dequantized by `gguf.quants`."""
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if names is not None and tensor.name not in names:
            continue
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        yield {
            "name": tensor.name, "type": tensor.tensor_type.name,
            "finite": bool(np.isfinite(values).all()),
            "max_abs": float(np.abs(values).max()), "rms": float(np.sqrt(np.mean(values.astype(np.float64) ** 2))),
            "mean": float(values.mean(dtype=np.float64)),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--qtype", required=True, type=str.upper, choices=sorted(QTYPES))
    parser.add_argument("--out", required=True, type=Path, help="GGUF file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention-scale", type=float, default=1.0,
                        help="multiply every attn_output matrix by this (see make_gguf): below 1, the model "
                             "repeats its own text")
    parser.add_argument("--check", action="store_true",
                        help="afterwards, dequantize every tensor with gguf.quants and print its statistics")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = make_gguf(args.shape, args.qtype, args.out, args.seed, progress=lambda line: print(line, flush=True),
                     attention_scale=args.attention_scale)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
    if args.check:
        bad = 0
        for stats in tensor_stats(path):
            print(f"{stats['name']:28s} {stats['type']:5s} rms {stats['rms']:.4f} max {stats['max_abs']:.4f}")
            bad += not stats["finite"]
        if bad:
            print(f"{bad} tensors hold non-finite values", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
