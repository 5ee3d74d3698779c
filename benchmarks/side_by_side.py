"""The same GGUF file served by llama.cpp (its own `llama-server`, or llama-cpp-python's server) and by InferFlux,
benchmarked in one run.

    benchmarks/build_llama_server.sh /tmp/llama-build    # once: llama-server from llama-cpp-python's sources
    python -m benchmarks.side_by_side --make tinyllama-1.1b:Q4_K --num-prompts 16 --input-len 512 \\
        --output-len 128 --concurrency 1,8 --llama-server /tmp/llama-build/bin/llama-server --parallel 8 \\
        --json /tmp/side_by_side.json

The llama.cpp side is llama.cpp's C++ `llama-server` when `--llama-server PATH` is given (issue 15 compares against
it: built by benchmarks/build_llama_server.sh from the llama.cpp tree vendored in the installed llama-cpp-python's
sdist, with the same ISA flags as llama-cpp-python's own build), else `python -m llama_cpp.server`.

For every concurrency level, each server is started as a subprocess on a free loopback port (logs to files in
`--log-dir`, not the console), waited for (InferFlux: `GET /readyz`; llama-server: `GET /health`, 200 once the
model is loaded; llama-cpp-python: `GET /v1/models`), driven by `benchmarks.bench_serving` with the same prompts
and output lengths, and stopped (SIGTERM, then kill). The order alternates between levels (`--order alternate`,
default: InferFlux first at the first level, llama.cpp first at the next, ...), so neither server always runs on a
machine still warm (or hot) from the other.

Fair settings: both greedy (`temperature: 0`), both with `ignore_eos` semantics (`ignore_eos: true` for InferFlux
and llama-server, `min_tokens = max_tokens` for llama-cpp-python) so every request produces exactly its output
length, both with the same context length per sequence (`--ctx`, default: the longest prompt + output, rounded up
to 256) and prompt batch (`--n-batch` = InferFlux's `runtime.max_num_batched_tokens` = llama.cpp's n_batch and
n_ubatch, default 512). InferFlux's KV pool (`runtime.num_pages`, `runtime.max_num_seqs`) is sized for
`concurrency` sequences of `--ctx` tokens at each level. llama-server gets `--parallel` slots (`-np`, default 8) of
`--ctx` tokens each (its `-c` is the total context the slots share, so it is given ctx * parallel) and batches
them continuously, as InferFlux does. llama-cpp-python's KV cache holds one sequence of `--ctx`: it serves one
request at a time (its server holds a lock per model) and gets `interrupt_requests=False` (by default it ends a
running stream when another request arrives). llama.cpp gets `--threads` (default: every core) for generation
and batches; InferFlux's XLA CPU backend uses every core too.
Each server gets `--warmup` untimed requests first (default: the concurrency), so InferFlux's shape buckets are
compiled (and stored in its persistent XLA cache) before the timed pass.

`--make SHAPE:QTYPE` writes a random-weight model with `benchmarks.make_model.make_gguf` to
`--models-dir/SHAPE-QTYPE.gguf` (default /tmp/bench-models), or reuses the file already there.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from benchmarks import bench_serving
from benchmarks.bench_serving import BenchRequest

INFERFLUX = "inferflux"
LLAMA_CPP = "llama.cpp"
SERVERS = (INFERFLUX, LLAMA_CPP)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSpec:
    """How to start one server: its command line (with `{port}` filled in) and its readiness path."""

    name: str
    argv: list[str]
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)


def inferflux_spec(model: Path, ctx: int, n_batch: int, max_seqs: int, page_size: int = 16,
                   extra_sets: Sequence[str] = ()) -> ServerSpec:
    """`inferctl serve` with a KV cache sized for `max_seqs` sequences of `ctx` tokens."""
    num_pages = max_seqs * math.ceil(ctx / page_size) + 1 + 8  # page 0 is reserved; a little slack
    sets = [f"runtime.max_model_len={ctx}", f"runtime.page_size={page_size}", f"runtime.num_pages={num_pages}",
            f"runtime.max_num_batched_tokens={n_batch}", f"runtime.max_num_seqs={max(max_seqs, 1)}",
            "server.drain_seconds=5", *extra_sets]
    argv = [sys.executable, "-m", "inferctl.cli", "serve", str(model), "--port", "{port}",
            "--served-model-name", "model"]
    for item in sets:
        argv += ["--set", item]
    return ServerSpec(INFERFLUX, argv, "/readyz")


def llama_server_spec(binary: Path, model: Path, ctx: int, n_batch: int, threads: int, parallel: int,
                      extra_args: Sequence[str] = ()) -> ServerSpec:
    """llama.cpp's own C++ `llama-server`: `parallel` slots of `ctx` tokens (its `-c` is the slots' total)."""
    argv = [str(binary), "-m", str(model), "--alias", "model", "--host", "127.0.0.1", "--port", "{port}",
            "-t", str(threads), "-tb", str(threads), "-c", str(ctx * parallel), "-np", str(parallel),
            "-b", str(n_batch), "-ub", str(n_batch), "-ngl", "0", "--no-webui", *extra_args]
    return ServerSpec(LLAMA_CPP, argv, "/health")


def llama_cpp_spec(model: Path, ctx: int, n_batch: int, threads: int, extra_args: Sequence[str] = ()) -> ServerSpec:
    """llama-cpp-python's OpenAI server (`python -m llama_cpp.server`)."""
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "model",
            "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", str(ctx), "--n_batch", str(n_batch),
            "--n_ubatch", str(n_batch), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--interrupt_requests", "False", "--n_gpu_layers", "0", *extra_args]
    return ServerSpec(LLAMA_CPP, argv, "/v1/models")


