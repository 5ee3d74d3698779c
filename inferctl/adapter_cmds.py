"""`inferctl adapter pull|list|show|rm|convert|load|unload`: LoRA adapters in the store and on a running server.

pull/list/show/rm work on `$INFERFLUX_HOME/adapters/` (inferflux/store/adapters.py); load/unload call a server's
vLLM routes (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) at --url or INFERFLUX_URL, with --api-key or
INFERFLUX_API_KEY; convert writes a PEFT folder as a GGUF LoRA file (inferflux/formats/gguf_lora.py). Every
refusal is one line on stderr and exit status 1 (cli.py).
"""

from __future__ import annotations

import json as jsonlib
import os
from typing import Any

from inferctl.cli_args import Command, UsageError, closest, command_help, parse
from inferflux.errors import InferFluxError

DEFAULT_URL = "http://127.0.0.1:8080"


def _store() -> Any:
    from inferflux.config import load_config
    from inferflux.store.adapters import AdapterStore

    return AdapterStore(load_config().home_path)


class Adapter:
    """The `inferctl adapter` sub-commands."""

    def pull(self, source: str, name: str | None = None, encrypt: bool = False, force: bool = False) -> None:
        """Store a LoRA adapter (PEFT folder or GGUF LoRA file) under a name servers can load.

        With security.require_signed_models the source must be signed by a trusted key (its signature is
        kept); --encrypt stores it AES-256-GCM encrypted with the master key (decrypted in memory at load).

        Args:
            source PATH: a PEFT adapter folder or a GGUF LoRA file
            name NAME: store it under this name (default: the folder's or file's name, without .gguf)
            encrypt: encrypt the stored files with the master key (INFERFLUX_MASTER_KEY or security.master_key_file)
            force: replace a stored adapter of that name
        """
        from inferflux.config import load_config
        from inferflux.server.access.crypto import SecretError, load_master_key
        from inferflux.store.adapters import AdapterStore
        from inferflux.store.signing import verifier_from_config

        config = load_config()
        key = None
        if encrypt:
            key = load_master_key(config.security.master_key_file)
            if key is None:
                raise SecretError("--encrypt needs a master key: set INFERFLUX_MASTER_KEY or "
                                  "security.master_key_file (`inferctl admin secrets genkey` makes one)")
        manifest = AdapterStore(config.home_path).pull(source, name, verifier_from_config(config), key,
                                                       replace=force)
        notes = [n for n in ("encrypted" if manifest["encrypted"] else "",
                             "signature kept" if manifest["signed_by"] else "") if n]
        print(f"stored adapter {manifest['name']} ({manifest['format']}, rank {manifest['rank']}, "
              f"{manifest['size'] / 1e6:.2f} MB{', ' + ', '.join(notes) if notes else ''})")

    def list(self, json: bool = False) -> None:  # noqa: A002, A003 - the flag is --json, the command `list`
        """List the stored adapters: name, format, rank, size, encrypted, signed.

        Args:
            json: one JSON array of the manifests
        """
        rows = _store().list()
        if json:
            print(jsonlib.dumps(rows, indent=2))
            return
        if not rows:
            print("no adapters stored; add one with `inferctl adapter pull PATH`")
            return
        print(f"{'NAME':<24} {'FORMAT':<6} {'RANK':>4} {'SIZE':>10}  {'ENCRYPTED':<9}  SIGNED")
        for m in rows:
            print(f"{m['name']:<24} {m['format']:<6} {m['rank']:>4} {m['size'] / 1e6:>8.2f}MB  "
                  f"{'yes' if m['encrypted'] else 'no':<9}  {'yes' if m['signed_by'] else 'no'}")

    def show(self, name: str, json: bool = False) -> None:  # noqa: A002 - the flag is --json
        """Describe a stored adapter: format, rank, alpha, targets, source, files, encryption, signature.

        Args:
            name NAME: the stored adapter
            json: the manifest as one JSON object
        """
        manifest = _store().manifest(name)
        if json:
            print(jsonlib.dumps(manifest, indent=2))
            return
        for field in ("name", "format", "rank", "alpha", "targets", "architecture", "base_model", "source",
                      "created", "size", "encrypted", "signed_by"):
            if field in manifest:
                print(f"{field:<13} {manifest[field]}")
        for row in manifest["files"]:
            print(f"file          {row['name']} ({row['size']} bytes, sha256 {row['sha256'][:16]}...)")

    def rm(self, name: str) -> None:
        """Remove a stored adapter.

        Args:
            name NAME: the stored adapter
        """
        freed = _store().rm(name)
        print(f"removed adapter {name} ({freed / 1e6:.2f} MB)")

    def convert(self, src: str, dst: str, base: str, type: str = "F32") -> None:  # noqa: A002
        """Write a PEFT adapter folder as a GGUF LoRA file (llama.cpp's format: llama.cpp and InferFlux load it).

        Args:
            src FOLDER: the PEFT adapter folder (adapter_config.json, adapter_model.safetensors)
            dst FILE: the GGUF file to write
            base MODEL: the base model (a Hugging Face folder, a GGUF file or a stored model's name)
            type TYPE: F32, F16, BF16 or Q8_0
        """
        from inferflux.formats.gguf_lora import convert_peft_to_gguf
        from inferflux.store import open_store

        out = convert_peft_to_gguf(src, open_store().resolve(base), dst, type)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {type.upper()})")

    def load(self, name: str, source: str | None = None, url: str | None = None, api_key: str | None = None) -> None:
        """Load an adapter into a running server's model (vLLM's /v1/load_lora_adapter).

        Args:
            name NAME: the adapter's model name on the server
            source SOURCE: a path on the server or a stored adapter's name (default: the stored adapter NAME)
            url URL: the server (default INFERFLUX_URL, else http://127.0.0.1:8080)
            api_key KEY: a models:write key (default INFERFLUX_API_KEY)
        """
        _call(url, api_key, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": source or name})
        print(f"loaded adapter {name}")

    def unload(self, name: str, url: str | None = None, api_key: str | None = None) -> None:
        """Unload an adapter from a running server; requests using it finish first.

        Args:
            name NAME: the adapter's model name on the server
            url URL: the server (default INFERFLUX_URL, else http://127.0.0.1:8080)
            api_key KEY: a models:write key (default INFERFLUX_API_KEY)
        """
        _call(url, api_key, "/v1/unload_lora_adapter", {"lora_name": name})
        print(f"unloaded adapter {name}")


def _call(url: str | None, api_key: str | None, path: str, body: dict[str, Any]) -> None:
    import httpx

    base = (url or os.environ.get("INFERFLUX_URL") or DEFAULT_URL).rstrip("/")
    key = api_key or os.environ.get("INFERFLUX_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.post(base + path, json=body, headers=headers, timeout=300.0)
    except httpx.HTTPError as exc:
        raise InferFluxError(f"{base}: cannot reach the server ({exc})") from None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise InferFluxError(f"{base}{path}: {response.status_code} {message}")


VERBS = ("pull", "list", "show", "rm", "convert", "load", "unload")
COMMANDS = [Command.of(f"adapter {verb}", getattr(Adapter, verb)) for verb in VERBS]
_BY_NAME = {c.name: c for c in COMMANDS}


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    return "\n".join(f"  inferctl {c.name:<{width}}  {c.summary}" for c in COMMANDS)


def dispatch(argv: list[str]) -> int:
    """`inferctl adapter VERB ...`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = f"adapter {argv[0]}"
    command = _BY_NAME.get(name)
    if command is None:
        guess = closest(name, _BY_NAME)
        raise UsageError(f"unknown command {name!r}" + (f"; did you mean {guess}?" if guess else "")
                         + " (`inferctl adapter --help` lists them)")
    rest = argv[1:]
    if "-h" in rest or "--help" in rest:
        print(command_help(command))
        return 0
    values, _ = parse(command, rest)
    getattr(Adapter(), command.method.__name__)(**values)
    return 0
