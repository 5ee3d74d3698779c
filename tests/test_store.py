"""The model store: pull from files, folders, Ollama and the Hub; list, show, rm; crash safety.

Commands run in real subprocesses (`_run` calls the `inferctl/store_cmds.py`
functions with the CLI's error handling) so one-line errors and a killed pull
are tested as a user meets them. Each test has its own INFERFLUX_HOME.

Interrupted pulls are simulated without any hook in the product: the pulling
subprocess passes a progress callback that calls `os._exit` at the first
"copying" event, with a small `chunk_size` so that is mid-copy. Nothing is
cleaned up, exactly as after `kill -9`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from inferflux.errors import InferFluxError
from inferflux.store import ModelStore

# Calls `store_cmds.<cmd>(store, *args, **kwargs)` and reports errors the way `inferctl.cli.main` does.
# Pulls in 64 KiB chunks (more than Python's write buffer, so the first chunk reaches the file) and
# dies without cleanup, like kill -9, at the first progress event of `phase`.
_ABORTING_PULL = """
import os, sys
from pathlib import Path
from inferflux.store import ModelStore
source, name, phase = sys.argv[1:4]
def progress(label, done, total, unit):
    if label.startswith(phase) and done < total:
        os._exit(75)
ModelStore(Path(os.environ["INFERFLUX_HOME"]), chunk_size=65536).pull(source, name=name, progress=progress)
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(home: Path) -> ModelStore:
    return ModelStore(home)


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "INFERFLUX_HOME": str(home), **extra}


_COMMANDS = {"list_models": "list", "make_demo": "make-demo-model"}  # store_cmds function -> command
_FLAGS = {"as_json": "--json", "name": "--name", "quantize": "--quantize", "force": "--force"}


def _run(home: Path, cmd: str, *args: str, env: dict[str, str] | None = None,
         **kwargs: object) -> subprocess.CompletedProcess:
    """Run the real `inferctl` command for a store_cmds function name, as a user would."""
    argv = [sys.executable, "-m", "inferctl.cli", _COMMANDS.get(cmd, cmd), *args]
    for key, value in kwargs.items():
        argv += [_FLAGS[key]] if value is True else [_FLAGS[key], str(value)]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, env=env or _env(home))


