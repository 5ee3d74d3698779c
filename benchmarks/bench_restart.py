"""Restart cost: a cold start (empty xla-cache) against a warm one (the cache a previous start left), and the
first request after /readyz; optionally, loading the prepared weights from an orbax checkpoint against the GGUF.

Run from the repository root, e.g.
    M=/tmp/bench-models/tinyllama-1.1b-Q4_K_M.gguf
    python -m benchmarks.make_model --shape tinyllama-1.1b --qtype Q4_K_M --out $M
    python -m benchmarks.bench_restart --model $M --orbax --json restart.json
    python -m benchmarks.bench_restart --model $M --orbax --no-serve        # the orbax comparison only

What it does (serve): starts `inferctl serve MODEL --set runtime.warmup=true` (as the Helm chart and the images
do) with a fresh `INFERFLUX_HOME`, times process start -> `/readyz` 200, then one streamed chat request (time to
first token, total), and counts JAX's "Compiling" log lines (`JAX_LOG_COMPILES=1`: every program lowered, a
persistent-cache hit included) before ready and after the request; SIGTERM, then the same again on the same
home (warm `xla-cache`). The "serving" line's time is reported too: ready minus it is Hypercorn's start. From
JAX's log it sums, over every program, the seconds spent tracing, lowering to MLIR and in XLA compilation
(summed over the warm-up threads, so they can exceed the wall time), and counts persistent-cache hits.

--orbax: loads the GGUF and prepares the weights as the runner does (`prepare_weights`), saves that pytree
with orbax-checkpoint (StandardCheckpointer), and compares restoring it with the GGUF path (mmap + prepare),
each in a fresh process, best of --repeat. orbax-checkpoint is not a dependency of InferFlux (this comparison is
why: benchmarks/RESULTS.md, "Restarts"); `pip install orbax-checkpoint` to run it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(model: str, home: Path, settings: list[str], log_path: Path) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "inferctl.cli", "serve", model, "--port", str(port), "--served-model-name", "m",
            "--set", "runtime.warmup=true"]
    for item in settings:
        args += ["--set", item if "." in item.split("=")[0] else f"runtime.{item}"]
    env = {**os.environ, "INFERFLUX_HOME": str(home), "JAX_LOG_COMPILES": "1"}
    log = open(log_path, "w+")
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    serving_at = None
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if serving_at is None and "InferFlux serving" in log_path.read_text():
                serving_at = time.monotonic() - t0
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        ready = time.monotonic() - t0
        compiles_at_ready = len(re.findall(r"^Compiling ", log_path.read_text(), re.M))
        t1 = time.monotonic()
        ttft = None
        body = {"model": "m", "messages": [{"role": "user", "content": "Tell me about restarts."}],
                "max_tokens": 16, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if ttft is None and line.startswith("data: {") and '"content"' in line:
                    ttft = time.monotonic() - t1
        total = time.monotonic() - t1
        compiles_after = len(re.findall(r"^Compiling ", log_path.read_text(), re.M)) - compiles_at_ready
    finally:
        t2 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        stop = time.monotonic() - t2
    text = log_path.read_text()
    phases = {name: round(sum(float(x) for x in re.findall(rf"^Finished {pattern} in ([0-9.]+) sec", text, re.M)), 1)
              for name, pattern in (("tracing_s", r"tracing .*?for jit"),
                                    ("lowering_s", r"jaxpr to MLIR module conversion jit\(.*?\)"),
                                    ("xla_compile_s", r"XLA compilation of jit\(.*?\)"))}
    phases["cache_hits"] = len(re.findall(r"^Persistent compilation cache hit for ", text, re.M))
    return {"ready_s": round(ready, 2), "serving_line_s": round(serving_at or ready, 2), **phases,
            "programs_at_ready": compiles_at_ready, "first_request_ttft_s": round(ttft or total, 3),
            "first_request_total_s": round(total, 3), "compiles_after_ready": compiles_after,
            "stop_s": round(stop, 2), "exit": proc.returncode}


def _orbax_child(mode: str, model: str, ckpt: str) -> None:
    """In a fresh process: time one way of getting the prepared weights onto the device."""
    import jax
    import orbax.checkpoint as ocp

    from inferflux.config import RuntimeConfig
    from inferflux.engine import device
    from inferflux.engine.model_runner import prepare_weights
    from inferflux.formats.loader import load_model

    runtime = RuntimeConfig()
    t0 = time.perf_counter()
    if mode == "restore":
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(ckpt)
    else:
        loaded = load_model(model)
        weights = prepare_weights(loaded.weights, device.compute_dtype(runtime.dtype),
                                  device.weight_layout(runtime.cpu_kernels), exact=False)
        leaves, treedef = jax.tree.flatten(weights)
        tree = {"leaves": {str(i): leaf for i, leaf in enumerate(leaves)}}
        if mode == "save":
            shutil.rmtree(ckpt, ignore_errors=True)
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(ckpt, tree)
    jax.block_until_ready(jax.tree.leaves(tree))
    nbytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))
    print(json.dumps({"mode": mode, "seconds": round(time.perf_counter() - t0, 3), "bytes": nbytes,
                      "leaves": len(jax.tree.leaves(tree))}))


def orbax_compare(model: str, repeat: int) -> dict[str, Any]:
    ckpt = tempfile.mkdtemp(prefix="inferflux-orbax-") + "/weights"

    def child(mode: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_restart", "--orbax-child", mode,
                              "--model", model, "--ckpt", ckpt], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    save = child("save")
    gguf = min((child("gguf") for _ in range(repeat)), key=lambda r: r["seconds"])
    restore = min((child("restore") for _ in range(repeat)), key=lambda r: r["seconds"])
    size = sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file())
    shutil.rmtree(Path(ckpt).parent, ignore_errors=True)
    return {"gguf_mmap_prepare_s": gguf["seconds"], "orbax_restore_s": restore["seconds"],
            "orbax_save_s": save["seconds"], "prepared_bytes": gguf["bytes"], "checkpoint_bytes": size,
            "leaves": gguf["leaves"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a GGUF file, a model folder or a stored model name")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override (runtime. optional)")
    parser.add_argument("--orbax", action="store_true", help="also compare an orbax checkpoint of the weights")
    parser.add_argument("--no-serve", action="store_true", help="skip the cold/warm server starts")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--orbax-child", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.orbax_child:
        _orbax_child(args.orbax_child, args.model, args.ckpt)
        return
    results: dict[str, Any] = {"model": args.model, "settings": args.set}
    if not args.no_serve:
        home = Path(tempfile.mkdtemp(prefix="inferflux-restart-"))
        try:
            for run in ("cold", "warm"):
                results[run] = one_start(args.model, home, args.set, home / f"{run}.log")
                print(run, json.dumps(results[run]), flush=True)
            cache = home / "xla-cache"  # with runtime.cache_executables: code-<hash>/ and its executables/
            results["xla_cache_files"] = sum(1 for f in cache.rglob("*") if f.is_file() and f.suffix != ".exe")
            results["stored_executables"] = sum(1 for _ in cache.rglob("*.exe"))
        finally:
            shutil.rmtree(home, ignore_errors=True)
    if args.orbax:
        results["orbax"] = orbax_compare(args.model, args.repeat)
        print("orbax", json.dumps(results["orbax"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
