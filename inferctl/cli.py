"""`inferctl` (also installed as `inferflux`): the command line.

Commands are methods of `InferCtl`; `fire` turns them into sub-commands and
flags. Every error a user can cause ends as one line on stderr and exit
status 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import fire

from inferflux.errors import InferFluxError


class InferCtl:
    """InferFlux: run GGUF and safetensors models.

    Commands: serve, run, chat, status, pull, list, show, rm, convert, replay, make-demo-model, bench.
    """

    def bench(self) -> None:
        """Benchmarks (`inferctl bench NAME --help`): serving, decode, side-by-side, make-model, throughput, ..."""
        from inferctl.bench_cmds import usage

        print(usage())

    def convert(self, src: str, dst: str, type: str = "F16", name: str | None = None) -> None:
        """Convert a Hugging Face safetensors folder SRC to a GGUF file DST.

        --type: F32, F16, BF16, Q8_0, Q4_0, Q4_K or Q6_K (default F16).
        """
        from convert.hf_to_gguf import convert_hf_to_gguf

        def progress(tensor: str, done: int, total: int) -> None:
            if sys.stderr.isatty():
                print(f"\r[{done}/{total}] {tensor:<40}", end="", file=sys.stderr, flush=True)

        out = convert_hf_to_gguf(src, dst, str(type), name=name, progress=progress)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {str(type).upper()})")

    def show(self, model: str, json: bool = False) -> None:  # noqa: A002 - the flag is --json
        """Describe a model (store name, GGUF file or folder): architecture, size, context, quantization."""
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.show(open_store(), str(model), as_json=json)

    def pull(self, source: str, name: str | None = None, quantize: str | None = None) -> None:
        """Add a model to the store from SOURCE: a GGUF file, a safetensors folder, ollama://NAME:TAG, hf://ORG/REPO.

        --quantize Q4_K|Q6_K|Q8_0|F16 converts a safetensors folder to GGUF at that type; --name NAME[:TAG].
        """
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.pull(open_store(), str(source), name, quantize)

    def list(self) -> None:  # noqa: A003 - the command is `inferctl list`
        """Models in the store: name, size, format, quantization, modified."""
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.list_models(open_store())

    def rm(self, name: str) -> None:
        """Remove a model from the store (blobs no other model uses are deleted)."""
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.rm(open_store(), str(name))

    def serve(self, model: str, host: str | None = None, port: int | None = None, config: str | None = None,
              served_model_name: str | None = None, ollama_port: int | None = None) -> None:
        """Serve MODEL (a GGUF file or Hugging Face folder) over the OpenAI API until SIGTERM/Ctrl-C.

        --config FILE: a YAML config; --set section.key=value (repeatable) overrides any key.
        """
        from inferflux.config import load_config
        from inferflux.store import open_store

        overrides = dict(_SET_OVERRIDES)
        if host is not None:
            overrides["server.host"] = host
        if port is not None:
            overrides["server.port"] = port
        if ollama_port is not None:
            overrides["server.ollama_port"] = ollama_port
        if served_model_name is not None:
            overrides["server.served_model_name"] = served_model_name
        elif not Path(str(model)).expanduser().exists():
            overrides["server.served_model_name"] = str(model)  # a store name is what clients should send
        settings = load_config(config, overrides)  # a bad value fails here, before JAX is imported
        path = open_store(settings.home_path).resolve(str(model))
        from inferflux.server.serve import serve

        sys.exit(serve(str(path), settings, config))

    def run(self, model: str | None = None, prompt: str | None = None, url: str | None = None,
            temperature: float = 0.8, max_tokens: int = 256, transcript: str | None = None,
            config: str | None = None) -> None:
        """Chat with MODEL (store name or path): one streamed answer with --prompt, else an interactive chat.

        Uses a running server when --url or INFERFLUX_URL is given (MODEL then picks the server's model),
        else runs the engine in this process. In the chat: /bye, /clear, /set temperature 0.2,
        /set max_tokens N, /save FILE; Ctrl-C cancels the current answer. --transcript FILE records every
        turn as JSON lines with timings (see `inferctl replay`).
        """
        from inferctl import chat_cmds

        url = url or os.environ.get("INFERFLUX_URL")
        if url:
            backend = chat_cmds.backend_for(url, None if model is None else str(model))
        else:
            if model is None:
                raise ValueError("name a model (`inferctl list` shows the stored ones), or give --url")
            from inferflux.config import load_config
            from inferflux.store import open_store

            settings = load_config(config, dict(_SET_OVERRIDES))
            path = open_store(settings.home_path).resolve(str(model))
            backend = chat_cmds.backend_for(str(path), None, settings)
        chat_cmds.run(backend, None if prompt is None else str(prompt), temperature, max_tokens, transcript)

    def chat(self, url: str | None = None, model: str | None = None, temperature: float = 0.8,
             max_tokens: int = 256, transcript: str | None = None) -> None:
        """Interactive chat against any OpenAI-compatible server (--url, or INFERFLUX_URL)."""
        from inferctl import chat_cmds

        url = url or os.environ.get("INFERFLUX_URL")
        if not url:
            raise ValueError("give the server with --url http://HOST:PORT (or set INFERFLUX_URL)")
        chat_cmds.run(chat_cmds.backend_for(url, model), None, temperature, max_tokens, transcript)

    def replay(self, file: str, speed: float = 1.0) -> None:
        """Play a chat transcript back with its original pacing (--speed 2 plays twice as fast)."""
        from inferctl import chat_cmds

        chat_cmds.replay(str(file), float(speed))

    def status(self, url: str | None = None, json: bool = False, window: float = 1.0) -> None:  # noqa: A002
        """Health, readiness, models, queue, tokens/s and KV-cache use of a running server, as a table.

        --url (default INFERFLUX_URL or http://127.0.0.1:8080); tokens/s is measured over --window seconds.
        """
        from inferctl import chat_cmds

        target = url or os.environ.get("INFERFLUX_URL") or "http://127.0.0.1:8080"
        chat_cmds.status(target, as_json=json, window=float(window))

    def make_demo_model(self, out: str | None = None, name: str = "demo") -> None:
        """Build a tiny random-weight Llama model with a trained tokenizer and a chat template.

        Into the store as NAME (default "demo"), or into folder --out DIR. Its answers are gibberish:
        it exists so every command can be tried in a minute without downloading anything.
        """
        if out is not None:
            from convert.demo_model import make_demo_model

            path = make_demo_model(Path(out))
            print(f"wrote {path} (random weights: it produces gibberish)")
            return
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.make_demo(open_store(), str(name))


def _json_dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


# `--set section.key=value` may repeat; fire keeps only the last, so they are taken out of argv first.
_SET_OVERRIDES: list[tuple[str, str]] = []


def _take_set_flags(argv: list[str]) -> list[str]:
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--set" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--set="):
            value, i = arg[len("--set="):], i + 1
        else:
            rest.append(arg)
            i += 1
            continue
        if "=" not in value:
            raise ValueError(f"--set {value!r}: expected section.key=value")
        key, _, val = value.partition("=")
        _SET_OVERRIDES.append((key.strip(), val.strip()))
    return rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `inferctl` and `inferflux` console scripts."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench"]:  # argparse programs: they take their own flags, --set included
        from inferctl.bench_cmds import bench

        return bench(raw[1:])
    try:
        args = _take_set_flags(raw)
        fire.Fire(InferCtl, command=args, name="inferctl")
    except (InferFluxError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        print(f"inferctl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("inferctl: interrupted", file=sys.stderr)
        return 130
    except fire.core.FireExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
