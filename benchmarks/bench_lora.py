"""Decode speed with LoRA adapters in the batch, and the load time of one adapter (no HTTP).

    python -m benchmarks.bench_lora --make tiny:Q8_0 --batch 8 --rank 16
    python -m benchmarks.bench_lora --model path/to/model.gguf --set dtype=bfloat16 --batch 8

Drives `ModelRunner` directly, as benchmarks/bench_decode.py does: `--batch` sequences with `--context`
tokens each decode one token per step. Cases:

- `off`: runtime.max_loras = 0 (no LoRA parameters or inputs: the base program);
- `slots, 0 adapters`: max_loras = `--slots`, every row on the base model;
- `1 adapter`: every row uses the same adapter;
- `N distinct`: row i uses adapter i (mod the slot count).

Adapters are random rank-`--rank` PEFT folders on all seven projections, written with safetensors; the
load time is `LoraSlots.load` (read + check + write one slot into every layer) after a first load.
Every case runs the same compiled program within a runner (the coefficients are an input), so the
compile count is printed to show loads add none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def write_peft(folder: Path, config: Any, rank: int, seed: int) -> Path:
    """A random PEFT adapter folder for `config` on q/k/v/o/gate/up/down (what peft's save_pretrained writes)."""
    from safetensors.numpy import save_file

    from inferflux.engine.lora import HF_MODULES
    from inferflux.models.lora import target_shapes

    rng = np.random.default_rng(seed)
    shapes = target_shapes(config)
    tensors = {}
    for layer in range(config.num_layers):
        for hf, ours in HF_MODULES.items():
            kind = "self_attn" if ours in ("q", "k", "v", "o") else "mlp"
            fan_in, fan_out = shapes[ours]
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{hf}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.02, (rank, fan_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (fan_out, rank)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(HF_MODULES), "peft_type": "LORA"}))
    return folder


def load_by_form(slots: Any, model: Path, folder: Path, tmp: Path, free_slot: int) -> dict[str, float]:
    """Median load time (5 loads, after unloading) of one adapter as a PEFT folder, a GGUF LoRA file (F32, F16)
    and an encrypted stored adapter (decryption included): `open_adapter` + `LoraSlots.load`."""
    from inferflux.config import load_config
    from inferflux.formats.gguf_lora import convert_peft_to_gguf
    from inferflux.server.access.crypto import generate_master_key, parse_master_key
    from inferflux.store.adapters import AdapterStore, open_adapter

    key_text = generate_master_key()
    (tmp / "master.key").write_text(key_text)
    home = tmp / "home"
    config = load_config(overrides={"security.master_key_file": str(tmp / "master.key"), "home": str(home)})
    AdapterStore(home).pull(folder, "enc", key=parse_master_key(key_text, "bench"))
    sources = {"gguf F32": str(convert_peft_to_gguf(folder, model, tmp / "a32.gguf", "F32")),
               "gguf F16": str(convert_peft_to_gguf(folder, model, tmp / "a16.gguf", "F16")),
               "encrypted PEFT": "enc", "peft": str(folder)}
    if free_slot <= len(slots.by_name):
        slots.unload(max(slots.by_name))
    out = {}
    for form, source in sources.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            slots.load("bench", open_adapter(source, config))
            times.append(time.perf_counter() - start)
            slots.unload("bench")
        out[f"load s, {form} (median)"] = statistics.median(times)
    return out


def decode_tokens_per_s(runner: Any, batch: int, context: int, lora_rows: list[np.ndarray | None],
                        steps: int) -> float:
    from inferflux.engine.model_runner import Chunk
    from inferflux.engine.sampling_rows import RowParams

    pages_per = -(-(context + 1) // runner.page_size)
    chunks = [Chunk(tokens=[7], start_pos=context, pages=list(range(1 + i * pages_per, 1 + (i + 1) * pages_per)),
                    history=[7] * (context + 1), num_prompt=context, sampling=RowParams(temperature=0.0),
                    lora=lora_rows[i]) for i in range(batch)]
    for _ in range(3):  # compile and settle
        runner.step(chunks)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step(chunks)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_decode import model_from_spec
    from inferflux.config import load_config
    from inferflux.engine.lora import LoraSlots
    from inferflux.engine.model_runner import ModelRunner
    from inferflux.formats.loader import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file or Hugging Face folder")
    parser.add_argument("--make", default="tiny:Q8_0", help="SHAPE:QTYPE random model (benchmarks/make_model.py)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="runtime.max_loras for the LoRA cases")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the cases (best kept)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a runtime setting")
    args = parser.parse_args(argv)

    model = Path(args.model) if args.model else model_from_spec(args.make)
    loaded = load_model(model)
    pages = 1 + args.batch * -(-(args.context + 1) // 16)
    overrides = {"runtime.num_pages": pages, "runtime.max_num_seqs": max(8, args.batch),
                 "runtime.max_lora_rank": args.rank}
    overrides.update({(k if k.startswith("runtime.") else f"runtime.{k}"): v
                      for k, v in (s.split("=", 1) for s in args.set)})
    result: dict[str, Any] = {"model": str(model), "batch": args.batch, "rank": args.rank, "slots": args.slots}

    off = ModelRunner(loaded, load_config(overrides={**overrides, "runtime.max_loras": 0}).runtime)
    result["off tok/s"] = max(decode_tokens_per_s(off, args.batch, args.context, [None] * args.batch, args.steps)
                              for _ in range(args.rounds))
    del off

    runner = ModelRunner(loaded, load_config(overrides={**overrides, "runtime.max_loras": args.slots}).runtime)
    slots = LoraSlots(runner)
    decode_tokens_per_s(runner, args.batch, args.context, [None] * args.batch, 1)  # compile the decode program
    compiles = runner.programs.compiles
    with tempfile.TemporaryDirectory() as tmp:
        folders = [write_peft(Path(tmp) / f"a{i}", loaded.config, args.rank, i) for i in range(args.slots)]
        slots.load("a0", folders[0])
        load_times = []
        for i, folder in enumerate(folders[1:], 1):
            start = time.perf_counter()
            slots.load(f"a{i}", folder)
            load_times.append(time.perf_counter() - start)
        result["adapter load s (median)"] = statistics.median(load_times) if load_times else None
        result.update(load_by_form(slots, model, folders[0], Path(tmp), args.slots))

    def one_hot(slot: int) -> np.ndarray:
        row = np.zeros(args.slots, np.float32)
        row[slot] = 1.0
        return row

    cases = {"0 adapters": [None] * args.batch, "1 adapter": [one_hot(0)] * args.batch,
             f"{min(args.batch, args.slots)} distinct": [one_hot(i % args.slots) for i in range(args.batch)]}
    for _ in range(args.rounds):  # interleaved rounds, best of each: a shared machine's noise hits all cases
        for name, rows in cases.items():
            key = f"{args.slots} slots, {name} tok/s"
            result[key] = max(result.get(key, 0.0),
                              decode_tokens_per_s(runner, args.batch, args.context, rows, args.steps))
    result["programs compiled after warm-up (loads, mixes)"] = runner.programs.compiles - compiles
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
