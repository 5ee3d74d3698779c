"""`benchmarks.bench_serving` (the serving benchmark) and `benchmarks.side_by_side` (InferFlux beside llama.cpp).

The metric math and the SSE parsing run against synthetic timings and a mock transport; the smoke test starts
both real servers on a tiny GGUF model and checks every metric of every run.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest

from benchmarks import bench_serving, side_by_side
from benchmarks.bench_serving import METRIC_KEYS, BenchRequest, RequestResult, calculate_metrics
from tests.fixtures.server import free_port

# --- metric math ---


def test_tpot_excludes_the_first_token_and_percentiles_interpolate() -> None:
    results = [
        # 10 tokens: 0.1 s to the first, 0.9 s for the other 9 -> TPOT 100 ms
        RequestResult(success=True, ttft=0.1, e2e=1.0, output_tokens=10, prompt_tokens=5, chunks=10,
                      itl=[0.1] * 9, max_tokens=10),
        # 5 tokens: TPOT (1.0 - 0.2) / 4 = 200 ms
        RequestResult(success=True, ttft=0.2, e2e=1.0, output_tokens=5, prompt_tokens=7, chunks=5,
                      itl=[0.2] * 4, max_tokens=5),
        # one token: no TPOT at all (there is no second token)
        RequestResult(success=True, ttft=0.3, e2e=0.3, output_tokens=1, prompt_tokens=3, chunks=1, max_tokens=1),
        RequestResult(success=False, error="HTTP 500: boom"),
    ]
    m = calculate_metrics(results, duration=2.0)
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["first_error"] == "HTTP 500: boom" and m["errors"] == {"HTTP 500: boom": 1}
    assert m["total_input_tokens"] == 15 and m["total_output_tokens"] == 16
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(8.0)
    assert m["total_token_throughput"] == pytest.approx(15.5)
    assert m["mean_tpot_ms"] == pytest.approx(150.0)  # (100 + 200) / 2: the 1-token request is left out
    assert m["median_tpot_ms"] == pytest.approx(150.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p90_ttft_ms"] == pytest.approx(280.0)  # linear interpolation, as numpy.percentile
    assert m["p99_ttft_ms"] == pytest.approx(298.0)
    assert m["mean_itl_ms"] == pytest.approx((9 * 100 + 4 * 200) / 13)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["p99_itl_ms"] == pytest.approx(200.0)
    assert m["mean_e2el_ms"] == pytest.approx(2300 / 3)
    assert m["requests_over_max_tokens"] == 0
    assert set(METRIC_KEYS) <= set(m)


def test_percentiles_over_many_requests_and_no_samples() -> None:
    results = [RequestResult(success=True, ttft=i / 1000, e2e=1.0, output_tokens=2, chunks=2) for i in range(1, 101)]
    m = calculate_metrics(results, duration=1.0)
    assert m["median_ttft_ms"] == pytest.approx(50.5)
    assert m["p90_ttft_ms"] == pytest.approx(90.1)
    assert m["p99_ttft_ms"] == pytest.approx(99.01)
    empty = calculate_metrics([RequestResult(error="x")], duration=0.0)
    assert empty["completed"] == 0 and empty["mean_ttft_ms"] is None and empty["output_throughput"] == 0.0
    json.dumps(empty, allow_nan=False)  # undefined statistics are null, never NaN


# --- SSE parsing, against a mock server with real pauses ---


def _sse(obj: object) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def _mock_transport(script: dict[str, list]) -> tuple[httpx.MockTransport, list[dict]]:
    """A fake OpenAI server: `script[path]` is a list of (delay_s, bytes) streamed as the response body."""
    bodies: list[dict] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.content:
            bodies.append(json.loads(request.content))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path not in script:
            return httpx.Response(404, json={"error": {"message": f"no route {request.url.path}"}})
        steps = script[request.url.path]
        if isinstance(steps, httpx.Response):
            return steps

        async def body():
            for delay, data in steps:
                await asyncio.sleep(delay)
                yield data

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return httpx.MockTransport(handler), bodies


def _run(transport: httpx.MockTransport, **kwargs) -> dict:
    async def go() -> dict:
        async with httpx.AsyncClient(transport=transport) as client:
            return await bench_serving.run_benchmark("http://mock/v1", client=client, progress=False, **kwargs)

    return asyncio.run(go())


def test_completion_stream_timing_usage_and_payload() -> None:
    text = lambda t, finish=None: _sse({"choices": [{"index": 0, "text": t, "finish_reason": finish}]})  # noqa: E731
    steps = [(0.05, text("a")), (0.02, text("")), (0.02, text("b")), (0.0, text("", "length")),
             (0.0, _sse({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})), (0.0, _sse("[DONE]"))]
    transport, bodies = _mock_transport({"/v1/completions": steps})
    requests = [BenchRequest("hello world", 3, 8, "tokenize")] * 2
    r = _run(transport, requests=requests, ignore_eos=True, warmup=0, max_concurrency=1)
    assert r["completed"] == 2 and r["failed"] == 0, r["first_error"]
    assert r["total_output_tokens"] == 6 and r["total_input_tokens"] == 18  # from the streamed usage
    assert r["output_tokens_source"] == ["usage"] and r["prompt_tokens_source"] == ["usage"]
    for req in r["requests"]:
        assert req["chunks"] == 3  # "a", the empty token chunk, "b"; not the finish-only chunk
        assert 0.04 <= req["ttft"] <= req["e2e"]
        assert len(req["itl"]) == 2 and all(0.01 <= gap for gap in req["itl"])
    assert r["mean_tpot_ms"] == pytest.approx(1000 * sum((q["e2e"] - q["ttft"]) / 2 for q in r["requests"]) / 2)
    body = bodies[-1]
    assert body["model"] == "m" and body["stream"] and body["temperature"] == 0.0 and body["max_tokens"] == 3
    assert body["ignore_eos"] is True and body["min_tokens"] == 3
    assert body["stream_options"] == {"include_usage": True}


def test_chat_stream_without_usage_counts_chunks() -> None:
    delta = lambda d, finish=None: _sse({"choices": [{"index": 0, "delta": d, "finish_reason": finish}]})  # noqa: E731
    steps = [(0.0, b": ping\n\n"), (0.0, delta({"role": "assistant", "content": ""})), (0.03, delta({"content": "x"})),
             (0.01, delta({"content": "y"})), (0.0, delta({}, "stop")), (0.0, _sse("[DONE]"))]
    transport, bodies = _mock_transport({"/v1/chat/completions": steps})
    r = _run(transport, endpoint="chat", requests=[BenchRequest("hi", 8, 2, "tokenize")], warmup=0)
    assert r["completed"] == 1, r["first_error"]
    req = r["requests"][0]
    assert req["chunks"] == 2 and req["output_tokens"] == 2 and req["output_tokens_source"] == "chunks"
    assert req["ttft"] >= 0.025  # the role chunk is not the first token
    assert bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]


def test_llama_cpp_style_stream_overrunning_max_tokens() -> None:
    """No usage, finish "length", more chunks than max_tokens: the chunks are the better (lower-bound) count."""
    text = lambda t, finish=None: _sse({"choices": [{"index": 0, "text": t, "finish_reason": finish}]})  # noqa: E731
    steps = [(0.0, text("")) for _ in range(5)] + [(0.0, text("", "length")), (0.0, _sse("[DONE]"))]
    transport, _ = _mock_transport({"/v1/completions": steps})
    r = _run(transport, requests=[BenchRequest("p", 3, 2, "tokenize"), BenchRequest("p", 5, 2, "tokenize")],
             warmup=0)
    counts = [(q["output_tokens"], q["output_tokens_source"]) for q in r["requests"]]
    assert counts == [(5, "chunks"), (5, "max_tokens")]
    assert r["requests_over_max_tokens"] == 1


def test_failures_are_counted_with_their_messages() -> None:
    steps = [(0.0, _sse({"choices": [{"index": 0, "text": "a", "finish_reason": None}]})),
             (0.0, _sse({"error": {"message": "the server shut down", "type": "x"}})), (0.0, _sse("[DONE]"))]
    transport, _ = _mock_transport({"/v1/completions": steps})
    r = _run(transport, requests=[BenchRequest("p", 4)] * 3, warmup=0)
    assert r["completed"] == 0 and r["failed"] == 3
    assert r["first_error"] == "error in stream: the server shut down"
    not_found = httpx.Response(404, json={"error": {"message": "model 'nope' not found"}})
    transport, _ = _mock_transport({"/v1/completions": not_found})
    r = _run(transport, model="nope", requests=[BenchRequest("p", 4)] * 2, warmup=1)
    assert r["failed"] == 2 and r["first_error"] == "HTTP 404: model 'nope' not found"
    truncated = [(0.0, _sse({"choices": [{"index": 0, "text": "a", "finish_reason": None}]}))]
    transport, _ = _mock_transport({"/v1/completions": truncated})
    r = _run(transport, requests=[BenchRequest("p", 4)], warmup=0)
    assert r["failed"] == 1 and "ended before" in r["first_error"]


def test_nothing_listening(tmp_path: Path) -> None:
    """A port nothing listens on: every request fails, the run completes, the message is kept."""
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "r.json"
    rc = bench_serving.main(["--base-url", url, "--model", "m", "--num-prompts", "3", "--input-len", "16",
                             "--output-len", "4", "--max-concurrency", "2", "--json", str(out), "--no-progress"])
    assert rc == 1
    r = json.loads(out.read_text())
    assert r["completed"] == 0 and r["failed"] == 3 and "ConnectError" in r["first_error"]
    assert r["errors"] == {r["first_error"]: 3}
    # No --model: GET /v1/models fails, and that is the error of every request.
    r = bench_serving.benchmark(url, num_prompts=2, input_len=8, output_len=2, progress=False)
    assert r["failed"] == 2 and r["first_error"].startswith("GET /v1/models: ConnectError")


# --- both real servers, side by side ---


@pytest.fixture(scope="module")
def tiny_llama_gguf(tiny_gguf) -> Path:
    return tiny_gguf("llama", "F16")


def test_side_by_side_smoke(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "side.json"
    # One token bucket (32) for prompt steps and decode steps alike: far fewer programs to compile on a cold
    # XLA cache (CI), ~15 s less.
    rc = side_by_side.main(["--model", str(tiny_llama_gguf), "--concurrency", "1,2", "--num-prompts", "4",
                            "--input-len", "24", "--output-len", "8", "--warmup", "2", "--log-dir", str(tmp_path),
                            "--set", "runtime.min_token_bucket=32", "--json", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    logs = {r["server"]: r.get("error") or Path(r["log"]).read_text()[-2000:] for r in result["runs"]}
    assert rc == 0, logs
    runs = result["runs"]
    assert sorted((r["server"], r["concurrency"]) for r in runs) == [
        ("inferflux", 1), ("inferflux", 2), ("llama.cpp", 1), ("llama.cpp", 2)]
    assert [r["server"] for r in runs] == ["inferflux", "llama.cpp", "llama.cpp", "inferflux"]  # alternating
    for run in runs:
        assert run["completed"] == 4 and run["failed"] == 0, (run["server"], run["first_error"])
        assert run["exit_status"] is not None
        for key in METRIC_KEYS:
            assert isinstance(run[key], int | float) and math.isfinite(run[key]), (run["server"], key, run[key])
        assert run["total_output_tokens"] >= 4 * 8 and run["prompt_len_mismatches"] == 0
        assert run["config"]["max_concurrency"] == run["concurrency"] and run["config"]["warmup_failed"] == 0
        for req in run["requests"]:
            assert req["success"] and req["output_tokens"] > 0 and 0 < req["ttft"] <= req["e2e"]
            assert req["prompt_tokens"] == 24  # calibrated to the exact length, counted alike by both
    # Both got the same prompts, and count them the same.
    prompt_counts = {r["server"]: [q["prompt_tokens"] for q in r["requests"]] for r in runs if r["concurrency"] == 1}
    assert prompt_counts["inferflux"] == prompt_counts["llama.cpp"]
    assert [r["concurrency"] for r in result["ratios"]] == [1, 2]
    for ratio in result["ratios"]:
        assert all(ratio[key] is not None and ratio[key] > 0 for key, _, _ in side_by_side.COMPARED)
    table = side_by_side.format_comparison(result)
    assert "InferFlux / llama.cpp" in table and table.count("| 2 |") == 3
