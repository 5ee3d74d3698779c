"""llama.cpp's own `convert_lora_to_gguf.py` on a PEFT adapter of the tiny Llama: InferFlux loading that file (on
the GGUF base and on the HF base) gives transformers' greedy tokens on the PEFT-merged weights, and the same tokens
and matrices as our converter's file (`formats.gguf_lora.convert_peft_to_gguf`). The converter is not on PyPI as a
package; it ships in the llama-cpp-python sdist (vendor/llama.cpp), which this test downloads for the installed
version so the converter matches the llama.cpp the other GGUF LoRA tests run."""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from inferflux import LLM
from inferflux.formats.gguf_lora import convert_peft_to_gguf, read_gguf_lora
from tests.test_lora import ADAPTERS, PROMPT, RUNTIME, greedy, hf_greedy, make_adapter, merged
from tests.test_lora_gguf import assert_same_greedy, llama_cpp_greedy

# What pip prints when no package index can be reached (then skip: CI has the registry); any other failure fails.
NO_REGISTRY = re.compile(r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
                         r"Name or service not known|Failed to establish a new connection|ConnectTimeout|"
                         r"ProxyError|Connection refused|No route to host|"
                         r"\(from versions: none\)")  # every index unreachable: PyPI does list this package
# The parts of vendor/llama.cpp the two converter scripts import (convert_hf_to_gguf.py imports `conversion/`).
WANTED = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


@pytest.fixture(scope="session")
def llamacpp_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vendor/llama.cpp's converter scripts, `conversion/` and `gguf-py/` from the installed version's sdist."""
    version = importlib.metadata.version("llama-cpp-python")
    download = tmp_path_factory.mktemp("llama-cpp-python-sdist")
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "--disable-pip-version-check", "--timeout", "60", "--retries", "2",
                               f"llama-cpp-python=={version}", "-d", str(download)],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"no package registry answered within 600 s for the llama-cpp-python {version} sdist")
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if found := NO_REGISTRY.search(output):
            pytest.skip(f"no package registry reachable for the llama-cpp-python {version} sdist: {found.group(0)}")
        pytest.fail(f"pip download of the llama-cpp-python {version} sdist failed:\n{output[-3000:]}")
    (sdist,) = download.glob("llama_cpp_python-*.tar.gz")
    root = tmp_path_factory.mktemp("llama.cpp")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else ""
            if member.isfile() and (rel in WANTED[:2] or rel.startswith(WANTED[2:])):
                member.name = rel
                members.append(member)
        tar.extractall(root, members=members, filter="data")
    assert (root / "convert_lora_to_gguf.py").is_file() and (root / "gguf-py" / "gguf" / "__init__.py").is_file()
    return root


def llamacpp_convert(tree: Path, peft: Path, base: Path, out: Path) -> Path:
    """Run llama.cpp's converter as its README says, on its own gguf-py (not the pip `gguf` we write with)."""
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", str(base),
                           "--outtype", "f32", "--outfile", str(out), str(peft)],
                          capture_output=True, text=True, env=env, cwd=tree, timeout=600)
    assert proc.returncode == 0 and out.is_file(), f"llama.cpp's convert_lora_to_gguf.py failed:\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def files(llamacpp_tree, tiny_model, tiny_gguf, tmp_path_factory):
    """The tiny Llama (HF folder, GGUF), adapter a1 (every target) in PEFT form, llama.cpp's and our GGUF form."""
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("lora-llamacpp-converter")
    peft = make_adapter(base, root / "a1", *ADAPTERS["a1"])
    theirs = llamacpp_convert(llamacpp_tree, peft, base, root / "a1-llamacpp.gguf")
    ours = convert_peft_to_gguf(peft, base, root / "a1-ours.gguf")
    return base, tiny_gguf("llama", "F32"), peft, theirs, ours


def test_llamacpp_converter_file_gives_transformers_tokens(files) -> None:
    base, base_gguf, peft, theirs, ours = files
    model = merged(base, [(peft, 1.0)])
    expected = hf_greedy(model)
    assert expected != hf_greedy(merged(base, []))  # the adapter really changes the output
    for base_path in (base_gguf, base):  # the GGUF base and the HF folder
        llm = LLM(base_path, **RUNTIME)
        llm.load_lora("theirs", theirs)
        llm.load_lora("ours", ours)
        outs = llm.generate([PROMPT] * 2, [greedy([("theirs", 1.0)]), greedy([("ours", 1.0)])])
        got_theirs, got_ours = (out.outputs[0].token_ids for out in outs)
        assert got_theirs == got_ours, f"{base_path}: llama.cpp's file {got_theirs} != ours {got_ours}"
        assert_same_greedy(model, got_theirs, expected)
        del llm
    assert_same_greedy(model, llama_cpp_greedy(base_gguf, theirs), expected)  # and llama.cpp itself agrees


def test_llamacpp_converter_file_has_our_matrices(files) -> None:
    """Same metadata, tensor names, shapes and values (bit-exact at F32) as our converter's file."""
    _, _, _, theirs, ours = files
    a, b = read_gguf_lora(theirs), read_gguf_lora(ours)
    assert a.alpha == pytest.approx(b.alpha) and a.tensors.keys() == b.tensors.keys() and len(a.tensors) > 0
    for key, (lora_a, lora_b) in b.tensors.items():
        np.testing.assert_array_equal(a.tensors[key][0], lora_a)
        np.testing.assert_array_equal(a.tensors[key][1], lora_b)
    names = {t.name: t.shape.tolist() for t in gguf.GGUFReader(theirs).tensors}
    assert names == {t.name: t.shape.tolist() for t in gguf.GGUFReader(ours).tensors}


def test_llamacpp_converter_ignores_rslora(llamacpp_tree, tiny_model, tmp_path) -> None:
    """The one documented difference (docs/adapters.md): for an rsLoRA adapter llama.cpp stores plain `alpha`
    (so it applies alpha / r, not PEFT's alpha / sqrt(r)); ours stores alpha * sqrt(r). If this fails, llama.cpp
    has learnt rsLoRA and the docs and our writer should follow."""
    base = tiny_model("llama")
    r, alpha = ADAPTERS["a2"][:2]
    peft = make_adapter(base, tmp_path / "a2", *ADAPTERS["a2"])
    theirs = read_gguf_lora(llamacpp_convert(llamacpp_tree, peft, base, tmp_path / "a2-llamacpp.gguf"))
    ours = read_gguf_lora(convert_peft_to_gguf(peft, base, tmp_path / "a2-ours.gguf"))
    assert theirs.alpha == pytest.approx(alpha) and ours.alpha == pytest.approx(alpha * math.sqrt(r))
