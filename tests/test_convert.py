"""The safetensors -> GGUF converter, judged by llama.cpp and transformers."""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp  # noqa: E402 - the reference implementation is a hard test dependency
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from inferflux.convert.hf_to_gguf import OUTPUT_TYPES, convert_hf_to_gguf
from inferflux.formats.gguf_file import GGUFFile
from inferflux.formats.hf_folder import SafetensorsFolder

PROMPT_IDS = [5, 17, 42, 99, 7, 230, 64, 3, 150, 11]
NEW_TOKENS = 32


def _hf_greedy(folder: Path, prompt: list[int], steps: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _llama_cpp_greedy(path: Path, prompt: list[int], steps: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=64, verbose=False)
    tokens = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == steps:
            break
    llm.close()
    return tokens


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("out_type", ["F32", "F16"])
def test_llama_cpp_greedy_equals_transformers(tiny_model, tiny_gguf, name: str, out_type: str) -> None:
    """A file we write runs in llama.cpp and continues a prompt exactly as transformers does."""
    expected = _hf_greedy(tiny_model(name), PROMPT_IDS, NEW_TOKENS)
    got = _llama_cpp_greedy(tiny_gguf(name, out_type), PROMPT_IDS, NEW_TOKENS)
    assert got == expected


@pytest.mark.parametrize("out_type", sorted(OUTPUT_TYPES))
def test_every_type_loads_in_llama_cpp(tiny_model, tiny_gguf, out_type: str) -> None:
    """Each output type is what llama.cpp expects (it loads and runs) and decodes near the source."""
    path = tiny_gguf("llama-q", out_type)
    file = GGUFFile(path)
    expected = gguf.GGMLQuantizationType[out_type]
    source = SafetensorsFolder(tiny_model("llama-q"))
    down = file.tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == expected
    assert file.tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    values = gguf.quants.dequantize(down.data, down.tensor_type)
    reference = np.asarray(source.read("model.layers.0.mlp.down_proj.weight"), np.float32)
    error = np.sqrt(np.mean((values - reference) ** 2)) / np.sqrt(np.mean(reference**2))
    assert error < {"F32": 1e-7, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.03,
                    "Q4_K": 0.1, "Q4_0": 0.12}[out_type]
    assert len(_llama_cpp_greedy(path, PROMPT_IDS, 4)) == 4


def test_metadata_tokenizer_and_template_embedded(tiny_model, tiny_gguf) -> None:
    from inferflux.formats.chat_template import template_from_hf_dir

    file = GGUFFile(tiny_gguf("qwen2", "F16"))
    meta = file.metadata
    assert meta["general.architecture"] == "qwen2"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == template_from_hf_dir(tiny_model("qwen2"))
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert "output.weight" not in file.tensors  # tied embeddings are not duplicated


def test_llama3_rope_scaling_written_as_rope_freqs(tiny_gguf) -> None:
    file = GGUFFile(tiny_gguf("llama", "F32"))
    assert "rope_freqs.weight" in file.tensors
    factors = np.asarray(file.tensors["rope_freqs.weight"].data)
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)


def test_small_rows_fall_back_like_llama_cpp(tiny_gguf) -> None:
    """hidden=64 does not split into 256-wide K-quant blocks: llama.cpp's fallback type is used."""
    file = GGUFFile(tiny_gguf("llama", "Q4_K"))
    assert file.tensors["blk.0.attn_q.weight"].tensor_type != gguf.GGMLQuantizationType.Q4_K
    assert len(_llama_cpp_greedy(file.path, PROMPT_IDS, 4)) == 4


def test_bad_type_and_failed_conversion_leave_nothing(tiny_model, tmp_path: Path) -> None:
    dst = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="unsupported output type"):
        convert_hf_to_gguf(tiny_model("llama"), dst, "Q3_XL")
    assert not dst.exists() and not list(tmp_path.iterdir())
