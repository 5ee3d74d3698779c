"""`inferctl` (also installed as `inferflux`): the command line.

Commands are methods of `InferCtl` and flags are their parameters; `inferctl/cli_args.py` reads the
command line against the method's signature (an unknown flag is an error before anything runs) and
renders `--help` from the docstrings' `Args:` sections. Every error a user can cause ends as one line
on stderr and a non-zero exit status (2 for a command line that does not parse, 1 for the rest),
never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from inferctl.cli_args import Command, Extra, UsageError, closest, command_help, main_help, parse
from inferflux.errors import InferFluxError

SET_FLAG = Extra("--set", "SECTION.KEY=VALUE",
                 "override a config key, repeatable (e.g. --set runtime.max_model_len=2048; "
                 "every key is in configs/default.yaml)")


class InferCtl:
    """InferFlux: serve and run GGUF and safetensors models over the OpenAI and Ollama APIs."""

    def __init__(self) -> None:
        self.overrides: list[tuple[str, str]] = []  # --set section.key=value, in order

    def serve(self, model: str, host: str | None = None, port: int | None = None, config: str | None = None,
              served_model_name: str | None = None, ollama_port: int | None = None,
              lmstudio_port: int | None = None, lora_modules: str | None = None) -> None:
        """Serve a model over the OpenAI and Ollama APIs until SIGTERM or Ctrl-C.

        Stored models other than MODEL are served too, by name, loading on first use.

        Args:
            model MODEL: a stored model's name, a GGUF file or a Hugging Face folder
            host HOST: address to listen on (default server.host, 127.0.0.1)
            port PORT: port to listen on (default server.port, 8080)
            config FILE: a YAML config file (keys as in configs/default.yaml)
            served_model_name NAME: the model id clients send (default: the store name, or the file's name)
            ollama_port PORT: also listen on this port, e.g. 11434, Ollama's (default off)
            lmstudio_port PORT: also listen on this port, e.g. 1234, LM Studio's (default off)
            lora_modules NAME=SOURCE,...: LoRA adapters to load at start (server.lora_modules; SOURCE a PEFT
                folder, a GGUF LoRA file or a stored adapter; a bare NAME is the stored adapter NAME)
        """
        from inferflux.config import load_config
        from inferflux.store import open_store

        overrides: dict[str, object] = dict(self.overrides)
        if host is not None:
            overrides["server.host"] = host
        if port is not None:
            overrides["server.port"] = port
        if ollama_port is not None:
            overrides["server.ollama_port"] = ollama_port
        if lmstudio_port is not None:
            overrides["server.lmstudio_port"] = lmstudio_port
        if lora_modules is not None:
            overrides["server.lora_modules"] = lora_modules
        if served_model_name is not None:
            overrides["server.served_model_name"] = served_model_name
        elif not Path(model).expanduser().exists():
            overrides["server.served_model_name"] = model  # a store name is what clients should send
        settings = load_config(config, overrides)  # a bad value fails here, before JAX is imported
        from inferflux.server.access import check_exposure

        check_exposure(settings)  # as must a reachable address without auth
        path = open_store(settings.home_path).resolve(model)
        from inferflux.server.serve import serve

        sys.exit(serve(str(path), settings, config))

    def run(self, model: str | None = None, prompt: str | None = None, url: str | None = None,
            temperature: float = 0.8, max_tokens: int = 256, transcript: str | None = None,
            config: str | None = None) -> None:
        """Chat with a model: one streamed answer to a prompt, else an interactive chat.

        Runs the engine in this process, or uses a running server when --url or INFERFLUX_URL is given
        (MODEL then picks one of the server's models; the first by default). In the chat: /bye,
        /clear, /set temperature 0.2, /set max_tokens N, /save FILE, /help; Ctrl-C cancels the
        current answer.

        Args:
            model MODEL: a stored model's name or a model path (with --url: the server's model id)
            prompt PROMPT: answer this once and exit, instead of chatting
            url URL: a running OpenAI-compatible server, e.g. http://127.0.0.1:8080
            temperature T: sampling temperature, 0 = greedy
            max_tokens N: longest answer, in tokens
            transcript FILE: append every turn to FILE as JSON lines with timings (see `inferctl replay`)
            config FILE: a YAML config file for the in-process engine
        """
        from inferctl import chat_cmds

        url = url or os.environ.get("INFERFLUX_URL")
        if url:
            if self.overrides or config is not None:
                raise ValueError(f"--set and --config apply to a model run in this process, not to the server "
                                 f"at {url}")
            backend = chat_cmds.backend_for(url, model)
        else:
            if model is None:
                raise ValueError("name a model (`inferctl list` shows the stored ones), or give --url")
            from inferflux.config import load_config
            from inferflux.store import open_store

            settings = load_config(config, dict(self.overrides))
            path = open_store(settings.home_path).resolve(model)
            shown = model if not Path(model).expanduser().exists() else path.name
            backend = chat_cmds.backend_for(str(path), None, settings, name=shown)
        chat_cmds.run(backend, prompt, temperature, max_tokens, transcript)

    def chat(self, url: str | None = None, model: str | None = None, temperature: float = 0.8,
             max_tokens: int = 256, transcript: str | None = None) -> None:
        """Interactive chat against any OpenAI-compatible server.

        Args:
            url URL: the server, e.g. http://127.0.0.1:8080 (default INFERFLUX_URL)
            model NAME: the server's model id (default: the first of /v1/models)
            temperature T: sampling temperature, 0 = greedy
            max_tokens N: longest answer, in tokens
            transcript FILE: append every turn to FILE as JSON lines with timings
        """
        from inferctl import chat_cmds

        url = url or os.environ.get("INFERFLUX_URL")
        if not url:
            raise ValueError("give the server with --url http://HOST:PORT (or set INFERFLUX_URL)")
        chat_cmds.run(chat_cmds.backend_for(url, model), None, temperature, max_tokens, transcript)

    def status(self, url: str | None = None, json: bool = False, window: float = 1.0) -> None:  # noqa: A002
        """Health, readiness, models, queue, tokens/s and KV-cache use of a running server.

        Args:
            url URL: the server (default INFERFLUX_URL, else http://127.0.0.1:8080)
            json: one JSON object instead of the table
            window SECONDS: measure tokens/s over this long; 0 reads the counters once
        """
        from inferctl import status_cmds

        target = url or os.environ.get("INFERFLUX_URL") or "http://127.0.0.1:8080"
        status_cmds.status(target, as_json=json, window=window)

    def pull(self, source: str, name: str | None = None, quantize: str | None = None) -> None:
        """Add a model to the store: a GGUF file, a safetensors folder, ollama://NAME or hf://ORG/REPO.

        Args:
            source SOURCE: a GGUF file, a safetensors folder, ollama://NAME[:TAG] (the local Ollama store)
                or hf://ORG/REPO[/FILE]
            name NAME[:TAG]: store it under this name (default: the file's or folder's name)
            quantize TYPE: convert a safetensors folder to GGUF at Q4_K, Q6_K, Q8_0, F16, F32, BF16 or Q4_0
        """
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.pull(open_store(), source, name, quantize)

    def list(self) -> None:  # noqa: A003 - the command is `inferctl list`
        """List the stored models: name, size, format, quantization, modified."""
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.list_models(open_store())

    def show(self, model: str, json: bool = False) -> None:  # noqa: A002 - the flag is --json
        """Describe a model: architecture, parameters, context, quantization, size, chat template.

        Reads headers only: nothing is loaded.

        Args:
            model MODEL: a stored model's name, a GGUF file or a model folder (sentence-transformers too)
            json: every fact as one JSON object
        """
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.show(open_store(), model, as_json=json)

    def rm(self, name: str) -> None:
        """Remove a stored model; blobs no other model uses are deleted.

        Args:
            name NAME[:TAG]: the stored model
        """
        from inferctl import store_cmds
        from inferflux.store import open_store

        store_cmds.rm(open_store(), name)

    def sign(self, path: str, key: str, signature: str | None = None) -> None:
        """Sign a model (file, folder or stored name) in the OpenSSF model-signing format.

        The signature is what `model_signing sign key` writes, so either tool verifies the other's.

        Args:
            path PATH: a GGUF file, a model folder, or a stored model's name
            key KEY.pem: the PEM private key (elliptic curve, e.g. `openssl ecparam -name prime256v1 -genkey`)
            signature FILE: where to write it (default: FILE.sig beside a file, model.sig inside a folder)
        """
        from inferctl.sign_cmds import sign

        sign(path, key, signature)

    def verify(self, path: str, key: str, signature: str | None = None) -> None:
        """Check a model's signature against a public key; exit 1 naming what does not match.

        Args:
            path PATH: a GGUF file, a model folder, or a stored model's name
            key PUB.pem: the signer's PEM public key (several: comma-separated)
            signature FILE: the signature (default: beside the model, or the one kept by `pull`)
        """
        from inferctl.sign_cmds import verify

        verify(path, key, signature)

    def convert(self, src: str, dst: str, type: str = "F16", name: str | None = None) -> None:  # noqa: A002
        """Convert a Hugging Face safetensors folder to a GGUF file.

        Args:
            src FOLDER: the safetensors folder (config.json, *.safetensors, tokenizer)
            dst FILE: the GGUF file to write
            type TYPE: F32, F16, BF16, Q8_0, Q4_0, Q4_K or Q6_K
            name NAME: general.name in the file's metadata (default: the folder's name)
        """
        from inferflux.convert.hf_to_gguf import convert_hf_to_gguf

        def progress(tensor: str, done: int, total: int) -> None:
            if sys.stderr.isatty():
                print(f"\r[{done}/{total}] {tensor:<40}", end="", file=sys.stderr, flush=True)

        out = convert_hf_to_gguf(src, dst, type, name=name, progress=progress)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {type.upper()})")

    def replay(self, file: str, speed: float = 1.0) -> None:
        """Play a chat transcript back with its original pacing.

        Args:
            file FILE: a transcript written by `run --transcript` or /save
            speed X: play X times as fast
        """
        from inferctl import chat_cmds

        chat_cmds.replay(file, speed)

    def make_demo_model(self, out: str | None = None, name: str = "demo", force: bool = False) -> None:
        """Build a tiny random-weight model (tokenizer, chat template) to try every command offline.

        Into the store as NAME, or into a folder with --out. Its answers are gibberish: it exists so
        everything can be tried in a minute without downloading anything.

        Args:
            out DIR: write the model folder here instead of storing it
            name NAME[:TAG]: the store name
            force: replace a stored model of that name, or write into a folder that holds another model
        """
        from inferctl import store_cmds

        if out is not None:
            store_cmds.make_demo_folder(Path(out), force=force)
            return
        from inferflux.store import open_store

        store_cmds.make_demo(open_store(), name, force=force)

    def admin(self) -> None:
        """Tenants and API keys: admin tenants create|list|delete, admin keys create|list|revoke."""
        from inferctl.admin_cmds import usage

        print(usage())

    def adapter(self) -> None:
        """LoRA adapters: adapter pull|list|show|rm|convert (the store), adapter load|unload (a server)."""
        from inferctl.adapter_cmds import usage

        print(usage())

    def bench(self) -> None:
        """Run a benchmark (serving, decode, side-by-side, ...); `inferctl bench --help` lists them."""
        from inferctl.bench_cmds import usage

        print(usage())


# The order `inferctl --help` lists them in. run's MODEL and PROMPT (as in `ollama run`) and the URL of chat and
# status may be given without their flags.
COMMANDS = [
    Command.of("serve", InferCtl.serve, extras=[SET_FLAG]),
    Command.of("run", InferCtl.run, positional=["model", "prompt"], extras=[SET_FLAG]),
    Command.of("chat", InferCtl.chat, positional=["url"]),
    Command.of("status", InferCtl.status, positional=["url"]),
    Command.of("pull", InferCtl.pull),
    Command.of("list", InferCtl.list),
    Command.of("show", InferCtl.show),
    Command.of("rm", InferCtl.rm),
    Command.of("sign", InferCtl.sign),
    Command.of("verify", InferCtl.verify),
    Command.of("convert", InferCtl.convert),
    Command.of("replay", InferCtl.replay),
    Command.of("make-demo-model", InferCtl.make_demo_model),
    Command.of("admin", InferCtl.admin),
    Command.of("bench", InferCtl.bench),
    Command.of("adapter", InferCtl.adapter),
]
_BY_NAME = {c.name: c for c in COMMANDS}


def _version() -> str:
    from inferflux import __version__

    return f"inferctl (InferFlux) {__version__}"


def _help() -> str:
    return main_help(COMMANDS, InferCtl.__doc__ or "", [("help", "show help for a command (inferctl help COMMAND)")])


def _split_set(values: list[str]) -> list[tuple[str, str]]:
    overrides = []
    for value in values:
        if "=" not in value:
            raise UsageError(f"--set {value!r}: expected section.key=value")
        key, _, val = value.partition("=")
        overrides.append((key.strip(), val.strip()))
    return overrides


def dispatch(argv: list[str]) -> int:
    """Run one command line; UsageError and the command's own errors propagate to `main`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(_version())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "help":
        if not rest:
            print(_help())
            return 0
        name, rest = rest[0], ["--help"]
    if name == "admin":  # admin GROUP VERB: sub-commands of their own
        from inferctl.admin_cmds import dispatch as admin

        return admin(rest)
    if name == "adapter":  # adapter VERB: sub-commands of their own
        from inferctl.adapter_cmds import dispatch as adapter

        return adapter(rest)
    if name == "bench":  # argparse programs: they take their own flags, --set and --help included
        from inferctl.bench_cmds import bench

        return bench(rest)
    command = _BY_NAME.get(name) or _BY_NAME.get(name.replace("_", "-"))
    if command is None:
        if name.startswith("-"):
            raise UsageError(f"unknown flag {name} (`inferctl --help` lists the commands)")
        guess = closest(name, _BY_NAME)
        hint = f"; did you mean {guess}?" if guess else ""
        raise UsageError(f"unknown command {name!r}{hint} (`inferctl --help` lists the commands)")
    flags = rest[:rest.index("--")] if "--" in rest else rest
    if "-h" in flags or "--help" in flags:
        print(command_help(command))
        return 0
    values, extras = parse(command, rest)
    ctl = InferCtl()
    ctl.overrides = _split_set(extras.get("--set", []))
    getattr(ctl, command.method.__name__)(**values)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `inferctl` and `inferflux` console scripts."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = dispatch(args)
        sys.stdout.flush()  # a closed pipe (`inferctl show demo | head`) surfaces here, not at exit
        return status
    except UsageError as exc:
        print(f"inferctl: error: {exc}", file=sys.stderr)
        return 2
    except (InferFluxError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _closed_pipe()
        print(f"inferctl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("inferctl: interrupted", file=sys.stderr)
        return 130


def _closed_pipe() -> int:
    """The reader of stdout left (`| head`): stop quietly, as `cat` does, with SIGPIPE's status.

    stdout is pointed at /dev/null so the interpreter's own flush at exit does not fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


if __name__ == "__main__":
    sys.exit(main())
