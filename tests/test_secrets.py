"""Secrets at rest: the master key, the AES-256-GCM envelope, the encrypted `secrets` table, rotation, the CLI.

Real parts only: a real state.db file (its bytes are searched for the plaintext), real keys, the real
`inferctl` process for exit codes, and `inferctl serve` refusing to start with a wrong master key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from inferflux.config import load_config
from inferflux.server.access.crypto import (
    SecretError,
    decrypt_bytes,
    decrypt_text,
    encrypt_bytes,
    encrypt_text,
    generate_master_key,
    key_id_of,
    load_master_key,
    parse_master_key,
)
from inferflux.server.access.secrets_store import SecretStore, check_secrets, hub_token
from tests.fixtures.server import free_port

PLAIN = "hf_Sup3rSecretTokenValue_0123456789"


def _key(text: str | None = None):
    return parse_master_key(text or generate_master_key(), "test")


def _db_bytes(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in home.glob("state.db*"))


def test_master_key_formats(tmp_path: Path) -> None:
    raw = os.urandom(32)
    forms = [raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
             base64.urlsafe_b64encode(raw).decode().rstrip("=") + "\n"]
    assert {parse_master_key(f, "t").key for f in forms} == {raw}
    assert len({parse_master_key(f, "t").kid for f in forms}) == 1 and len(_key().kid) == 12
    for bad in ("", "abc", raw.hex()[:-2], base64.b64encode(os.urandom(16)).decode(), "!" * 44):
        with pytest.raises(SecretError, match="32 bytes") as err:
            parse_master_key(bad, "INFERFLUX_MASTER_KEY")
        assert "\n" not in str(err.value)
    assert raw.hex() not in repr(parse_master_key(raw.hex(), "t"))
    # The environment wins over the file; a file that cannot be read is one line.
    key_file = tmp_path / "master.key"
    key_file.write_text(raw.hex() + "\n")
    other = generate_master_key()
    assert load_master_key(str(key_file), environ={}).key == raw
    assert load_master_key(str(key_file), environ={"INFERFLUX_MASTER_KEY": other}).key == base64.b64decode(other)
    assert load_master_key("", environ={}) is None
    with pytest.raises(SecretError, match="cannot read"):
        load_master_key(str(tmp_path / "missing.key"), environ={})


def test_envelope_round_trip_and_one_line_errors() -> None:
    key, other = _key(), _key()
    token = encrypt_text(key, PLAIN, "hf_token")
    assert token.startswith(f"ifxenc:v1:{key.kid}:") and PLAIN not in token and key_id_of(token) == key.kid
    assert decrypt_text(key, token, "hf_token") == PLAIN.encode()
    assert encrypt_text(key, PLAIN, "hf_token") != token  # a fresh nonce each time
    blob = encrypt_bytes(key, b"\x00adapter weights\xff" * 100, "adapter:a1")
    assert decrypt_bytes(key, blob, "adapter:a1") == b"\x00adapter weights\xff" * 100
    failures = {
        "was encrypted with master key": lambda: decrypt_text(other, token, "hf_token"),
        "no master key is configured": lambda: decrypt_text(None, token, "hf_token"),
        "fails authentication": lambda: decrypt_text(key, token, "oidc_client_secret"),  # moved to another name
        "not valid base64": lambda: decrypt_text(key, token[:-2] + "*!", "hf_token"),
        "not an InferFlux ciphertext": lambda: decrypt_text(key, PLAIN, "hf_token"),
        "truncated": lambda: decrypt_bytes(key, blob[:30], "adapter:a1"),
    }
    for expected, attempt in failures.items():
        with pytest.raises(SecretError, match=expected) as err:
            attempt()
        assert "\n" not in str(err.value) and PLAIN not in str(err.value)
    with pytest.raises(SecretError, match=f"master key {key.kid}, the configured key is {other.kid}"):
        decrypt_text(other, token, "hf_token")
    # One flipped bit anywhere in nonce, ciphertext or tag.
    body = bytearray(base64.b64decode(token.split(":", 3)[3]))
    for i in (0, 12, len(body) - 1):
        flipped = bytearray(body)
        flipped[i] ^= 1
        with pytest.raises(SecretError, match="fails authentication"):
            decrypt_text(key, token.rsplit(":", 1)[0] + ":" + base64.b64encode(bytes(flipped)).decode(), "hf_token")
    # A header edited to claim the other key fails too (the header is associated data).
    forged = f"ifxenc:v1:{other.kid}:" + token.split(":", 3)[3]
    with pytest.raises(SecretError, match="fails authentication"):
        decrypt_text(other, forged, "hf_token")


def test_store_never_holds_plaintext_and_detects_tampering(tmp_path: Path) -> None:
    key = _key()
    store = SecretStore(tmp_path / "state.db", key)
    row = store.set("hf_token", PLAIN)
    store.set("oidc_client_secret", "client-secret-xyz-987")
    assert row["kid"] == key.kid and set(row) == {"name", "kid", "created", "updated"}
    assert store.get("hf_token") == PLAIN and store.get("absent") is None
    assert [r["name"] for r in store.listing()] == ["hf_token", "oidc_client_secret"]
    assert store.resolve("secret:oidc_client_secret") == "client-secret-xyz-987"
    assert store.resolve("plain-value") == "plain-value"
    with pytest.raises(SecretError, match="not stored"):
        store.resolve("secret:nope")
    with pytest.raises(SecretError, match="secret name"):
        store.set("bad name!", "x")
    assert store.verify() == 2
    store.close()
    data = _db_bytes(tmp_path)
    assert PLAIN.encode() not in data and b"client-secret-xyz-987" not in data and b"ifxenc:v1:" in data
    # Tampering with the stored ciphertext, or moving it under another name, is a one-line error.
    with sqlite3.connect(tmp_path / "state.db") as db:
        (value,) = db.execute("SELECT value FROM secrets WHERE name = 'hf_token'").fetchone()
        db.execute("UPDATE secrets SET value = ? WHERE name = 'hf_token'", (value[:-6] + "AAAAAA",))
    store = SecretStore(tmp_path / "state.db", key)
    with pytest.raises(SecretError, match="'hf_token': the ciphertext fails authentication"):
        store.get("hf_token")
    with pytest.raises(SecretError, match="hf_token"):
        store.verify()
    store.delete("hf_token")
    with pytest.raises(SecretError, match="no secret"):
        store.delete("hf_token")
    with pytest.raises(SecretError, match=f"encrypted with master key {key.kid}"):
        SecretStore(tmp_path / "state.db", _key()).get("oidc_client_secret")
    with pytest.raises(SecretError, match="needs the master key"):
        SecretStore(tmp_path / "state.db", None).set("x", "y")


def test_rotation_re_encrypts_everything_in_one_transaction(tmp_path: Path) -> None:
    old, new = _key(), _key()
    store = SecretStore(tmp_path / "state.db", old)
    values = {f"s{i}": f"value-{i}-{os.urandom(4).hex()}" for i in range(5)}
    for name, value in values.items():
        store.set(name, value)
    assert store.rotate(new) == 5
    assert {r["kid"] for r in store.listing()} == {new.kid}
    reopened = SecretStore(tmp_path / "state.db", new)
    assert {n: reopened.get(n) for n in values} == values
    with pytest.raises(SecretError, match=f"encrypted with master key {new.kid}, the configured key is {old.kid}"):
        SecretStore(tmp_path / "state.db", old).get("s0")
    # A row the current key cannot open stops the rotation, and nothing moves.
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE secrets SET value = ? WHERE name = 's3'", (encrypt_text(old, "x", "s3"),))
    third = _key()
    with pytest.raises(SecretError, match="'s3' was encrypted"):
        reopened.rotate(third)
    assert {r["kid"] for r in reopened.listing() if r["name"] != "s3"} == {new.kid}
    assert reopened.get("s0") == values["s0"]


def test_hub_token_and_start_up_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_master_key()
    monkeypatch.setenv("INFERFLUX_MASTER_KEY", key)
    monkeypatch.setenv("INFERFLUX_HOME", str(tmp_path))
    config = load_config(environ={})
    assert hub_token(tmp_path) is None and check_secrets(config) == 0  # no state.db: nothing, nothing created
    assert not (tmp_path / "state.db").exists()
    SecretStore(tmp_path / "state.db", parse_master_key(key, "t")).set("hf_token", PLAIN)
    assert hub_token(tmp_path) == PLAIN and check_secrets(config) == 1
    monkeypatch.setenv("INFERFLUX_MASTER_KEY", generate_master_key())
    with pytest.raises(SecretError, match="was encrypted with master key"):
        check_secrets(config)
    monkeypatch.delenv("INFERFLUX_MASTER_KEY")
    with pytest.raises(SecretError, match="no master key is configured"):
        check_secrets(config)


def test_hub_pulls_read_the_stored_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf://` pulls open the stored hf_token before any download: a wrong key stops the pull with its one line."""
    from inferflux.store import StoreError
    from inferflux.store.model_store import ModelStore

    key = generate_master_key()
    SecretStore(tmp_path / "state.db", parse_master_key(key, "t")).set("hf_token", PLAIN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("INFERFLUX_MASTER_KEY", generate_master_key())
    with pytest.raises(SecretError, match="'hf_token' was encrypted with master key"):
        ModelStore(tmp_path).pull("hf://org/repo/model.gguf")
    monkeypatch.setenv("INFERFLUX_MASTER_KEY", key)
    with pytest.raises(StoreError, match="download failed") as err:  # offline here: the token opened, then no hub
        ModelStore(tmp_path).pull("hf://org/repo/model.gguf")
    assert PLAIN not in str(err.value)


def _cli(home: Path, *args: str, key: str | None, stdin: str | None = None, **env: str):
    environ = {k: v for k, v in os.environ.items() if k not in ("INFERFLUX_MASTER_KEY", "INFERFLUX_NEW_MASTER_KEY")}
    environ |= {"INFERFLUX_HOME": str(home), **env} | ({"INFERFLUX_MASTER_KEY": key} if key else {})
    return subprocess.run([sys.executable, "-m", "inferctl.cli", *args], input=stdin if stdin is not None else "",
                          capture_output=True, text=True, env=environ, timeout=120)


def test_cli_secrets_and_rotate_master_key(tmp_path: Path) -> None:
    key = _cli(tmp_path, "admin", "secrets", "genkey", key=None).stdout.strip()
    assert parse_master_key(key, "genkey")
    done = _cli(tmp_path, "admin", "secrets", "set", "hf_token", "--value-stdin", key=key, stdin=PLAIN + "\n")
    assert done.returncode == 0 and PLAIN not in done.stdout + done.stderr, done.stderr
    listing = _cli(tmp_path, "admin", "secrets", "list", key=key)
    assert listing.returncode == 0 and "hf_token" in listing.stdout and PLAIN not in listing.stdout
    assert PLAIN.encode() not in _db_bytes(tmp_path)
    assert SecretStore(tmp_path / "state.db", parse_master_key(key, "t")).get("hf_token") == PLAIN  # newline dropped
    # Usage errors exit 2; a secret with no master key exits 1 with one line.
    assert _cli(tmp_path, "admin", "secrets", "set", "x", key=key).returncode == 2  # stdin is not a terminal
    assert _cli(tmp_path, "admin", "rotate-master-key", key=key).returncode == 2
    missing = _cli(tmp_path, "admin", "secrets", "set", "y", "--value-stdin", key=None, stdin="v")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "master key" in missing.stderr
    # Rotation: every secret moves to the new key; the old one then fails with one line.
    new_file = tmp_path / "new.key"
    new_file.write_text(generate_master_key())
    rotated = _cli(tmp_path, "admin", "rotate-master-key", "--new-key-file", str(new_file), key=key)
    assert rotated.returncode == 0 and "re-encrypted 1 secret" in rotated.stdout, rotated.stderr
    new_kid = parse_master_key(new_file.read_text(), "t").kid
    assert new_kid in _cli(tmp_path, "admin", "secrets", "list", key=new_file.read_text()).stdout
    # Run again with the same two keys (as after a crash): what is under the new key is proven and kept.
    again = _cli(tmp_path, "admin", "rotate-master-key", "--new-key-file", str(new_file), key=key)
    assert again.returncode == 0 and "re-encrypted 0 secret(s)" in again.stdout, again.stderr
    assert "(1 already under it)" in again.stdout
    stranger = _cli(tmp_path, "admin", "rotate-master-key", key=generate_master_key(),
                    INFERFLUX_NEW_MASTER_KEY=generate_master_key())
    assert stranger.returncode == 1 and stranger.stderr.count("\n") == 1
    assert f"was encrypted with master key {new_kid}" in stranger.stderr
    env_rotated = _cli(tmp_path, "admin", "rotate-master-key", key=new_file.read_text(),
                       INFERFLUX_NEW_MASTER_KEY=generate_master_key())
    assert env_rotated.returncode == 0, env_rotated.stderr
    gone = _cli(tmp_path, "admin", "secrets", "delete", "nope", key=key)
    assert gone.returncode == 1 and "no secret" in gone.stderr


def test_server_refuses_to_start_with_the_wrong_master_key(tmp_path: Path, tiny_model) -> None:
    key = generate_master_key()
    SecretStore(tmp_path / "state.db", parse_master_key(key, "t")).set("hf_token", PLAIN)
    model = str(tiny_model("llama"))
    # (No key at all is the same check: test_hub_token_and_start_up_check; each serve start costs its imports.)
    done = _cli(tmp_path, "serve", model, "--port", str(free_port()), key=generate_master_key())
    assert done.returncode == 1, done.stderr
    assert "was encrypted with master key" in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert PLAIN not in done.stderr


def _peft_folder(path: Path) -> dict[str, bytes]:
    """A PEFT adapter folder as the store sees it (the manifest reads adapter_config.json; the weights are
    carried as bytes): returns its files' contents."""
    import numpy as np
    from safetensors.numpy import save

    path.mkdir()
    files = {"adapter_config.json": b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}',
             "adapter_model.safetensors": save({"base_model.model.layers.0.q_proj.lora_A.weight":
                                                np.random.default_rng(0).standard_normal((4, 64), np.float32)})}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def test_rotation_re_seals_encrypted_adapters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`adapter pull --encrypt`, rotate, load: the files move to the new key (atomically, resumably), the
    secrets table too; the old key no longer opens either."""
    from inferflux.store.adapters import AdapterStore, open_adapter

    home, old, new = tmp_path / "home", generate_master_key(), generate_master_key()
    files = _peft_folder(tmp_path / "lora")
    pulled = _cli(home, "adapter", "pull", str(tmp_path / "lora"), "--name", "enc", "--encrypt", key=old)
    assert pulled.returncode == 0, pulled.stderr
    SecretStore(home / "state.db", _key(old)).set("hf_token", PLAIN)
    AdapterStore(home).pull(tmp_path / "lora", "plain")  # not encrypted: rotation leaves it alone
    stored = {p.name: p.read_bytes() for p in (home / "adapters" / "enc" / "files").iterdir()}
    assert all(key_id_of(b) == _key(old).kid for b in stored.values()) and files["adapter_model.safetensors"] \
        not in b"".join(stored.values())

    def load(key: str):
        monkeypatch.setenv("INFERFLUX_MASTER_KEY", key)
        monkeypatch.setenv("INFERFLUX_HOME", str(home))
        return open_adapter("enc", load_config(environ={}))

    # A rotation cut short: one file already re-sealed under the new key, the other not, the table untouched.
    first = home / "adapters" / "enc" / "files" / "adapter_config.json"
    name = f"adapter:enc/adapter_config.json:sha256:{hashlib.sha256(files['adapter_config.json']).hexdigest()}:" \
        "signed-by:-"
    first.write_bytes(encrypt_bytes(_key(new), decrypt_bytes(_key(old), first.read_bytes(), name), name))
    with pytest.raises(SecretError, match="was encrypted with master key"):
        load(old)  # mixed keys: a clear one-line refusal, never half an adapter
    rotated = _cli(home, "admin", "rotate-master-key", key=old, INFERFLUX_NEW_MASTER_KEY=new)
    assert rotated.returncode == 0, rotated.stderr
    assert "re-encrypted 1 secret(s) and 1 adapter file(s)" in rotated.stdout and "(1 already under it)" in \
        rotated.stdout, rotated.stdout
    assert load(new).files == files
    assert AdapterStore(home).manifest("enc")["encrypted"] == _key(new).kid
    assert AdapterStore(home).manifest("plain")["encrypted"] is None
    assert not [p for p in (home / "adapters" / "enc" / "files").iterdir() if p.name not in files]  # no temp files
    with pytest.raises(SecretError, match=f"was encrypted with master key {_key(new).kid}, the configured key is "
                                          f"{_key(old).kid}") as err:
        load(old)
    assert "\n" not in str(err.value)
    assert SecretStore(home / "state.db", _key(new)).get("hf_token") == PLAIN
    # A tampered adapter file stops the rotation before the secrets table moves.
    newer = generate_master_key()
    target = home / "adapters" / "enc" / "files" / "adapter_model.safetensors"
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 1
    target.write_bytes(bytes(blob))
    broken = _cli(home, "admin", "rotate-master-key", key=new, INFERFLUX_NEW_MASTER_KEY=newer)
    assert broken.returncode == 1 and "fails authentication" in broken.stderr, broken.stderr
    assert {r["kid"] for r in SecretStore(home / "state.db", _key(new)).listing()} == {_key(new).kid}
