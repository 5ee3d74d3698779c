"""Prefill and decode speed of one model in one process, no HTTP: the runtime's own ceiling.

    python -m benchmarks.bench_decode --make tinyllama-1.1b:Q4_K --batch 1,4,16
    python -m benchmarks.bench_decode --model path/to/model.gguf --set dtype=bfloat16 --batch 1,16,64,256
    python -m benchmarks.bench_decode --make tiny:Q8_0 --context-sweep 128,256,512,1024 --sweep-batch 1

It drives `ModelRunner` directly with hand-built `Chunk`s, the interface the engine steps, so the
numbers are the model step plus the host work a server does per step (packing the step's arrays,
sampling, fetching the sampled ids), without scheduling, detokenization or HTTP.

What is measured (every time is wall clock around a step that ends in a host sync; each shape bucket
is compiled by warm-up steps first, and compilation is reported apart):

- prefill: one sequence's prompt of `--prompt-len` random tokens, in chunks of
  `max_num_batched_tokens` as the scheduler would cut it; p50/p99 over `--prefill-runs` runs.
- decode: `--batch` sequences that each already hold `--context` tokens in the KV cache (their own
  pages; the cache contents do not change the cost), one new token each per step, `--steps` steps.
  Every step is the same work (the token is re-run at the same position), so the context does not
  drift during the measurement. Reported: per-step time through `ModelRunner.step` (what the engine
  sees), the device time per step (the same executable dispatched back to back with pre-packed
  inputs, one sync at the end), and host packing time per step; tokens/s = batch / step time.
- achieved bandwidth, as gpt-fast reports it: bytes one decode step must read (the weights as they
  are stored on the device, minus the embedding table of which only `batch` rows are read, plus the
  K/V of every sequence's context) over the step time, next to this machine's measured read bandwidth
  (CPU: numpy sums of 1 GiB on every core, the ceiling of a step that reads its weights once) and copy bandwidth
  (a large on-device array read and written once; bytes read + written over time).
- `--context-sweep`: decode step time against context length at `--sweep-batch` sequences.

Runtime settings: repeatable `--set KEY=VALUE` (`runtime.` prefix optional), as `benchmarks/throughput.py`.
`max_num_seqs` and `max_num_batched_tokens` are raised to the largest batch when smaller, and
`num_pages` defaults to what the largest run needs (both recorded under `runtime.adjusted`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BATCHES = (1, 4, 16, 64)
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "bench-models"
_FLOAT_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclasses.dataclass
class BenchOptions:
    batches: Sequence[int] = DEFAULT_BATCHES
    context: int = 128
    prompt_len: int = 512
    prefill_runs: int = 5
    steps: int = 16
    warmup_steps: int = 2
    context_sweep: Sequence[int] = ()
    sweep_batch: int = 1
    copy_bytes: int = 0  # 0: 1/4 GiB on CPU, 4 GiB elsewhere
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    seed: int = 0
    log: Any = None  # callable(str) for progress lines; None = quiet


def model_from_spec(spec: str, cache_dir: Path = DEFAULT_CACHE_DIR, log: Any = None,
                    attention_scale: float = 1.0) -> Path:
    """`SHAPE:QTYPE` -> a random-weight GGUF from `benchmarks.make_model`, made once per cache dir
    (`attention_scale`: see `make_gguf`)."""
    from benchmarks.make_model import QTYPES, SHAPES, make_gguf

    shape, _, qtype = spec.partition(":")
    qtype = (qtype or "Q4_K").upper()
    if shape not in SHAPES or qtype not in QTYPES:
        raise ValueError(f"--make wants SHAPE:QTYPE with SHAPE in {sorted(SHAPES)} and QTYPE in {sorted(QTYPES)}, "
                         f"got {spec!r}")
    suffix = "" if attention_scale == 1.0 else f"-attn{attention_scale:g}"
    path = Path(cache_dir) / f"{shape}-{qtype}{suffix}.gguf"
    if not path.is_file():
        if log:
            log(f"making {path}")
        make_gguf(shape, qtype, path, progress=log, attention_scale=attention_scale)
    return path


def run_bench(model: str | Path, options: BenchOptions | None = None) -> dict[str, Any]:
    """Load `model` (GGUF file or Hugging Face folder), run every measurement, return the result dict."""
    import jax

    from inferflux.config import load_config
    from inferflux.engine.compile_cache import enable_persistent_cache
    from inferflux.engine.model_runner import ModelRunner
    from inferflux.formats.loader import load_model
    from inferflux.formats.weights import QuantizedWeight

    opt = options or BenchOptions()
    log = opt.log or (lambda line: None)
    batches = sorted({int(b) for b in opt.batches})
    if not batches or batches[0] < 1:
        raise ValueError("batch sizes must be positive")
    config = load_config(overrides={(k if "." in k else f"runtime.{k}"): v for k, v in opt.overrides.items()})
    enable_persistent_cache(config.home_path / "xla-cache")
    runtime = config.runtime

    start = time.perf_counter()
    loaded = load_model(model)
    load_s = time.perf_counter() - start
    mc = loaded.config
    page_size = runtime.page_size
    max_len = min(runtime.max_model_len or mc.max_position, mc.max_position)
    longest = max_len - 1  # a decode token at position `context` needs context + 1 slots
    if opt.prompt_len > max_len:
        raise ValueError(f"--prompt-len {opt.prompt_len} exceeds the model length {max_len}")
    context = min(opt.context, longest)
    sweep = [min(int(c), longest) for c in opt.context_sweep]

    def pages_for(tokens: int) -> int:
        return -(-tokens // page_size)

    # Sequences cannot exceed max_num_seqs (nor tokens per step max_num_batched_tokens): raise them.
    adjusted: dict[str, Any] = {}
    biggest = max(batches + ([opt.sweep_batch] if sweep else []))
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(runtime, key) < biggest:
            adjusted[key] = [getattr(runtime, key), biggest]
            setattr(runtime, key, biggest)
    need_pages = 1 + max([b * pages_for(context + 1) for b in batches] + [pages_for(opt.prompt_len)]
                         + [opt.sweep_batch * pages_for(c + 1) for c in sweep])
    if "num_pages" in {k.rsplit(".", 1)[-1] for k in opt.overrides}:
        if runtime.num_pages < need_pages:
            raise ValueError(f"num_pages={runtime.num_pages} is too small: the largest run needs {need_pages}")
    else:
        adjusted["num_pages"] = [runtime.num_pages, need_pages]
        runtime.num_pages = need_pages
    for key, (old, new) in adjusted.items():
        log(f"runtime.{key}: {old} -> {new}")

    start = time.perf_counter()
    runner = ModelRunner(loaded, runtime)
    jax.block_until_ready(runner.state)
    init_s = time.perf_counter() - start
    kv_itemsize = np.dtype(runner.dtype).itemsize
    kv_bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * kv_itemsize

    weight_bytes, embed_bytes = 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(runner.state)[0]:
        weight_bytes += leaf.nbytes
        if jax.tree_util.keystr(path).startswith("['embed']"):
            embed_bytes += leaf.nbytes
    embed_row_bytes = embed_bytes // mc.vocab_size

    def weight_bytes_read(batch: int) -> int:
        """Weights one step reads: all of them, except the embedding table unless it is also the head."""
        if mc.tie_word_embeddings:
            return weight_bytes
        return weight_bytes - embed_bytes + min(batch, mc.vocab_size) * embed_row_bytes

    dev = jax.devices()[0]
    copy = copy_bandwidth(opt.copy_bytes or (1 << 28 if dev.platform == "cpu" else 1 << 32))
    log(f"copy bandwidth {copy['gbs']:.1f} GB/s ({copy['bytes'] / 2**30:.2f} GiB array)")
    read_bw = read_bandwidth() if dev.platform == "cpu" else None
    if read_bw is not None:
        log(f"read bandwidth {read_bw:.1f} GB/s (numpy sums over 1 GiB on every core)")

    rng = np.random.default_rng(opt.seed)
    result: dict[str, Any] = {
        "model": str(model),
        "model_name": loaded.metadata.get("general.name") if loaded.format == "gguf" else Path(model).name,
        "format": loaded.format,
        "model_file_bytes": _file_bytes(Path(model)),
        "config": {f.name: getattr(mc, f.name) for f in dataclasses.fields(mc)
                   if f.name not in ("rope_freq_factors", "rope_scaling")},
        "weight_types": dict(Counter(w.qtype.name if isinstance(w, QuantizedWeight) else _FLOAT_NAMES.get(
            str(w.dtype), str(w.dtype)) for w in loaded.weights.values())),
        "parameters": int(sum(math.prod(w.shape) for w in loaded.weights.values())),
        "environment": environment(),
        "runtime": {
            "dtype": str(np.dtype(runner.dtype)),
            "weight_layout": runner.weight_layout, "cpu_kernels": runtime.cpu_kernels,
            **{k: getattr(runtime, k) for k in ("page_size", "num_pages", "max_num_seqs", "max_num_batched_tokens",
                                                "max_logprobs", "max_logit_bias")},
            "max_model_len": runner.max_model_len, "adjusted": adjusted,
        },
        "weights_device_bytes": int(weight_bytes),
        "embed_device_bytes": int(embed_bytes),
        "kv_bytes_per_token": int(kv_bytes_per_token),
        "kv_cache_bytes": int(runner.num_pages * page_size * kv_bytes_per_token),
        "copy_bandwidth": copy,
        "read_bandwidth_gbs": read_bw,
        "load_s": round(load_s, 3),
        "runner_init_s": round(init_s, 3),
        "notes": [],
    }
    if context != opt.context or sweep != [int(c) for c in opt.context_sweep]:
        result["notes"].append(f"contexts capped at {longest} (max_model_len {max_len} - 1)")

    log(f"prefill: {opt.prompt_len} tokens x {opt.prefill_runs} runs")
    result["prefill"] = measure_prefill(runner, opt.prompt_len, opt.prefill_runs, mc.vocab_size, rng)

    def decode(batch: int, ctx: int) -> dict[str, Any]:
        chunks = decode_chunks(batch, ctx, page_size, mc.vocab_size, rng)
        row = measure_decode(runner, chunks, opt.steps, opt.warmup_steps)
        read = weight_bytes_read(batch) + batch * (ctx + 1) * kv_bytes_per_token
        row.update(
            batch=batch, context=ctx, weight_bytes_per_step=weight_bytes_read(batch),
            kv_bytes_per_step=batch * (ctx + 1) * kv_bytes_per_token, bytes_per_step=read,
            tokens_per_s=batch / (row["step_ms_p50"] / 1e3),
            device_tokens_per_s=batch / (row["device_step_ms"] / 1e3),
            bandwidth_gbs=read / (row["step_ms_p50"] / 1e3) / 1e9,
            device_bandwidth_gbs=read / (row["device_step_ms"] / 1e3) / 1e9,
        )
        row["bandwidth_fraction"] = row["bandwidth_gbs"] / copy["gbs"]
        row["device_bandwidth_fraction"] = row["device_bandwidth_gbs"] / copy["gbs"]
        if read_bw:
            row["read_bandwidth_fraction"] = row["bandwidth_gbs"] / read_bw
        log(f"decode batch {batch} context {ctx}: {row['step_ms_p50']:.2f} ms/step, "
            f"{row['tokens_per_s']:.1f} tok/s, {row['bandwidth_gbs']:.1f} GB/s")
        return row

    result["decode"] = [decode(b, context) for b in batches]
    result["context_sweep"] = [decode(opt.sweep_batch, c) for c in sweep]
    result["environment"]["load_average_end"] = _load_average()
    return result


# --- measurements --------------------------------------------------------------------------------


def read_bandwidth(repeats: int = 4) -> float:
    """GB/s of host memory reads: numpy sums over a 1 GiB float32 array split across the CPU's cores, best
    of `repeats` (the ceiling a CPU decode step, which mostly reads its weights once, is measured against)."""
    import threading

    a = np.ones(1 << 28, np.float32)
    parts = np.array_split(a, max(1, len(os.sched_getaffinity(0))))
    best = 0.0
    for _ in range(repeats):
        threads = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def copy_bandwidth(nbytes: int, repeats: int = 8) -> dict[str, Any]:
    """Read + write bandwidth over an on-device float32 array of `nbytes`: `x + 1` written back in place.

    The input is donated, so XLA updates the buffer in place: a fresh output buffer each call would
    time the operating system zeroing new pages on CPU (a 256 MiB `x + 1` into new memory ran at
    ~5 GB/s here, in place at ~50 GB/s).
    """
    import jax
    import jax.numpy as jnp

    n = max(1, nbytes // 4)
    bump = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = bump(jnp.zeros((n,), jnp.float32))
    x = bump(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = bump(x)
        x.block_until_ready()
        times.append(time.perf_counter() - start)
    moved = 2 * n * 4
    del x
    return {"bytes": n * 4, "gbs": moved / float(np.median(times)) / 1e9, "gbs_max": moved / min(times) / 1e9}


def _greedy(seed: int):
    from inferflux.engine.sampling_rows import RowParams

    return RowParams(temperature=0.0, seed=seed)


def decode_chunks(batch: int, context: int, page_size: int, vocab: int, rng: np.random.Generator) -> list:
    """`batch` sequences, each with `context` tokens cached in its own pages, decoding the next token."""
    from inferflux.engine.model_runner import Chunk

    per_seq = -(-(context + 1) // page_size)
    chunks = []
    for i in range(batch):
        history = [int(t) for t in rng.integers(0, vocab, size=context + 1)]
        chunks.append(Chunk(tokens=history[-1:], start_pos=context,
                            pages=list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)),
                            history=history, num_prompt=context, sampling=_greedy(i)))
    return chunks


def measure_prefill(runner, prompt_len: int, runs: int, vocab: int, rng: np.random.Generator) -> dict[str, Any]:
    """Time to compute one prompt's KV and its first token, in scheduler-sized chunks."""
    from inferflux.engine.model_runner import Chunk

    prompt = [int(t) for t in rng.integers(0, vocab, size=prompt_len)]
    pages = list(range(1, 1 + -(-prompt_len // runner.page_size)))
    budget = runner.runtime.max_num_batched_tokens
    chunks = [Chunk(tokens=prompt[s:s + budget], start_pos=s, pages=pages, history=prompt[:s + budget],
                    num_prompt=prompt_len, sampling=_greedy(0) if s + budget >= prompt_len else None)
              for s in range(0, prompt_len, budget)]

    def once() -> float:
        start = time.perf_counter()
        for chunk in chunks:
            runner.step([chunk])  # ends with the sampled ids fetched to the host: a full sync
        return time.perf_counter() - start

    first = once()  # compiles the chunk buckets
    times = np.array([once() for _ in range(max(1, runs))]) * 1e3
    p50 = float(np.percentile(times, 50))
    return {
        "prompt_len": prompt_len, "runs": len(times), "chunks": len(chunks),
        "ms_p50": p50, "ms_p99": float(np.percentile(times, 99)), "ms_mean": float(times.mean()),
        "tokens_per_s": prompt_len / (p50 / 1e3), "first_run_s": first,
    }


def measure_decode(runner, chunks: list, steps: int, warmup_steps: int) -> dict[str, Any]:
    """Per-step times of one decode step of `chunks`: through `runner.step`, on the device alone, host packing."""
    import jax

    start = time.perf_counter()
    runner.step(chunks)  # compiles this bucket
    first = time.perf_counter() - start
    for _ in range(max(0, warmup_steps - 1)):
        runner.step(chunks)
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step(chunks)
        step_times.append(time.perf_counter() - start)

    # The same executable `runner.step` picks, with the inputs it would pack already on the device,
    # dispatched back to back: device time per step, without host work or per-step sync latency.
    bucket = runner.bucket_for(len(chunks), len(chunks), max(len(c.pages) for c in chunks))
    exe = runner.program(bucket)
    args = jax.device_put(runner._pack(chunks, bucket))
    out, runner.kv_cache = exe(runner.weights, runner.kv_cache, *args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out, runner.kv_cache = exe(runner.weights, runner.kv_cache, *args)
    jax.block_until_ready(out)
    device_s = (time.perf_counter() - start) / steps

    start = time.perf_counter()
    for _ in range(steps):
        runner._pack(chunks, bucket)
    pack_s = (time.perf_counter() - start) / steps

    ms = np.array(step_times) * 1e3
    return {
        "steps": steps, "bucket": list(bucket),
        "step_ms_p50": float(np.percentile(ms, 50)), "step_ms_p99": float(np.percentile(ms, 99)),
        "step_ms_mean": float(ms.mean()), "device_step_ms": device_s * 1e3, "host_pack_ms": pack_s * 1e3,
        "first_step_s": first,
    }


# --- reporting -----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Where this ran: backend, device, library versions, CPU."""
    import jax
    import jaxlib

    dev = jax.devices()[0]
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    return {
        "backend": jax.default_backend(), "device": dev.device_kind, "device_count": jax.device_count(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "load_average": _load_average(),  # other work on the machine makes the numbers noisy
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _file_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def markdown(result: dict[str, Any]) -> str:
    env, rt, pre = result["environment"], result["runtime"], result["prefill"]
    lines = [
        f"**{result['model_name']}** ({result['parameters'] / 1e6:,.0f} M params, "
        f"{', '.join(f'{k} x{v}' for k, v in sorted(result['weight_types'].items()))}; "
        f"{result['weights_device_bytes'] / 1e9:.2f} GB on device) on {env['backend']} ({env['device']}), "
        f"dtype {rt['dtype']}, quantized weights as {rt.get('weight_layout', '?')}; "
        f"copy bandwidth {result['copy_bandwidth']['gbs']:.1f} GB/s"
        + (f", read bandwidth {result['read_bandwidth_gbs']:.1f} GB/s" if result.get("read_bandwidth_gbs") else ""),
        "",
        "| prefill tokens | runs | p50 ms | p99 ms | tokens/s |",
        "| --- | --- | --- | --- | --- |",
        f"| {pre['prompt_len']} | {pre['runs']} | {pre['ms_p50']:.1f} | {pre['ms_p99']:.1f} | "
        f"{pre['tokens_per_s']:.1f} |",
    ]
    for title, rows in (("decode", result["decode"]), ("context sweep", result["context_sweep"])):
        if not rows:
            continue
        lines += [
            "", f"{title}:", "",
            "| batch | context | step ms p50 | p99 | device ms | host pack ms | tokens/s | GB/s | of copy BW |"
            " of read BW |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['batch']} | {r['context']} | {r['step_ms_p50']:.2f} | {r['step_ms_p99']:.2f} | "
            f"{r['device_step_ms']:.2f} | {r['host_pack_ms']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['bandwidth_gbs']:.1f} | {100 * r['bandwidth_fraction']:.0f}% | "
            + (f"{100 * r['read_bandwidth_fraction']:.0f}% |" if "read_bandwidth_fraction" in r else "- |")
            for r in rows
        ]
    for note in result["notes"]:
        lines += ["", f"note: {note}"]
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="GGUF file or Hugging Face folder")
    source.add_argument("--make", metavar="SHAPE:QTYPE",
                        help="random-weight model from benchmarks.make_model, e.g. tinyllama-1.1b:Q4_K")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where --make keeps its files")
    parser.add_argument("--batch", type=_int_list, default=list(DEFAULT_BATCHES),
                        help="decode batch sizes, e.g. 1,4,16")
    parser.add_argument("--context", type=int, default=128, help="tokens already cached per sequence when decoding")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--prefill-runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps first (the first compiles)")
    parser.add_argument("--context-sweep", type=_int_list, default=[], help="contexts for the sweep, e.g. 128,512,2048")
    parser.add_argument("--sweep-batch", type=int, default=1)
    parser.add_argument("--copy-bytes", type=int, default=0, help="array size for copy bandwidth (default by backend)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="runtime config override, e.g. dtype=bfloat16 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
    model = args.model or model_from_spec(args.make, args.cache_dir, log)
    options = BenchOptions(
        batches=args.batch, context=args.context, prompt_len=args.prompt_len, prefill_runs=args.prefill_runs,
        steps=args.steps, warmup_steps=args.warmup_steps, context_sweep=args.context_sweep,
        sweep_batch=args.sweep_batch, copy_bytes=args.copy_bytes,
        overrides=dict(item.split("=", 1) for item in args.set), seed=args.seed, log=log,
    )
    result = run_bench(model, options)
    result["command"] = "python -m benchmarks.bench_decode " + " ".join(sys.argv[1:] if argv is None else argv)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
