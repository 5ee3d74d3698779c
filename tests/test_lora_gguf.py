"""GGUF LoRA adapters (llama.cpp's format): our PEFT -> GGUF converter judged by llama.cpp itself, and the runtime
loading the files: llama-cpp-python on the GGUF base + GGUF LoRA, InferFlux on the same two files, and
transformers on the PEFT-merged weights all give the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp  # the reference implementation is a hard test dependency
import numpy as np
import pytest
import torch

from inferflux import LLM
from inferflux.engine.lora import LoraError, read_adapter, read_peft
from inferflux.errors import ModelFormatError
from inferflux.formats.gguf_lora import convert_peft_to_gguf, read_gguf_lora
from inferflux.formats.model_config import ModelConfig
from tests.test_lora import ADAPTERS, PROMPT, RUNTIME, STEPS, greedy, hf_greedy, make_adapter, merged


def llama_cpp_greedy(model: Path, lora: Path | None) -> list[int]:
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=128, n_threads=2, n_batch=64, verbose=False, **kwargs)
    tokens = []
    for token in llm.generate(PROMPT, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == STEPS:
            break
    llm.close()
    return tokens


def assert_same_greedy(reference: torch.nn.Module, got: list[int], expected: list[int]) -> None:
    """`got` equals transformers' greedy `expected`, except past a genuine near-tie: where they first differ, the
    reference's two best logits must be within 1e-3 of each other and `got` must have taken the runner-up (the
    random tiny models do hit such ties; a wrong scale or layout diverges early and by far)."""
    if got == expected:
        return
    step = next(i for i, (x, y) in enumerate(zip(got, expected, strict=True)) if x != y)
    with torch.no_grad():
        logits = reference(torch.tensor([PROMPT + expected[:step]])).logits[0, -1]
    top = torch.topk(logits, 2)
    assert step >= 8 and top.indices[1].item() == got[step] and top.values[0] - top.values[1] < 1e-3, (
        f"diverged at step {step}: {got} != {expected}, margin {float(top.values[0] - top.values[1])}")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def files(request, tiny_model, tiny_gguf, tmp_path_factory):
    """The base (HF folder and GGUF), two PEFT adapters (a2 is rsLoRA), their GGUF forms and the references."""
    base = tiny_model(request.param)
    root = tmp_path_factory.mktemp(f"gguf-lora-{request.param}")
    peft = {name: make_adapter(base, root / name, *ADAPTERS[name]) for name in ("a1", "a2")}
    ggufs = {name: convert_peft_to_gguf(path, base, root / f"{name}.gguf") for name, path in peft.items()}
    models = {name: merged(base, [(path, 1.0)]) for name, path in peft.items()}
    refs = {name: (models[name], hf_greedy(models[name])) for name in peft}
    base_gguf = tiny_gguf(request.param, "F32")
    llm = LLM(base_gguf, **RUNTIME)
    for name in ("a1", "a2"):
        llm.load_lora(name, ggufs[name])
    llm.load_lora("peft-a1", peft["a1"])
    return base, base_gguf, peft, ggufs, refs, llm


def test_llama_cpp_and_inferflux_agree_with_transformers(files) -> None:
    base, base_gguf, peft, ggufs, refs, llm = files
    for name in ("a1", "a2"):
        model, expected = refs[name]
        assert expected != hf_greedy(merged(base, []))  # the adapter really changes the output
        assert_same_greedy(model, llama_cpp_greedy(base_gguf, ggufs[name]), expected)
        assert_same_greedy(model, llm.generate([PROMPT], greedy([(name, 1.0)]))[0].outputs[0].token_ids, expected)
    assert llm.generate([PROMPT], greedy())[0].outputs[0].token_ids == llama_cpp_greedy(base_gguf, None)


def test_gguf_and_peft_forms_load_identically(files) -> None:
    """The GGUF file reads back to PEFT's matrices (Q/K un-permuted); a batch mixing both forms gives the same
    tokens for each."""
    base, _, peft, ggufs, refs, llm = files
    config = ModelConfig.from_hf_dir(base)
    for name in ("a1", "a2"):
        ours, theirs = read_adapter(ggufs[name], config, 8), read_peft(peft[name], config, 8)
        assert ours.tensors.keys() == theirs.tensors.keys()
        for key, (a, b) in theirs.tensors.items():
            np.testing.assert_allclose(ours.tensors[key][0], a, rtol=0, atol=0)
            np.testing.assert_allclose(ours.tensors[key][1], b, rtol=1e-6, atol=1e-7)
    outs = llm.generate([PROMPT] * 2, [greedy([("peft-a1", 1.0)]), greedy([("a1", 1.0)])])
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert_same_greedy(refs["a1"][0], outs[0].outputs[0].token_ids, refs["a1"][1])


def test_file_layout_is_llama_cpps(files, tmp_path) -> None:
    """The metadata and tensor names llama.cpp's convert_lora_to_gguf.py writes; F16, BF16 and Q8_0 load in
    llama.cpp."""
    base, base_gguf, peft, ggufs, *_ = files
    reader = gguf.GGUFReader(ggufs["a1"])
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    names = {t.name: t for t in reader.tensors}
    a, b = names["blk.0.attn_q.weight.lora_a"], names["blk.0.attn_q.weight.lora_b"]
    hidden = ModelConfig.from_hf_dir(base).hidden_size
    assert a.shape.tolist() == [hidden, 4] and b.shape.tolist()[0] == 4  # GGML dims: a [in, r], b [r, out]
    for out_type in ("F16", "BF16", "Q8_0"):
        path = convert_peft_to_gguf(peft["a1"], base, tmp_path / f"a1-{out_type}.gguf", out_type)
        assert len(llama_cpp_greedy(base_gguf, path)) == STEPS
        lora = read_gguf_lora(path)
        exact = read_gguf_lora(ggufs["a1"])
        for key, (a32, b32) in exact.tensors.items():
            np.testing.assert_allclose(lora.tensors[key][0], a32, atol=0.02 * np.abs(a32).max())
            np.testing.assert_allclose(lora.tensors[key][1], b32, atol=0.02 * np.abs(b32).max())


def test_mismatched_or_wrong_files_are_clear_errors(files, tiny_model, tiny_gguf, tmp_path) -> None:
    base, base_gguf, peft, ggufs, *_ = files
    config = ModelConfig.from_hf_dir(base)
    with pytest.raises(LoraError, match="not a GGUF LoRA adapter"):
        read_adapter(base_gguf, config, 8)  # a model file, not an adapter
    other = "qwen2" if config.architecture == "llama" else "llama"
    other_base = tiny_model(other)
    foreign = convert_peft_to_gguf(make_adapter(other_base, tmp_path / "o", 4, 8, ["v_proj"], False, 9), other_base,
                                   tmp_path / "other.gguf")
    with pytest.raises(LoraError, match="not an adapter of this base model"):
        read_adapter(foreign, config, 8)
    with pytest.raises(LoraError, match="rank 8 is outside 1..4"):
        read_adapter(ggufs["a2"], config, 4)
    with pytest.raises(ValueError, match="unknown GGUF LoRA type"):
        convert_peft_to_gguf(peft["a1"], base, tmp_path / "x.gguf", "Q4_K")
    with pytest.raises(ModelFormatError, match="not a PEFT adapter folder"):
        convert_peft_to_gguf(tmp_path, base, tmp_path / "y.gguf")
