"""Signed models (store/signing.py): OpenSSF model-signing bundles made by `inferctl sign` verify with the
`model_signing` CLI and the other way round; tampering of every kind is refused; with
security.require_signed_models, pull, serve and loads refuse unsigned or tampered artifacts.

Real keys (EC P-256 from `cryptography`), the real `model_signing` CLI, real `inferctl` processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from inferflux.config import load_config
from inferflux.store import open_store
from inferflux.store.signing import SignatureError, Verifier, check_model, sign, stored_signature

ROOT = Path(__file__).resolve().parents[1]
MODEL_SIGNING = Path(sys.executable).with_name("model_signing")


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    private = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def inferctl(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inferctl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "INFERFLUX_HOME": str(home), **env}, timeout=300)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    (a, a_pub), (b, b_pub) = key_pair(folder, "a"), key_pair(folder, "b")
    return {"a": a, "a_pub": a_pub, "b": b, "b_pub": b_pub}


@pytest.fixture
def folder_model(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model("llama"), tmp_path / "tiny-llama"))


@pytest.fixture
def gguf_model(tiny_gguf, tmp_path) -> Path:
    return Path(shutil.copy(tiny_gguf("llama", "F16"), tmp_path / "tiny.gguf"))


def test_inferctl_sign_verifies_with_model_signing_cli(folder_model, gguf_model, keys, tmp_path):
    for model in (folder_model, gguf_model):
        done = inferctl("sign", str(model), "--key", str(keys["a"]), home=tmp_path)
        assert done.returncode == 0, done.stderr
        sig = model / "model.sig" if model.is_dir() else model.with_name(model.name + ".sig")
        assert sig.is_file() and str(sig) in done.stdout
        cli = subprocess.run([str(MODEL_SIGNING), "verify", "key", str(model), "--signature", str(sig),
                              "--public_key", str(keys["a_pub"])], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0 and "succeeded" in cli.stdout + cli.stderr, cli.stdout + cli.stderr
        ok = inferctl("verify", str(model), "--key", str(keys["a_pub"]), home=tmp_path)
        assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
        wrong = inferctl("verify", str(model), "--key", str(keys["b_pub"]), home=tmp_path)
        assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
        assert "does not verify" in wrong.stderr


def test_model_signing_cli_signature_verifies_in_inferflux(folder_model, keys, tmp_path):
    sig = tmp_path / "elsewhere.sig"
    cli = subprocess.run([str(MODEL_SIGNING), "sign", "key", str(folder_model), "--private_key", str(keys["b"]),
                          "--signature", str(sig)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    done = inferctl("verify", str(folder_model), "--key", f"{keys['a_pub']},{keys['b_pub']}", "--signature", str(sig),
                    home=tmp_path)
    assert done.returncode == 0 and keys["b_pub"].name in done.stdout, done.stderr
    assert Verifier((keys["b_pub"],)).verify(folder_model, sig) == keys["b_pub"]


def _flip_byte(model: Path) -> None:
    target = model / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))


def _add_file(model: Path) -> None:
    (model / "extra.json").write_text("{}")


def _rename_file(model: Path) -> None:
    (model / "tokenizer.json").rename(model / "tokenizer2.json")


def _swap_symlink(model: Path) -> None:
    outside = model.parent / "config-copy.json"
    shutil.copy(model / "config.json", outside)  # identical bytes, but reached through a link
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(outside)


@pytest.mark.parametrize("tamper", [_flip_byte, _add_file, _rename_file, _swap_symlink],
                         ids=["byte", "added", "renamed", "symlink"])
def test_tampered_folder_is_refused(folder_model, keys, tamper):
    sign(folder_model, keys["a"])
    verifier = Verifier((keys["a_pub"],))
    assert verifier.verify(folder_model) == keys["a_pub"]
    tamper(folder_model)
    with pytest.raises(SignatureError) as err:
        verifier.verify(folder_model)
    assert "\n" not in str(err.value) and str(folder_model) in str(err.value)


def test_renamed_or_swapped_single_file_is_refused(gguf_model, keys):
    sign(gguf_model, keys["a"])
    verifier = Verifier((keys["a_pub"],))
    renamed = gguf_model.with_name("other.gguf")
    shutil.copy(gguf_model, renamed)
    shutil.copy(gguf_model.with_name(gguf_model.name + ".sig"), renamed.with_name("other.gguf.sig"))
    with pytest.raises(SignatureError, match="signature is for `tiny.gguf`"):  # model-signing alone would pass it
        verifier.verify(renamed)
    link = gguf_model.with_name("link.gguf")
    link.symlink_to(gguf_model)
    with pytest.raises(SignatureError, match="symbolic link"):
        verifier.verify(link)
    gguf_model.with_name(gguf_model.name + ".sig").unlink()
    with pytest.raises(SignatureError, match="not signed"):
        verifier.verify(gguf_model)


def test_required_signatures_gate_pull_load_and_serve(folder_model, gguf_model, keys, tmp_path):
    home = tmp_path / "home"
    required = {"INFERFLUX_SECURITY__REQUIRE_SIGNED_MODELS": "true",
                "INFERFLUX_SECURITY__TRUSTED_KEYS": str(keys["a_pub"])}
    # pull: unsigned refused (one line), nothing stored; signed stored with its signature kept
    refused = inferctl("pull", str(gguf_model), "--name", "tiny", home=home, **required)
    assert refused.returncode == 1 and "not signed" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not open_store(home).has("tiny")
    sign(gguf_model, keys["a"])
    sign(folder_model, keys["a"])
    for model, name in ((gguf_model, "tiny"), (folder_model, "tiny-folder")):
        done = inferctl("pull", str(model), "--name", name, home=home, **required)
        assert done.returncode == 0, done.stderr
    config = load_config(environ={**required, "INFERFLUX_HOME": str(home)})
    store = open_store(home)
    for name in ("tiny", "tiny-folder"):
        stored = store.path(name)
        assert stored_signature(home, stored).is_file()
        check_model(stored, config, home)  # the store's copy verifies against the kept signature
    # a stored blob changed after the pull is refused at load
    blob = store.path("tiny")
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="does not verify"):
        check_model(blob, config, home)
    # serve refuses an unsigned model before loading it: exit non-zero with one line, no traceback
    unsigned = tmp_path / "unsigned.gguf"
    shutil.copy(gguf_model, unsigned)
    from tests.fixtures.server import free_port

    served = inferctl("serve", str(unsigned), "--port", str(free_port()), home=home, **required)
    assert served.returncode != 0 and "not signed" in served.stderr, served.stderr[-2000:]
    assert "Traceback" not in served.stderr
    # signing off (the default): anything loads
    check_model(unsigned, load_config(environ={}), home)
