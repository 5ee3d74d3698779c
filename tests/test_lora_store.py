"""Adapters in the store (`inferctl adapter ...`), loaded by name at start and over HTTP, encrypted at rest,
refused unsigned or tampered under security.require_signed_models, and `vllm:lora_requests_info`.

Real `inferctl` processes, real servers on loopback, real EC key pairs, a real master key file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferflux import LLM
from inferflux.engine.request import Request
from inferflux.formats.gguf_lora import convert_peft_to_gguf
from inferflux.server.access.crypto import generate_master_key
from inferflux.store.adapters import AdapterStore
from inferflux.store.signing import sign
from tests.fixtures.server import Server
from tests.test_lora import ADAPTERS, PROMPT, RUNTIME, greedy, make_adapter
from tests.test_signing import key_pair

ROOT = Path(__file__).resolve().parents[1]


def inferctl(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`inferctl ARGS` through its real entry point (`main`), in this process: the same parsing, output and
    exit status as the console script without a Python start per call (serve, below, runs as a process)."""
    from inferctl.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update({"INFERFLUX_HOME": str(home), **env})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())


def inferctl_process(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inferctl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "INFERFLUX_HOME": str(home), **env}, timeout=300)


def one_line_error(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and text in done.stderr, done.stderr


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory) -> SimpleNamespace:
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("adapter-store")
    a1 = make_adapter(base, root / "a1", *ADAPTERS["a1"])
    a2 = make_adapter(base, root / "a2", *ADAPTERS["a2"])
    key_file = root / "master.key"
    key_file.write_text(generate_master_key())
    key_file.chmod(0o600)
    priv, pub = key_pair(root, "signer")
    return SimpleNamespace(base=base, root=root, a1=a1, a2=a2, g1=convert_peft_to_gguf(a1, base, root / "g1.gguf"),
                           key_file=key_file, priv=priv, pub=pub, home=root / "home",
                           master={"INFERFLUX_SECURITY__MASTER_KEY_FILE": str(key_file)})


def test_cli_pull_list_show_rm_convert(env) -> None:
    home = env.home
    for args in (("adapter", "pull", str(env.a1)), ("adapter", "pull", str(env.g1)),
                 ("adapter", "pull", str(env.a2), "--name", "a2-enc", "--encrypt"),
                 ("adapter", "pull", str(env.a2), "--name", "tampered", "--encrypt")):
        done = inferctl(*args, home=home, **env.master)
        assert done.returncode == 0 and "stored adapter" in done.stdout, done.stderr
    rows = {m["name"]: m for m in json.loads(inferctl("adapter", "list", "--json", home=home).stdout)}
    assert sorted(rows) == ["a1", "a2-enc", "g1", "tampered"]
    assert rows["a1"]["format"] == "peft" and rows["g1"]["format"] == "gguf" and rows["g1"]["rank"] == 4
    assert rows["a2-enc"]["encrypted"] and not rows["a1"]["encrypted"] and rows["a2-enc"]["rslora"]
    # Encrypted at rest: the stored bytes are not the adapter's (not even its safetensors header).
    plain = (env.a2 / "adapter_model.safetensors").read_bytes()
    stored = (home / "adapters" / "a2-enc" / "files" / "adapter_model.safetensors").read_bytes()
    assert stored.startswith(b"ifxenc:v1:") and plain[8:72] not in stored
    shown = inferctl("adapter", "show", "g1", home=home)
    assert shown.returncode == 0 and "gguf" in shown.stdout and "llama" in shown.stdout, shown.stderr
    one_line_error(inferctl("adapter", "pull", str(env.a1), home=home), "is stored")
    one_line_error(inferctl("adapter", "pull", str(env.a1), "--name", "x", "--encrypt", home=home,
                            INFERFLUX_MASTER_KEY=""), "needs a master key")
    one_line_error(inferctl("adapter", "pull", str(env.root), "--name", "nope", home=home), "not a PEFT adapter")
    one_line_error(inferctl("adapter", "pull", str(env.a1), "--name", "../up", home=home), "adapter name")
    done = inferctl("adapter", "convert", str(env.a1), str(env.root / "c.gguf"), str(env.base), "--type", "F16",
                    home=home)
    assert done.returncode == 0 and (env.root / "c.gguf").is_file(), done.stderr
    assert inferctl("adapter", "pull", str(env.root / "c.gguf"), home=home).returncode == 0
    assert inferctl("adapter", "rm", "c", home=home).returncode == 0
    one_line_error(inferctl("adapter", "show", "c", home=home), "not found")


