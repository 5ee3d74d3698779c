"""Tensor parallelism (runtime.tensor_parallel) on CPU: the host is split into 4 XLA devices
(`--xla_force_host_platform_device_count=4`, set before JAX starts, hence a subprocess), and greedy
tokens and logprobs with the model split over 2 devices equal the unsplit model's, for a model with
biases and tied embeddings (qwen2) and a quantized GGUF without them (dequantized at load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from inferflux import LLM, SamplingParams
    from inferflux.engine import tensor_parallel

    assert len(jax.devices()) == 4, jax.devices()
    results = {}
    prompts = [[5, 17, 42, 99, 7, 230, 64, 3, 150, 11], [int(t) for t in np.arange(1, 40) * 7 % 400]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    for path in sys.argv[1:]:
        row = {}
        for tp in (1, 2):
            llm = LLM(path, page_size=8, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128,
                      num_pages=64, max_logprobs=3, tensor_parallel=tp, cpu_kernels="off")
            if tp == 2:
                q = llm.runner.state["layers"][0]["attn"]["q"].get_value()
                row["q_devices"] = len(q.sharding.device_set)
                row["q_shard_rows"] = q.addressable_shards[0].data.shape[0]
                row["q_rows"] = q.shape[0]
                row["kv_devices"] = len(llm.runner.kv_cache[0][0].sharding.device_set)
            outs = llm.generate(prompts, params)
            row[tp] = [[o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]] for o in outs]
        try:
            LLM(path, page_size=8, max_model_len=128, num_pages=64, tensor_parallel=3)
            row["bad"] = "accepted"
        except ValueError as exc:
            row["bad"] = str(exc)
        results[path] = row
    print("RESULT " + json.dumps(results))
""")


@pytest.mark.slow
def test_tensor_parallel_matches_one_device(tiny_model, tiny_gguf) -> None:
    # cpu_kernels=off on both sides: a split model has dense weights, so the unsplit one must too.
    paths = [str(tiny_model("qwen2")), str(tiny_gguf("llama-q", "Q8_0"))]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *paths], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    for path, row in results.items():
        assert row["q_devices"] == 2 and row["kv_devices"] == 2, (path, row)
        assert row["q_shard_rows"] * 2 == row["q_rows"], (path, row)  # split by output features (heads)
        one, two = row["1"], row["2"]
        for (ids1, lps1), (ids2, lps2) in zip(one, two):
            assert ids1 == ids2, path
            assert max(abs(a - b) for a, b in zip(lps1, lps2)) < 1e-4, path
        assert "must divide" in row["bad"], row["bad"]