class ServerProcess:
    """A server subprocess on a free loopback port; output goes to `log_path`."""

    def __init__(self, spec: ServerSpec, log_path: Path, start_timeout: float = 900.0) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.argv = [a.replace("{port}", str(self.port)) for a in spec.argv]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def start(self) -> None:
        """Start and wait until ready; raises RuntimeError (with the log's tail) if it exits or times out."""
        start = time.perf_counter()
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(self.argv) + "\n")
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.spec.env}, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with status {self.proc.returncode} while starting:\n"
                                   + self.log_tail())
            try:
                if httpx.get(self.url + self.spec.ready_path, timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - start
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.spec.name} was not ready after {self.start_timeout:.0f} s:\n" + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def recount(requests: list[BenchRequest], base_url: str, model: str | None) -> list[BenchRequest]:
    """The prompts with token counts from this server's tokenize route (unchanged where it has none)."""
    async with httpx.AsyncClient() as client:
        out = []
        for req in requests:
            count = await bench_serving.token_count(client, base_url, model, req.prompt)
            out.append(req if count is None else replace(req, prompt_len=count, prompt_len_source="tokenize"))
        return out


@functools.cache
def gguf_token_counter(model: Path) -> Callable[[str], int]:
    """Token count of a completion prompt (BOS included) by llama.cpp's tokenizer of `model` (vocabulary only)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    return lambda text: len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))


def resolve_model(model: str | None, make: str | None, models_dir: Path) -> Path:
    if model:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"{model}: no such GGUF file")
        return path
    if not make or ":" not in make:
        raise ValueError("give --model FILE.gguf or --make SHAPE:QTYPE (e.g. tinyllama-1.1b:Q4_K)")
    shape, qtype = make.split(":", 1)
    path = models_dir / f"{shape}-{qtype.upper()}.gguf"
    if path.is_file():
        return path
    from benchmarks.make_model import make_gguf  # written alongside; imported only when needed

    print(f"making {path} ...", file=sys.stderr, flush=True)
    return Path(make_gguf(shape, qtype, path))


def default_ctx(input_len: int, output_len: int, dist: str) -> int:
    scale = 1.5 if dist == "uniform" else 1.0
    need = int(input_len * scale) + int(output_len * scale) + 16
    return int(math.ceil(need / 256) * 256)


def order_for(level: int, order: str, servers: Sequence[str]) -> list[str]:
    servers = list(servers)
    if order == "alternate" and level % 2 == 1:
        return servers[::-1]
    if order == "llama-first":
        return sorted(servers, key=lambda s: s != LLAMA_CPP)
    if order == "inferflux-first":
        return sorted(servers, key=lambda s: s != INFERFLUX)
    return servers


def run_side_by_side(model: Path, *, concurrency: Sequence[int] = (1, 8), num_prompts: int = 16,
                     input_len: int = 512, output_len: int = 128, dist: str = "fixed", seed: int = 0,
                     endpoint: str = "completions", ctx: int | None = None, n_batch: int = 512,
                     threads: int | None = None, warmup: int | None = None, order: str = "alternate",
                     servers: Sequence[str] = SERVERS, inferflux_sets: Sequence[str] = (),
                     llama_args: Sequence[str] = (), llama_server: Path | None = None, parallel: int = 8,
                     log_dir: Path | None = None, start_timeout: float = 900.0,
                     request_timeout: float = 1800.0, progress: bool = True) -> dict[str, Any]:
    """Benchmark `servers` on `model` at each concurrency level; returns {"config", "runs": [...], "ratios"}.

    The llama.cpp side is the `llama_server` binary with `parallel` slots when given, else llama-cpp-python."""
    ctx = ctx or default_ctx(input_len, output_len, dist)
    threads = threads or os.cpu_count() or 1
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="side-by-side-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # InferFlux's KV pool is sized per level for `concurrency` sequences of `ctx` tokens (llama-server's for
    # `parallel` slots of `ctx`, llama-cpp-python's for one): on CPU InferFlux's decode steps currently cost time
    # in proportion to its pool's size.
    specs = {(INFERFLUX, c): inferflux_spec(model, ctx, n_batch, c, extra_sets=inferflux_sets) for c in concurrency}
    if llama_server is not None:
        spec = llama_server_spec(Path(llama_server), model, ctx, n_batch, threads, parallel, llama_args)
    else:
        spec = llama_cpp_spec(model, ctx, n_batch, threads, llama_args)
    specs.update({(LLAMA_CPP, c): spec for c in concurrency})
    config = {"model": str(model), "model_bytes": model.stat().st_size, "concurrency": list(concurrency),
              "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "dist": dist,
              "seed": seed, "endpoint": endpoint, "ctx": ctx, "n_batch": n_batch, "threads": threads,
              "order": order, "log_dir": str(log_dir), "cpu_count": os.cpu_count(),
              "llama_cpp_server": "llama-server" if llama_server is not None else "llama-cpp-python",
              "llama_server": str(llama_server) if llama_server is not None else None,
              "parallel": parallel if llama_server is not None else 1,
              "commands": {f"{name} c={c}": " ".join(spec.argv) for (name, c), spec in specs.items()}}
    # The same prompts for every server, calibrated with llama.cpp's tokenizer of the file (InferFlux's gives the
    # same ids); each server then recounts them with its own tokenize route.
    requests = asyncio.run(bench_serving.build_requests(
        None, num_prompts=num_prompts, input_len=input_len, output_len=output_len, dist=dist, seed=seed,
        tokenizer=gguf_token_counter(model)))
    runs: list[dict[str, Any]] = []
    for level, conc in enumerate(concurrency):
        for name in order_for(level, order, servers):
            label = f"{name} c={conc}"
            log_path = log_dir / f"{name.replace('.', '')}-c{conc}.log"
            server = ServerProcess(specs[name, conc], log_path, start_timeout)
            run: dict[str, Any] = {"server": name, "concurrency": conc, "log": str(log_path),
                                   "command": " ".join(server.argv)}
            try:
                server.start()
                run["startup_s"] = server.startup_s
                reqs = asyncio.run(recount(requests, server.url, "model"))
                run["prompt_len_mismatches"] = sum(a.prompt_len != b.prompt_len for a, b in zip(requests, reqs))
                result = bench_serving.benchmark(
                    server.url, "model", endpoint=endpoint, requests=reqs, input_len=input_len,
                    output_len=output_len, seed=seed, max_concurrency=conc, ignore_eos=True, temperature=0.0,
                    warmup=conc if warmup is None else warmup, timeout=request_timeout, label=label,
                    progress=progress, tokenizer=gguf_token_counter(model))
                run.update(result)
            except Exception as exc:  # noqa: BLE001 - a server that fails is reported, the others still run
                run["error"] = f"{type(exc).__name__}: {exc}"
                print(f"{label}: {run['error']}", file=sys.stderr)
            finally:
                stop_start = time.perf_counter()
                run["exit_status"] = server.stop()
                run["stop_s"] = time.perf_counter() - stop_start
            runs.append(run)
            if "error" not in run:
                print(bench_serving.format_table(run), file=sys.stderr)
    return {"config": config, "runs": runs, "ratios": ratios(runs)}


# (key in a run, title, higher is better)
COMPARED = [("output_throughput", "output tok/s", True), ("median_ttft_ms", "TTFT p50 ms", False),
            ("p99_ttft_ms", "TTFT p99 ms", False), ("median_tpot_ms", "TPOT p50 ms", False)]


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """InferFlux / llama.cpp for each compared metric, per concurrency level."""
    out = []
    for conc in sorted({r["concurrency"] for r in runs}):
        by = {r["server"]: r for r in runs if r["concurrency"] == conc}
        if INFERFLUX not in by or LLAMA_CPP not in by:
            continue
        item: dict[str, Any] = {"concurrency": conc}
        for key, _, _ in COMPARED:
            a, b = by[INFERFLUX].get(key), by[LLAMA_CPP].get(key)
            item[key] = a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None
        out.append(item)
    return out


def format_comparison(result: dict[str, Any]) -> str:
    """A markdown table: one row per (concurrency, server), then the InferFlux / llama.cpp ratio."""

    def f(value: Any, digits: int = 1) -> str:
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    head = ["conc", "server", "ok/failed", "req/s", "output tok/s", "total tok/s", "TTFT p50 ms", "TTFT p99 ms",
            "TPOT p50 ms", "ITL p50 ms", "E2E p50 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ratio_by = {r["concurrency"]: r for r in result["ratios"]}
    for conc in result["config"]["concurrency"]:
        for run in [r for r in result["runs"] if r["concurrency"] == conc]:
            if "error" in run:
                cells = [str(conc), run["server"], "error: " + run["error"].splitlines()[0][:80]] + [""] * 8
            else:
                cells = [str(conc), run["server"], f"{run['completed']}/{run['failed']}",
                         f(run["request_throughput"], 2), f(run["output_throughput"]),
                         f(run["total_token_throughput"]), f(run["median_ttft_ms"], 0), f(run["p99_ttft_ms"], 0),
                         f(run["median_tpot_ms"]), f(run["median_itl_ms"]), f(run["median_e2el_ms"], 0)]
            lines.append("| " + " | ".join(cells) + " |")
        if conc in ratio_by:
            r = ratio_by[conc]
            cells = [str(conc), "**InferFlux / llama.cpp**", "", "", f(r["output_throughput"], 2), "",
                     f(r["median_ttft_ms"], 2), f(r["p99_ttft_ms"], 2), f(r["median_tpot_ms"], 2), "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="GGUF file")
    source.add_argument("--make", metavar="SHAPE:QTYPE", help="random-weight model, e.g. tinyllama-1.1b:Q4_K")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/bench-models"),
                        help="where --make writes (and looks for) its files")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels (default 1,8)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dist", choices=["fixed", "uniform"], default="fixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--ctx", type=int, default=None, help="context length of both (default: fits the workload)")
    parser.add_argument("--n-batch", type=int, default=512,
                        help="llama.cpp n_batch/n_ubatch and InferFlux max_num_batched_tokens")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed requests per run (default: concurrency)")
    parser.add_argument("--order", choices=["alternate", "inferflux-first", "llama-first"], default="alternate")
    parser.add_argument("--servers", default=",".join(SERVERS), help="which to run (default both)")
    parser.add_argument("--set", dest="inferflux_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra InferFlux config override (repeatable)")
    parser.add_argument("--llama-arg", dest="llama_args", action="append", default=[],
                        help="extra argument for the llama.cpp server (repeatable), e.g. --llama-arg=-fa "
                             "--llama-arg=on for llama-server, --llama-arg=--flash_attn for llama_cpp.server")
    parser.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                        help="run llama.cpp's own llama-server binary (benchmarks/build_llama_server.sh builds "
                             "it) instead of python -m llama_cpp.server")
    parser.add_argument("--parallel", type=int, default=8,
                        help="llama-server slots (-np, default 8), each of --ctx tokens")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a new temporary folder)")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=1800.0)
    parser.add_argument("--json", help="write every run's full result and the ratios to this file")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every server started and answered every request."""
    args = parse_args(argv)
    model = resolve_model(args.model, args.make, args.models_dir)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        raise SystemExit(f"unknown servers: {', '.join(sorted(unknown))} (known: {', '.join(SERVERS)})")
    result = run_side_by_side(
        model, concurrency=[int(c) for c in args.concurrency.split(",")], num_prompts=args.num_prompts,
        input_len=args.input_len, output_len=args.output_len, dist=args.dist, seed=args.seed,
        endpoint=args.endpoint, ctx=args.ctx, n_batch=args.n_batch, threads=args.threads, warmup=args.warmup,
        order=args.order, servers=servers, inferflux_sets=args.inferflux_sets, llama_args=args.llama_args,
        llama_server=args.llama_server, parallel=args.parallel,
        log_dir=args.log_dir, start_timeout=args.start_timeout, request_timeout=args.request_timeout,
        progress=not args.no_progress)
    cfg = result["config"]
    print(f"model {cfg['model']} ({cfg['model_bytes'] / 1e6:.0f} MB), {cfg['num_prompts']} prompts, "
          f"{cfg['input_len']} in / {cfg['output_len']} out tokens ({cfg['dist']}), ctx {cfg['ctx']}, "
          f"{cfg['cpu_count']} CPUs, llama.cpp ({cfg['llama_cpp_server']}, {cfg['parallel']} slot(s)) threads "
          f"{cfg['threads']}, logs in {cfg['log_dir']}")
    print(format_comparison(result))
    if args.json:
        bench_serving.write_json(result, args.json)
    ok = all("error" not in r and r["failed"] == 0 and r["completed"] > 0 for r in result["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