@pytest.fixture(scope="module")
def server(env):
    srv = Server(env.base, "tiny", ["runtime.max_loras=4", "runtime.max_lora_rank=8", "server.lora_modules=a1",
                                    f"security.master_key_file={env.key_file}"], home=env.home)
    yield srv
    srv.stop()


def complete(server: Server, model: str) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    return out.choices[0].text


def load(server: Server, name: str, path: str | Path) -> httpx.Response:
    return httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      timeout=120)


def test_stored_adapters_load_by_name_and_decrypt_in_memory(env, server) -> None:
    """a1 came from server.lora_modules (the store), `enc` is the encrypted a2 loaded by store name: each
    answers as the same adapter loaded from its folder; a tampered ciphertext is a clear 400."""
    assert "a1" in {m.id for m in openai.OpenAI(base_url=server.url + "/v1", api_key="none").models.list().data}
    assert load(server, "enc", "a2-enc").status_code == 200
    assert load(server, "a2-path", env.a2).status_code == 200
    assert complete(server, "enc") == complete(server, "a2-path") != complete(server, "tiny")
    assert load(server, "a1-path", env.a1).status_code == 200
    assert complete(server, "a1") == complete(server, "a1-path")
    blob = env.home / "adapters" / "tampered" / "files" / "adapter_model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 1
    blob.write_bytes(bytes(data))
    unloaded = inferctl("adapter", "unload", "a1-path", "--url", server.url, home=env.home)
    assert unloaded.returncode == 0, unloaded.stderr
    r = load(server, "t", "tampered")
    assert r.status_code == 400 and "fails authentication" in r.json()["error"]["message"], r.text
    r = load(server, "t", "no-such-adapter")
    assert r.status_code == 400 and "stored adapter" in r.json()["error"]["message"], r.text
    one_line_error(inferctl("adapter", "load", "t", "--source", "tampered", "--url", server.url, home=env.home),
                   "fails authentication")


def test_lora_requests_info_metric(env, server) -> None:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    samples = families["vllm:lora_requests_info"].samples
    assert len(samples) == 1
    assert samples[0].labels == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    # What the labels hold while requests run: the engine's own view, between two steps.
    llm = LLM(env.base, **{**RUNTIME, "max_num_seqs": 1})
    llm.load_lora("x1", env.a1)
    llm.load_lora("x2", env.a2)
    first = llm.stream(PROMPT, greedy([("x1", 1.0)]))
    next(first)  # running; with max_num_seqs 1 the next one waits
    engine = llm.engine
    waiting = Request(list(PROMPT), greedy([("x2", 1.0), ("x1", 0.5)]))
    engine.add_request(waiting)
    assert engine.loras.request_info(engine.scheduler.running, engine.scheduler.waiting) == (["x1"], ["x1", "x2"])
    engine.abort(waiting.request_id)
    list(first)
    assert engine.loras.request_info(engine.scheduler.running, engine.scheduler.waiting) == ([], [])


@pytest.fixture(scope="module")
def signed_server(env, tmp_path_factory):
    """require_signed_models on: the base model itself must be signed to serve."""
    root = tmp_path_factory.mktemp("signed")
    base = Path(shutil.copytree(env.base, root / "base"))
    sign(base, env.priv)
    settings = {"INFERFLUX_SECURITY__REQUIRE_SIGNED_MODELS": "true", "INFERFLUX_SECURITY__TRUSTED_KEYS": str(env.pub),
                **env.master}
    home = root / "home"
    srv = Server(base, "tiny", ["runtime.max_loras=2", "runtime.max_lora_rank=8",
                                "security.require_signed_models=true", f"security.trusted_keys={env.pub}",
                                f"security.master_key_file={env.key_file}"], home=home)
    yield srv, root, home, settings
    srv.stop()


