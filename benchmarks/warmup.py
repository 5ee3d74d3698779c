"""Warm-up cost of a config: programs compiled, cold and cached time, memory maps held, and maps freed by eviction.

Run from the repository root, e.g.
    python -m benchmarks.warmup                      # the demo model, default config, a fresh (cold) XLA cache
    python -m benchmarks.warmup --model path/to/model.gguf --set page_bucket_growth=2 --set warmup_threads=2

What it does: builds a `ModelRunner` with the config (`--set KEY=VALUE`, `runtime.` optional), enables JAX's
persistent compilation cache in a new temporary folder (so the first warm-up is cold, as on a first start),
and times `warmup()`; it counts /proc/self/maps before and after. Then it evicts all programs but one and
counts the maps again (they must drop), and warms up a second runner in the same process from the now
populated persistent cache (a restart's warm-up; programs loaded from the cache map memory too).
`--num-pages` sizes the KV cache (default 256) so the numbers do not depend on free memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file or Hugging Face folder (default: a fresh demo model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--num-pages", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from inferflux.config import load_config
    from inferflux.convert.demo_model import make_demo_model
    from inferflux.engine.compile_cache import enable_persistent_cache
    from inferflux.engine.model_runner import ModelRunner
    from inferflux.engine.program_cache import max_map_count, process_map_count
    from inferflux.formats.loader import load_model

    tmp = Path(tempfile.mkdtemp(prefix="warmup-bench-"))
    model_path = Path(args.model) if args.model else make_demo_model(tmp / "demo-model")
    enable_persistent_cache(tmp / "xla-cache")
    overrides = {(k if "." in k else f"runtime.{k}"): v for k, v in (item.split("=", 1) for item in args.set)}
    overrides.setdefault("runtime.num_pages", args.num_pages)
    config = load_config(overrides=overrides)
    model = load_model(model_path)

    runner = ModelRunner(model, config.runtime)
    buckets = runner.all_buckets()
    maps_start = process_map_count()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    compiled = runner.warmup()
    cold = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cold_cpu = cpu_end.ru_utime + cpu_end.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
    maps_warm = process_map_count()
    rss_warm = _rss_mb()
    runner.programs.resize(1)
    gc.collect()
    maps_evicted = process_map_count()

    del runner
    gc.collect()
    second = ModelRunner(model, config.runtime)
    start = time.perf_counter()
    second.warmup()
    cached = time.perf_counter() - start
    maps_cached = process_map_count()
    result = {
        "model": str(model_path), "layers": model.config.num_layers, "backend": second.backend,
        "token_buckets": second.token_buckets, "page_buckets": second.page_buckets,
        "buckets": len(buckets), "compiled": compiled, "max_compiled_programs": config.runtime.max_compiled_programs,
        "warmup_threads": config.runtime.warmup_threads, "cold_warmup_s": round(cold, 1),
        "cold_warmup_cpu_s": round(cold_cpu, 1),
        "cached_warmup_s": round(cached, 1), "maps_before": maps_start, "maps_after_warmup": maps_warm,
        "maps_per_program": round((maps_warm - maps_start) / max(1, compiled), 1),
        "maps_after_evicting_all_but_one": maps_evicted, "maps_after_cached_warmup": maps_cached,
        "vm_max_map_count": max_map_count(),
        "rss_after_warmup_mb": round(rss_warm), "load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
