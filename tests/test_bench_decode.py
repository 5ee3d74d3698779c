"""benchmarks.make_model (random GGUF models of real shapes) and benchmarks.bench_decode (prefill/decode speed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from benchmarks import bench_decode
from benchmarks.make_model import QTYPES, SHAPES, make_gguf, shape_config, tensor_plan, tensor_stats
from benchmarks.make_model import main as make_model_main

T = gguf.GGMLQuantizationType
PROMPT = "Hello, world! The quick brown fox jumps over the lazy dog."
SMOKE_QTYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q4_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench-models")
    return {q: make_gguf("tiny", q, folder / f"tiny-{q}.gguf", seed=1) for q in SMOKE_QTYPES}


def test_shapes_match_public_configs() -> None:
    tl, l2, l3 = shape_config("tinyllama-1.1b"), shape_config("llama-2-7b"), shape_config("llama-3-8b")
    assert (tl.hidden_size, tl.intermediate_size, tl.num_layers, tl.num_heads, tl.num_kv_heads, tl.vocab_size,
            tl.max_position, tl.head_dim) == (2048, 5632, 22, 32, 4, 32000, 2048, 64)
    assert (l2.hidden_size, l2.intermediate_size, l2.num_layers, l2.num_kv_heads, l2.vocab_size, l2.max_position) \
        == (4096, 11008, 32, 32, 32000, 4096)
    assert (l3.intermediate_size, l3.num_kv_heads, l3.vocab_size, l3.rope_theta, l3.max_position) \
        == (14336, 8, 128256, 500000.0, 8192)
    # The sizes llama.cpp reports for these models: ~1.10 B and ~6.74 B and ~8.03 B parameters.
    params = {name: sum(math.prod(s) for _, s, _ in tensor_plan(shape_config(name), "F16"))
              for name in ("tinyllama-1.1b", "llama-2-7b", "llama-3-8b")}
    assert round(params["tinyllama-1.1b"] / 1e9, 2) == 1.10
    assert round(params["llama-2-7b"] / 1e9, 2) == 6.74
    assert round(params["llama-3-8b"] / 1e9, 2) == 8.03
    assert set(SHAPES) >= {"tiny", "tinyllama-1.1b", "llama-2-7b", "llama-3-8b"}


def test_tensor_types_follow_llama_cpp() -> None:
    plan = {name: t for name, _, t in tensor_plan(shape_config("tinyllama-1.1b"), "Q4_K_M")}
    assert plan["output.weight"] == T.Q6_K and plan["token_embd.weight"] == T.Q4_K
    assert plan["blk.0.attn_v.weight"] == T.Q6_K and plan["blk.2.attn_v.weight"] == T.Q4_K  # use_more_bits
    assert plan["blk.4.ffn_down.weight"] == T.Q6_K and plan["blk.21.ffn_down.weight"] == T.Q6_K
    assert plan["blk.0.attn_norm.weight"] == T.F32
    q8 = {name: t for name, _, t in tensor_plan(shape_config("tiny"), "Q8_0")}
    assert q8["output.weight"] == T.Q8_0
    q4k = {name: t for name, _, t in tensor_plan(shape_config("llama-2-7b"), "Q4_K")}
    assert q4k["blk.0.ffn_down.weight"] == T.Q4_K and q4k["output.weight"] == T.Q6_K  # 11008 = 43 blocks of 256
    with pytest.raises(ValueError, match="unsupported qtype"):
        tensor_plan(shape_config("tiny"), "Q9_9")


@pytest.mark.parametrize("qtype", SMOKE_QTYPES)
def test_values_dequantize_finite_and_small(tiny_ggufs: dict[str, Path], qtype: str) -> None:
    stats = list(tensor_stats(tiny_ggufs[qtype]))
    expected = {name: t.name for name, _, t in tensor_plan(shape_config("tiny"), qtype)}
    assert {s["name"]: s["type"] for s in stats} == expected
    for s in stats:
        assert s["finite"], s
        if s["type"] == "F32":
            assert s["rms"] == 1.0 and s["max_abs"] == 1.0  # norms are ones
        else:
            assert 0.005 < s["rms"] < 0.05 and s["max_abs"] < 0.2 and abs(s["mean"]) < 0.2 * s["rms"], s
    reader = gguf.GGUFReader(tiny_ggufs[qtype])
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == SHAPES["tiny"]["vocab_size"]


@pytest.mark.parametrize("qtype", SMOKE_QTYPES)
def test_llama_cpp_loads_and_runs(tiny_ggufs: dict[str, Path], qtype: str) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny_ggufs[qtype]), n_ctx=64, n_threads=2, n_batch=64,
                          logits_all=True, verbose=False)
    try:
        assert llm.n_vocab() == SHAPES["tiny"]["vocab_size"]
        tokens = llm.tokenize(PROMPT.encode())
        assert 5 < len(tokens) < len(PROMPT)  # merged into words, not bytes
        llm.eval(tokens)
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        assert np.isfinite(logits).all() and logits.std() > 0
        assert 0 <= int(np.argmax(logits)) < llm.n_vocab()
    finally:
        llm.close()


@pytest.mark.parametrize("qtype", SMOKE_QTYPES)
def test_inferflux_loads_and_generates(tiny_ggufs: dict[str, Path], qtype: str) -> None:
    import llama_cpp

    from inferflux import LLM, SamplingParams

    llm = LLM(tiny_ggufs[qtype], max_model_len=64, num_pages=16)
    ids = llm.tokenizer.encode(PROMPT, add_special_tokens=False)
    ref = llama_cpp.Llama(model_path=str(tiny_ggufs[qtype]), n_ctx=64, vocab_only=True, verbose=False)
    try:
        assert ids == ref.tokenize(PROMPT.encode(), add_bos=False)  # both runtimes read the same vocabulary
    finally:
        ref.close()
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1))
    completion = out[0].outputs[0]
    assert len(completion.token_ids) == 4
    assert all(math.isfinite(lp.logprob) for lp in completion.logprobs)


def test_make_model_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.gguf"
    assert make_model_main(["--shape", "tiny", "--qtype", "q8_0", "--out", str(out), "--check"]) == 0
    assert out.is_file() and not out.with_name("m.gguf.partial").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left beside it
    text = capsys.readouterr().out
    assert "wrote" in text and "blk.1.ffn_down.weight" in text
    assert set(QTYPES) >= {"F16", "BF16", "Q8_0", "Q4_0", "Q4_K"}


DECODE_METRICS = ("step_ms_p50", "step_ms_p99", "step_ms_mean", "device_step_ms", "host_pack_ms", "tokens_per_s",
                  "device_tokens_per_s", "weight_bytes_per_step", "kv_bytes_per_step", "bytes_per_step",
                  "bandwidth_gbs", "device_bandwidth_gbs", "bandwidth_fraction", "device_bandwidth_fraction",
                  "first_step_s")


def test_bench_decode_smoke(tiny_ggufs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = bench_decode.main([
        "--model", str(tiny_ggufs["Q4_K"]), "--batch", "1,4", "--context", "40", "--prompt-len", "64",
        "--prefill-runs", "2", "--steps", "3", "--warmup-steps", "1", "--context-sweep", "8,40",
        "--copy-bytes", str(16 << 20), "--set", "max_num_seqs=2", "--set", "runtime.max_num_batched_tokens=32",
        "--json", str(out),
    ])
    assert code == 0
    table = capsys.readouterr().out
    assert "| batch | context |" in table and "tokens/s" in table
    result = json.loads(out.read_text())

    def positive(value: float) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value) and value > 0

    assert [r["batch"] for r in result["decode"]] == [1, 4]
    assert [(r["batch"], r["context"]) for r in result["context_sweep"]] == [(1, 8), (1, 40)]
    for row in result["decode"] + result["context_sweep"]:
        for key in DECODE_METRICS:
            assert positive(row[key]), (key, row)
        assert row["steps"] == 3
        assert row["bytes_per_step"] == row["weight_bytes_per_step"] + row["kv_bytes_per_step"]
        assert row["kv_bytes_per_step"] == row["batch"] * (row["context"] + 1) * result["kv_bytes_per_token"]
        assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["step_ms_p50"] * 1e3)
    # More context, more KV to read.
    assert result["context_sweep"][1]["kv_bytes_per_step"] > result["context_sweep"][0]["kv_bytes_per_step"]
    pre = result["prefill"]
    assert pre["prompt_len"] == 64 and pre["runs"] == 2 and pre["chunks"] == 2  # 64 tokens in 32-token chunks
    for key in ("ms_p50", "ms_p99", "ms_mean", "tokens_per_s", "first_run_s"):
        assert positive(pre[key]), key
    assert pre["ms_p99"] >= pre["ms_p50"]
    for key in ("weights_device_bytes", "embed_device_bytes", "kv_bytes_per_token", "kv_cache_bytes",
                "model_file_bytes", "parameters", "load_s", "runner_init_s"):
        assert positive(result[key]), key
    assert positive(result["copy_bandwidth"]["gbs"]) and result["copy_bandwidth"]["bytes"] == 16 << 20
    # CPU: with the kernels, quantized weights stay as the file's blocks (well under 4 bytes per parameter, at
    # least the quantized part of the file); without them they are dequantized to float32 (4 bytes each).
    if result["runtime"]["weight_layout"] == "gguf_blocks":
        assert result["model_file_bytes"] // 2 < result["weights_device_bytes"] < 4 * result["parameters"]
    else:
        assert result["weights_device_bytes"] >= 4 * result["parameters"]
    assert result["runtime"]["dtype"] == "float32" and result["environment"]["backend"] == "cpu"
    assert result["weight_types"] == {"F32": 5, "Q4_K": 15, "Q6_K": 1}
    # Batch 4 over max_num_seqs=2: raised, and said so.
    assert result["runtime"]["adjusted"]["max_num_seqs"] == [2, 4] and result["runtime"]["max_num_seqs"] == 4
    assert result["runtime"]["num_pages"] == result["runtime"]["adjusted"]["num_pages"][1]


def test_bench_decode_refuses_too_few_pages(tiny_ggufs: dict[str, Path]) -> None:
    options = bench_decode.BenchOptions(batches=(8,), context=100, prompt_len=16, overrides={"num_pages": "4"})
    with pytest.raises(ValueError, match="num_pages=4 is too small"):
        bench_decode.run_bench(tiny_ggufs["F16"], options)


def test_make_spec(tmp_path: Path) -> None:
    path = bench_decode.model_from_spec("tiny:q4_0", tmp_path)
    assert path == tmp_path / "tiny-Q4_0.gguf" and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert bench_decode.model_from_spec("tiny:Q4_0", tmp_path) == path and path.stat().st_mtime_ns == mtime  # reused
    with pytest.raises(ValueError, match="SHAPE:QTYPE"):
        bench_decode.model_from_spec("huge:Q4_0", tmp_path)