def test_signatures_gate_adapter_loads(env, signed_server) -> None:
    server, root, home, required = signed_server
    unsigned = Path(shutil.copytree(env.a1, root / "unsigned"))
    r = load(server, "u", unsigned)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
    assert "not signed" in r.json()["error"]["message"]
    signed = Path(shutil.copytree(env.a1, root / "signed"))
    sign(signed, env.priv)
    assert load(server, "s", signed).status_code == 200
    s_text = complete(server, "s")
    assert s_text != complete(server, "tiny")
    gguf = Path(shutil.copy(env.g1, root / "g1.gguf"))
    sign(gguf, env.priv)
    data = bytearray(gguf.read_bytes())
    data[-3] ^= 1
    gguf.write_bytes(bytes(data))
    r = load(server, "g", gguf)
    assert r.status_code == 403 and "does not verify" in r.json()["error"]["message"], r.text
    # The store: an unsigned pull is refused (nothing stored); a signed one, plain or encrypted, loads by name.
    one_line_error(inferctl_process("adapter", "pull", str(unsigned), home=home, **required), "not signed")
    assert not AdapterStore(home).has("unsigned")
    for args in (("adapter", "pull", str(signed), "--name", "s-plain"),
                 ("adapter", "pull", str(signed), "--name", "s-enc", "--encrypt")):
        done = inferctl(*args, home=home, **required)
        assert done.returncode == 0 and "signature kept" in done.stdout, done.stderr
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "s"})
    assert r.status_code == 200
    assert load(server, "s-enc", "s-enc").status_code == 200
    assert complete(server, "s-enc") == s_text  # the signed, encrypted copy is the same adapter
    # Stored without a signature (pulled while signatures were off): refused at load.
    assert inferctl("adapter", "pull", str(unsigned), "--name", "old", home=home).returncode == 0
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "s-enc"})
    assert r.status_code == 200
    r = load(server, "old", "old")
    assert r.status_code == 403 and "without a signature" in r.json()["error"]["message"], r.text
    # An edited manifest claiming a signature for an encrypted adapter fails authentication.
    assert inferctl("adapter", "pull", str(unsigned), "--name", "old-enc", "--encrypt", home=home,
                    **env.master).returncode == 0
    manifest = home / "adapters" / "old-enc" / "adapter.json"
    edited = json.loads(manifest.read_text())
    edited["signed_by"] = AdapterStore(home).manifest("s-enc")["signed_by"]
    manifest.write_text(json.dumps(edited))
    r = load(server, "old-enc", "old-enc")
    assert r.status_code == 400 and "fails authentication" in r.json()["error"]["message"], r.text
    # A tampered stored plain copy is refused against the kept signature.
    stored = home / "adapters" / "s-plain" / "files" / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-7] ^= 1
    stored.write_bytes(bytes(data))
    r = load(server, "sp", "s-plain")
    assert r.status_code == 403 and "does not verify" in r.json()["error"]["message"], r.text
    one_line_error(inferctl("adapter", "load", "u", "--source", str(unsigned), "--url", server.url, home=home),
                   "not signed")


def test_serve_refuses_an_unsigned_startup_adapter(env, signed_server) -> None:
    """`serve --lora-modules` with signatures required: an unsigned adapter stops the start with one line."""
    from tests.fixtures.server import free_port

    _, root, home, required = signed_server
    unsigned = root / "unsigned-start"
    if not unsigned.exists():
        shutil.copytree(env.a1, unsigned)
    done = inferctl_process("serve", str(root / "base"), "--port", str(free_port()), "--lora-modules", f"u={unsigned}",
                    "--set", "runtime.max_loras=2", "--set", "runtime.max_lora_rank=8", home=home, **required)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("inferctl: error: server.lora_modules u=") and "not signed" in last, last
