"""Model config and weight loading from safetensors folders and GGUF files, and their errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from inferflux.errors import ModelFormatError
from inferflux.formats.gguf_file import GGUFFile, load_gguf_weights
from inferflux.formats.hf_folder import load_hf_weights
from inferflux.formats.loader import load_model
from inferflux.formats.model_config import ModelConfig
from inferflux.formats.weights import QuantizedWeight, hf_to_ours

MODELS = ["llama", "mistral", "qwen2"]


def _hf_state(folder: Path, num_layers: int) -> dict[str, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    names = hf_to_ours(num_layers)
    return {names[k]: v.numpy() for k, v in model.state_dict().items() if k in names}


@pytest.mark.parametrize("name", MODELS)
def test_hf_config_matches_transformers(tiny_model, name: str) -> None:
    folder = tiny_model(name)
    config = ModelConfig.from_hf_dir(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    hf = model.config
    assert config.num_layers == hf.num_hidden_layers
    assert config.num_heads == hf.num_attention_heads
    assert config.num_kv_heads == hf.num_key_value_heads
    assert config.vocab_size == hf.vocab_size
    assert config.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert config.tie_word_embeddings == (name == "qwen2")
    assert config.qkv_bias == (name == "qwen2")
    # Our rotary frequencies equal the ones transformers uses (llama3 scaling on the llama model).
    inv_freq = model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(config.rope_inv_freq(), inv_freq, rtol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_safetensors_weights_match_transformers(tiny_model, name: str) -> None:
    folder = tiny_model(name)
    config = ModelConfig.from_hf_dir(folder)
    weights = load_hf_weights(folder, config)
    reference = _hf_state(folder, config.num_layers)
    if config.tie_word_embeddings:  # transformers lists the tied head; the file stores it once
        np.testing.assert_array_equal(reference.pop("lm_head"), reference["embed"])
    assert set(weights) == set(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(np.asarray(weights[key], np.float32), value, err_msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_gguf_config_and_weights_equal_source(tiny_model, tiny_gguf, name: str) -> None:
    """An F32 GGUF written by our converter loads back into exactly the source parameters.

    This checks the name mapping and that the llama Q/K row permutation is undone.
    """
    folder = tiny_model(name)
    hf_config = ModelConfig.from_hf_dir(folder)
    file = GGUFFile(tiny_gguf(name, "F32"))
    config = file.model_config()
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position", "tie_word_embeddings", "qkv_bias", "o_bias"):
        assert getattr(config, field) == getattr(hf_config, field), field
    assert config.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps)
    assert config.rope_theta == pytest.approx(hf_config.rope_theta)
    np.testing.assert_allclose(config.rope_inv_freq(), hf_config.rope_inv_freq(), rtol=1e-6)
    weights = load_gguf_weights(file, config)
    reference = _hf_state(folder, config.num_layers)
    assert set(weights) == set(reference) - ({"lm_head"} if config.tie_word_embeddings else set())
    for key, value in weights.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_gguf_f16_and_quantized_weights(tiny_model, tiny_gguf) -> None:
    """F16 tensors are the f16-rounded source; quantized ones stay packed, rows unpermuted."""
    import gguf

    folder = tiny_model("llama-q")
    reference = _hf_state(folder, 2)
    f16 = GGUFFile(tiny_gguf("llama-q", "F16"))
    weights = load_gguf_weights(f16, f16.model_config())
    np.testing.assert_array_equal(weights["layers.1.q"], reference["layers.1.q"].astype(np.float16))
    q8 = GGUFFile(tiny_gguf("llama-q", "Q8_0"))
    weights = load_gguf_weights(q8, q8.model_config())
    q = weights["layers.0.k"]
    assert isinstance(q, QuantizedWeight) and q.qtype == gguf.GGMLQuantizationType.Q8_0
    dequant = gguf.quants.dequantize(q.raw, q.qtype).reshape(q.shape)
    # Q8_0 error is at most half a step of each block's scale: far below the weights' std of 0.15.
    assert np.max(np.abs(dequant - reference["layers.0.k"])) < 0.01
    assert weights["layers.0.attn_norm"].dtype == np.float32  # 1-D tensors stay F32


def test_load_model_both_formats(tiny_model, tiny_gguf) -> None:
    from_hf = load_model(tiny_model("qwen2"))
    from_gguf = load_model(tiny_gguf("qwen2", "F32"))
    assert from_hf.format == "safetensors" and from_gguf.format == "gguf"
    assert from_hf.config.num_layers == from_gguf.config.num_layers
    assert from_hf.chat_template.source == from_gguf.chat_template.source
    text = "Hello world, 你好!"
    assert from_hf.tokenizer.encode(text) == from_gguf.tokenizer.encode(text)


# --- errors: one clear ModelFormatError naming the file, never a library traceback ---


def test_truncated_gguf(tiny_gguf, tmp_path: Path) -> None:
    source = tiny_gguf("llama", "F32")
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ModelFormatError) as info:
        load_model(broken)
    assert str(broken) in str(info.value)
    assert "truncated" in str(info.value)


def test_header_only_gguf_fragment(tiny_gguf, tmp_path: Path) -> None:
    """Cut inside the metadata: the reader itself fails, we still say which file."""
    broken = tmp_path / "cut.gguf"
    broken.write_bytes(tiny_gguf("llama", "F32").read_bytes()[:300])
    with pytest.raises(ModelFormatError) as info:
        load_model(broken)
    assert str(broken) in str(info.value)


def test_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + bytes(1024))
    with pytest.raises(ModelFormatError) as info:
        load_model(bad)
    assert str(bad) in str(info.value) and "GGUF" in str(info.value)


def _sharded_copy(folder: Path, out: Path) -> Path:
    """Re-save a model folder as two shards with an index, as large checkpoints come."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(folder, out)
    tensors = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, out / shard)
        weight_map.update({n: shard for n in members})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_sharded_folder_loads_and_missing_shard_is_named(tiny_model, tmp_path: Path) -> None:
    folder = _sharded_copy(tiny_model("mistral"), tmp_path / "sharded")
    config = ModelConfig.from_hf_dir(folder)
    sharded = load_hf_weights(folder, config)
    single = load_hf_weights(tiny_model("mistral"), config)
    for key in single:
        np.testing.assert_array_equal(sharded[key], single[key])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError) as info:
        load_model(folder)
    assert "model-00002-of-00002.safetensors" in str(info.value)


