"""`inferctl` as a user runs it: a real subprocess, real files, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def inferctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferctl.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = inferctl("make-demo-model", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "gibberish" in result.stdout
    return out


def test_readme_flow(demo: Path) -> None:
    """The README's first command: demo model -> Q8_0 GGUF -> show."""
    gguf_path = demo.parent / "demo.gguf"
    result = inferctl("convert", str(demo), str(gguf_path), "--type", "Q8_0")
    assert result.returncode == 0, result.stderr
    assert gguf_path.is_file() and "Q8_0" in result.stdout
    shown = inferctl("show", str(gguf_path))
    assert shown.returncode == 0, shown.stderr
    assert "llama" in shown.stdout and "Q8_0" in shown.stdout
    info = json.loads(inferctl("show", str(gguf_path), "--json").stdout)
    assert info["architecture"] == "llama" and info["quantization"] == "Q8_0"
    assert info["layers"] == 4 and info["chat_template"]
    folder = json.loads(inferctl("show", str(demo), "--json").stdout)
    assert folder["parameters"] == info["parameters"]  # same model, two formats


def test_demo_model_runs_in_llama_cpp(demo: Path) -> None:
    import llama_cpp
    gguf_path = demo.parent / "demo-f16.gguf"
    assert inferctl("convert", str(demo), str(gguf_path)).returncode == 0
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, verbose=False)
    assert llm.tokenize(b"Hello world")  # its tokenizer and weights load
    llm.close()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["show", "/nonexistent/model.gguf"], "no such model"),
        (["convert", "/nonexistent", "/tmp/x.gguf"], "config.json"),
    ],
)
def test_errors_are_one_line(args: list[str], fragment: str) -> None:
    result = inferctl(*args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inferctl: error:") and fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_type_and_corrupt_file(demo: Path, tmp_path: Path) -> None:
    result = inferctl("convert", str(demo), str(tmp_path / "x.gguf"), "--type", "Q9_9")
    assert result.returncode == 1 and "unsupported output type" in result.stderr
    assert not (tmp_path / "x.gguf").exists()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    result = inferctl("show", str(bad))
    assert result.returncode == 1 and str(bad) in result.stderr and "Traceback" not in result.stderr


def test_readme_serve(demo: Path) -> None:
    """The README's first command ends in `inferctl serve demo-model`: it must answer an OpenAI request."""
    import httpx

    from tests.fixtures.server import Server

    server = Server(demo, "demo-model")
    try:
        response = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "demo-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        assert server.stop() == 0, server.output()


def test_bench_dispatches_to_the_benchmark_scripts(tmp_path: Path) -> None:
    """`inferctl bench NAME` is `python -m benchmarks.NAME`: same flags, same result file."""
    listing = inferctl("bench", "--help")
    assert listing.returncode == 0
    for name in ("serving", "decode", "side-by-side", "make-model", "hf-baseline"):
        assert name in listing.stdout
    unknown = inferctl("bench", "nope")
    assert unknown.returncode == 2 and "unknown benchmark 'nope'" in unknown.stderr
    usage = inferctl("bench", "decode", "--help")
    assert usage.returncode == 0 and "usage: inferctl bench decode" in usage.stdout and "--batch" in usage.stdout
    out = tmp_path / "throughput.json"
    ran = inferctl("bench", "throughput", "--make", "tiny", "--num-prompts", "2", "--input-len", "8",
                   "--output-len", "4", "--json", str(out))
    assert ran.returncode == 0, ran.stderr
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 2 and result["output_tokens_per_s"] > 0