def _one_line_error(result: subprocess.CompletedProcess, fragment: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inferctl: error:"), result.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _blobs(home: Path) -> list[Path]:
    folder = home / "models" / "blobs"
    return sorted(p for p in folder.iterdir() if p.name.startswith("sha256-")) if folder.is_dir() else []


def _temps(home: Path) -> list[Path]:
    folder = home / "models" / "blobs"
    return sorted(p for p in folder.iterdir() if p.name.startswith(".tmp-")) if folder.is_dir() else []


def test_pull_gguf_list_show_rm(home: Path, tiny_gguf) -> None:
    src = tiny_gguf("llama", "F16")
    result = _run(home, "pull", str(src))
    assert result.returncode == 0, result.stderr
    assert "pulled llama-F16:latest" in result.stdout and result.stderr == ""  # no bars without a TTY

    listed = _run(home, "list_models").stdout.splitlines()
    assert listed[0].split() == ["NAME", "SIZE", "FORMAT", "QUANT", "MODIFIED"]
    assert listed[1].split()[0] == "llama-F16:latest" and "gguf" in listed[1] and "F16" in listed[1]
    assert "just now" in listed[1]

    info = json.loads(_run(home, "show", "llama-F16", as_json=True).stdout)
    assert info["name"] == "llama-F16:latest" and info["format"] == "gguf"
    assert info["architecture"] == "llama" and info["quantization"] == "F16" and info["layers"] == 2
    assert info["source"] == str(src) and info["blobs"][0]["role"] == "model"
    table = _run(home, "show", "llama-F16:latest").stdout
    assert "llama-F16:latest" in table and "F16" in table

    store = ModelStore(home)
    blob = store.path("llama-F16")
    assert blob.name == f"sha256-{_sha256(src)}" and blob.read_bytes() == src.read_bytes()
    assert store.resolve("llama-F16:latest") == blob and store.resolve(str(src)) == src

    manifest = json.loads((home / "models" / "manifests" / "llama-F16" / "latest.json").read_text())
    assert manifest["layers"] == [{"digest": f"sha256:{_sha256(src)}", "size": src.stat().st_size, "role": "model"}]
    assert manifest["parameters"] == info["parameters"] and manifest["created"] == manifest["modified"]

    removed = _run(home, "rm", "llama-F16")
    assert removed.returncode == 0 and "deleted llama-F16:latest" in removed.stdout
    assert store.list() == [] and _blobs(home) == []
    assert not (home / "models" / "manifests" / "llama-F16").exists()
    _one_line_error(_run(home, "show", "llama-F16"), "model 'llama-F16:latest' not found; try `inferctl list`")


def test_same_gguf_under_two_names_is_stored_once(store: ModelStore, home: Path, tiny_gguf) -> None:
    src = tiny_gguf("llama", "F16")
    assert store.pull(str(src), name="first") == "first:latest"
    events: list[str] = []
    assert store.pull(str(src), name="team/second:v1", progress=lambda label, *_: events.append(label)) \
        == "team/second:v1"
    assert not any(e.startswith("copying") for e in events)  # hashed, found, verified: no copy
    assert [e.name for e in store.list()] == ["first:latest", "team/second:v1"]
    assert len(_blobs(home)) == 1

    assert store.rm("first") == 0  # the blob is still used by the other name
    assert len(_blobs(home)) == 1 and store.path("team/second:v1").is_file()
    assert store.rm("team/second:v1") == src.stat().st_size
    assert _blobs(home) == [] and list((home / "models" / "manifests").iterdir()) == []


def test_pull_folder_quantized_to_q4_k(store: ModelStore, tiny_model) -> None:
    folder = tiny_model("llama-q")
    events: list[tuple[str, str]] = []
    stored = store.pull(str(folder), name="llama-q:q4", quantize="q4_k",
                        progress=lambda label, done, total, unit: events.append((label, unit)))
    assert stored == "llama-q:q4"
    assert ("converting to Q4_K", "tensors") in events

    reader = gguf.GGUFReader(store.path(stored))
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert "Q4_K" in types and types <= {"Q4_K", "F32"}
    (entry,) = store.list()
    assert (entry.format, entry.quantization, entry.architecture) == ("gguf", "Q4_K_S", "llama")
    assert store.show(stored)["source"] == str(folder)


def test_pull_folder_without_quantize_materializes(store: ModelStore, home: Path, tiny_model) -> None:
    from inferflux.formats.loader import load_model

    folder = tiny_model("llama-q")
    assert store.pull(str(folder)) == f"{folder.name}:latest"  # default name: the folder's
    (entry,) = store.list()
    assert entry.format == "safetensors" and entry.architecture == "llama"
    source_files = sorted(p.name for p in folder.iterdir() if p.is_file())

    path = store.path(entry.name)
    assert path.parent == home / "models" / "folders" and sorted(p.name for p in path.iterdir()) == source_files
    assert (path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    loaded = load_model(store.resolve(entry.name))
    assert loaded.format == "safetensors" and loaded.config.hidden_size == 256
    assert store.show(entry.name)["parameters"] > 0

    shutil.rmtree(path)  # a missing materialization is rebuilt on demand
    assert store.path(entry.name) == path and (path / "config.json").is_file()
    store.rm(entry.name)
    assert not path.exists() and _blobs(home) == []


def _ollama_store(root: Path, manifest_dir: tuple[str, ...], tag: str, gguf_file: Path) -> str:
    """Lay out an Ollama store: manifests/registry.ollama.ai/.../<tag> and blobs/sha256-<hex>."""
    digest = _sha256(gguf_file)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf_file, root / "blobs" / f"sha256-{digest}")
    template = b"{{ .Prompt }}"
    template_digest = hashlib.sha256(template).hexdigest()
    (root / "blobs" / f"sha256-{template_digest}").write_bytes(template)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{template_digest}", "size": len(template)},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
             "size": gguf_file.stat().st_size},
            {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{template_digest}",
             "size": len(template)},
        ],
    }
    path = root.joinpath("manifests", "registry.ollama.ai", *manifest_dir, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return digest


def test_pull_from_ollama_store(home: Path, tmp_path: Path, tiny_gguf) -> None:
    ollama = tmp_path / "ollama-models"
    src = tiny_gguf("llama", "F16")
    digest = _ollama_store(ollama, ("library", "tiny"), "1b", src)
    _ollama_store(ollama, ("someone", "tiny"), "latest", src)
    env = _env(home, OLLAMA_MODELS=str(ollama))

    assert "pulled tiny:1b" in _run(home, "pull", "ollama://tiny:1b", env=env).stdout
    assert "pulled someone/tiny:latest" in _run(home, "pull", "ollama://someone/tiny", env=env).stdout
    store = ModelStore(home)
    assert [e.name for e in store.list()] == ["someone/tiny:latest", "tiny:1b"]
    assert store.path("tiny:1b").name == f"sha256-{digest}" and len(_blobs(home)) == 1
    assert store.show("tiny:1b")["source"] == "ollama://tiny:1b"

    _one_line_error(_run(home, "pull", "ollama://tiny:7b", env=env), "not in the Ollama store")
    store.rm("tiny:1b")
    store.rm("someone/tiny")
    # A damaged Ollama blob (a valid GGUF, but not the bytes its digest names) is refused.
    shutil.copyfile(tiny_gguf("llama", "F32"), ollama / "blobs" / f"sha256-{digest}")
    _one_line_error(_run(home, "pull", "ollama://tiny:1b", env=env), "does not match its digest")
    assert store.list() == [] and _blobs(home) == []


def test_interrupted_pull_lists_nothing_and_next_pull_completes(home: Path, tiny_gguf) -> None:
    src = tiny_gguf("llama", "F16")
    killed = subprocess.run([sys.executable, "-c", _ABORTING_PULL, str(src), "tiny", "copying"],
                            env=_env(home), check=False, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 75, killed.stderr
    store = ModelStore(home)
    assert store.list() == [] and _blobs(home) == []
    (partial,) = _temps(home)
    assert 0 < partial.stat().st_size < src.stat().st_size
    _one_line_error(_run(home, "show", "tiny"), "not found")

    result = _run(home, "pull", str(src), name="tiny")
    assert result.returncode == 0, result.stderr
    assert _temps(home) == []  # the dead pull's partial file is gone
    (blob,) = _blobs(home)
    assert blob.name == f"sha256-{_sha256(src)}" and _sha256(blob) == _sha256(src)
    assert [e.name for e in store.list()] == ["tiny:latest"]


def test_resumed_folder_pull_reuses_completed_blobs(store: ModelStore, home: Path, tiny_model) -> None:
    folder = tiny_model("llama-q")
    killed = subprocess.run([sys.executable, "-c", _ABORTING_PULL, str(folder), "llamaq", "copying model."],
                            env=_env(home), check=False, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 75, killed.stderr
    assert store.list() == []
    done_before = {blob.name: blob.stat().st_ino for blob in _blobs(home)}
    assert done_before and len(_temps(home)) == 1  # config.json & co. done; model.safetensors partial

    events: list[str] = []
    store.pull(str(folder), name="llamaq", progress=lambda label, *_: events.append(label))
    copied = {e.split(" ", 1)[1] for e in events if e.startswith("copying")}
    # Files sorted before model.safetensors were complete: verified and kept, not copied again.
    assert "model.safetensors" in copied and not copied & {"config.json", "generation_config.json"}
    assert "verifying config.json" in events and "verifying generation_config.json" in events
    assert all(Path(home / "models" / "blobs" / n).stat().st_ino == ino for n, ino in done_before.items())
    assert _temps(home) == [] and [e.name for e in store.list()] == ["llamaq:latest"]


def test_damaged_blob_is_not_trusted(store: ModelStore, tiny_gguf) -> None:
    src = tiny_gguf("llama", "F16")
    store.pull(str(src), name="tiny")
    blob = store.path("tiny")
    blob.write_bytes(b"\0" * blob.stat().st_size)  # same size, wrong content
    store.pull(str(src), name="tiny")
    assert _sha256(blob) == _sha256(src)


def test_hf_source_fails_with_one_line_offline(home: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: nothing may be downloaded
    line = _one_line_error(_run(home, "pull", "hf://no-such-org/no-such-repo"), "download failed")
    assert line.startswith("inferctl: error: hf://no-such-org/no-such-repo: download failed")
    _one_line_error(_run(home, "pull", "hf://org/repo/model.Q4_K.gguf"), "download failed")
    _one_line_error(_run(home, "pull", "hf://just-one-part"), "expected hf://ORG/REPO")
    assert ModelStore(home).list() == []


@pytest.mark.parametrize("bad", ["bad name", "a:b:c", "../up", "/abs", "name:", "x/", "Ünicode", "a/b.json/c"])
def test_bad_names_are_refused(store: ModelStore, tiny_gguf, bad: str) -> None:
    with pytest.raises(InferFluxError, match="invalid (model name|tag)"):
        store.pull(str(tiny_gguf("llama", "F16")), name=bad)
    assert store.list() == []


def test_errors_are_clear(store: ModelStore, home: Path, tmp_path: Path, tiny_gguf, tiny_model) -> None:
    with pytest.raises(InferFluxError, match=r"model 'ghost:latest' not found; try `inferctl list`"):
        store.resolve("ghost")
    with pytest.raises(InferFluxError, match="not found"):
        store.rm("ghost:v2")
    with pytest.raises(InferFluxError, match="no such model file or folder"):
        store.resolve("/nonexistent/model.gguf")
    with pytest.raises(InferFluxError, match="re-quantiz|already a GGUF"):
        store.pull(str(tiny_gguf("llama", "F16")), quantize="Q4_K")
    with pytest.raises(InferFluxError, match="not a model folder"):
        store.pull(str(tmp_path))
    with pytest.raises(InferFluxError, match="unsupported source"):
        store.pull("s3://bucket/model")

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\xff" * 64)
    line = _one_line_error(_run(home, "pull", str(bad)), str(bad))
    assert "GGUF" in line
    _one_line_error(_run(home, "pull", str(tmp_path / "missing.gguf")), "no such file or folder")
    line = _one_line_error(_run(home, "pull", str(tiny_model("llama-q")), quantize="Q9_9"), "unsupported quantization")
    assert "Q4_K" in line
    _one_line_error(_run(home, "pull", str(bad), name="bad name"), "invalid model name")
    _one_line_error(_run(home, "rm", "ghost"), "not found")
    _one_line_error(_run(home, "show", "/nonexistent/model.gguf"), "/nonexistent/model.gguf: no such model")
    assert store.list() == [] and _blobs(home) == [] and _temps(home) == []


def test_repull_replaces_content_and_collects_old_blob(store: ModelStore, home: Path, tiny_gguf) -> None:
    store.pull(str(tiny_gguf("llama", "F16")), name="tiny")
    created = store.show("tiny")["created"]
    store.pull(str(tiny_gguf("llama", "F32")), name="tiny")
    (blob,) = _blobs(home)  # the F16 blob nothing references any more is gone
    assert blob == store.path("tiny") and store.list()[0].quantization == "F32"
    assert store.show("tiny")["created"] == created


def test_human_size_and_relative_time() -> None:
    from datetime import UTC, datetime, timedelta

    from inferctl.store_cmds import human_size, relative_time

    assert [human_size(n) for n in (0, 999, 33_400, 512_000_000, 4_700_000_000)] == \
        ["0 B", "999 B", "33.4 KB", "512 MB", "4.7 GB"]
    now = datetime(2025, 6, 1, tzinfo=UTC)
    ago = [relative_time(now - delta, now) for delta in
           (timedelta(seconds=5), timedelta(minutes=1), timedelta(hours=3), timedelta(days=9), timedelta(days=400))]
    assert ago == ["just now", "1 minute ago", "3 hours ago", "1 week ago", "1 year ago"]


def test_make_demo(home: Path) -> None:
    from inferflux.formats.loader import load_model

    result = _run(home, "make_demo")
    assert result.returncode == 0, result.stderr
    assert "pulled demo:latest" in result.stdout and "gibberish" in result.stdout
    store = ModelStore(home)
    (entry,) = store.list()
    assert entry.format == "safetensors" and entry.quantization == "none"
    assert load_model(store.path("demo")).config.num_layers == 4


def test_make_demo_does_not_replace_a_model_silently(home: Path, tiny_gguf) -> None:
    """A model stored as `demo` (here a real GGUF) survives `make-demo-model` unless --force says otherwise."""
    gguf_path = tiny_gguf("llama", "F32")
    assert _run(home, "pull", str(gguf_path), name="demo").returncode == 0
    before = ModelStore(home).list()
    line = _one_line_error(_run(home, "make_demo"), "demo:latest is already in the store")
    assert "--force" in line
    assert ModelStore(home).list() == before  # untouched
    forced = _run(home, "make_demo", force=True)
    assert forced.returncode == 0 and "pulled demo:latest" in forced.stdout, forced.stderr
    (entry,) = ModelStore(home).list()
    assert entry.format == "safetensors" and entry.digest != before[0].digest


def test_make_demo_folder_keeps_other_files(home: Path, tmp_path: Path) -> None:
    """`--out DIR` rewrites an earlier demo (the README's first command can run twice), never another model."""
    out = tmp_path / "demo-model"
    for _ in range(2):
        made = _run(home, "make-demo-model", "--out", str(out))
        assert made.returncode == 0 and "gibberish" in made.stdout, made.stderr
    other = tmp_path / "my-model"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 32}')
    _one_line_error(_run(home, "make-demo-model", "--out", str(other)), "not a demo model")
    assert (other / "config.json").read_text() == '{"model_type": "llama", "num_hidden_layers": 32}'
    assert _run(home, "make-demo-model", "--out", str(other), "--force").returncode == 0


def test_copy_with_overrides_shares_blobs_and_inherits(store: ModelStore, home: Path, tiny_gguf) -> None:
    """What `/api/create` stores: a new name over the same blobs, its overrides merged over the source's."""
    assert store.pull(str(tiny_gguf("llama", "F16")), name="base") == "base:latest"
    assert store.copy("base", "persona", {"system": "Be brief.", "parameters": {"temperature": 0.1, "top_k": 5}}) \
        == "persona:latest"
    assert store.copy("persona", "child:v1", {"parameters": {"temperature": 0.7}}) == "child:v1"
    assert store.overrides("base") == {} and store.overrides("missing") == {}
    assert store.overrides("persona") == {"system": "Be brief.", "parameters": {"temperature": 0.1, "top_k": 5}}
    assert store.overrides("child:v1") == {"system": "Be brief.", "parameters": {"temperature": 0.7, "top_k": 5}}
    assert len(_blobs(home)) == 1 and store.path("child:v1") == store.path("base")
    entries = {e.name: e for e in store.list()}
    assert len({entries[n].digest for n in ("base:latest", "persona:latest", "child:v1")}) == 3
    assert store.rm("base") == 0 and store.rm("persona") == 0  # the child still holds the blob
    assert store.path("child:v1").is_file() and store.rm("child:v1") > 0 and _blobs(home) == []