def test_corrupt_safetensors_and_bad_config(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model("qwen2"), folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelFormatError) as info:
        load_model(folder)
    assert "model.safetensors" in str(info.value)
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ModelFormatError) as info:
        load_model(folder)
    assert "config.json" in str(info.value) and "GPTNeoXForCausalLM" in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no such file"):
        load_model(tmp_path / "nope.gguf")


def test_open_gguf_parses_a_file_once_until_it_changes(tiny_gguf, tmp_path: Path) -> None:
    """describe and load share one parse of an unchanged file (formats/gguf_file.py open_gguf); a rewritten
    file (a new size or mtime) is parsed again, so nothing stale is served."""
    import os
    import shutil

    from inferflux.formats.gguf_file import open_gguf

    path = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf("llama", "F32"), path)
    first = open_gguf(path)
    assert open_gguf(str(path)) is first
    shutil.copy(tiny_gguf("llama", "Q8_0"), path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    second = open_gguf(path)
    assert second is not first
    assert {int(t.tensor_type) for t in second.tensors.values()} != {int(t.tensor_type) for t in first.tensors.values()}
    with pytest.raises(ModelFormatError):
        open_gguf(tmp_path / "missing.gguf")


def test_cached_gguf_header_equals_a_fresh_parse(tiny_gguf, tmp_path: Path) -> None:
    """A restart reads the header from $INFERFLUX_HOME/cache/gguf (formats/gguf_header_cache.py), not through
    gguf-py's parser: the metadata, the tensor table, every tensor's bytes and the loaded model (tokenizer,
    config, weights) are the same as a fresh parse's; a rewritten file and a torn entry are parsed again."""
    import os

    from inferflux.formats import gguf_header_cache

    path = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf("llama", "Q4_K"), path)
    fresh = GGUFFile(path)
    cache = tmp_path / "cache"
    gguf_header_cache.set_directory(cache)
    try:
        GGUFFile(path)  # parses and stores
        (entry,) = cache.glob("*.json")
        cached = GGUFFile(path)
        assert cached._values is not None  # really from the cache
        assert cached.metadata == fresh.metadata and list(cached.metadata) == list(fresh.metadata)
        assert cached.tensors.keys() == fresh.tensors.keys()
        for name, ours in cached.tensors.items():
            theirs = fresh.tensors[name]
            assert (ours.name, ours.tensor_type, ours.n_elements, ours.n_bytes, ours.data_offset) == (
                theirs.name, theirs.tensor_type, theirs.n_elements, theirs.n_bytes, theirs.data_offset)
            assert ours.shape.tolist() == theirs.shape.tolist() and ours.shape.dtype == theirs.shape.dtype
            assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
            np.testing.assert_array_equal(ours.data, theirs.data)
        config = cached.model_config()
        assert config == fresh.model_config()
        expected = load_gguf_weights(fresh, config)
        for name, weight in load_gguf_weights(cached, config).items():
            np.testing.assert_array_equal(np.asarray(getattr(weight, "raw", weight)),
                                          np.asarray(getattr(expected[name], "raw", expected[name])))
        from inferflux.formats.tokenizer import Tokenizer
        text = "Hello world, the cache"
        assert Tokenizer.from_gguf(cached).encode(text) == Tokenizer.from_gguf(fresh).encode(text)

        entry.write_text(entry.read_text()[:100])  # torn: ignored, parsed again and rewritten
        again = GGUFFile(path)
        assert again._values is None and again.metadata == fresh.metadata
        assert GGUFFile(path)._values is not None

        shutil.copy(tiny_gguf("llama", "Q8_0"), path)  # rewritten: a new key, so the old entry is not used
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
        changed = GGUFFile(path)
        assert changed._values is None
        assert {int(t.tensor_type) for t in changed.tensors.values()} != {
            int(t.tensor_type) for t in fresh.tensors.values()}
    finally:
        gguf_header_cache.set_directory(None)
