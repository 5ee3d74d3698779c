"""Online serving benchmark for any OpenAI-compatible server (InferFlux, llama.cpp's, vLLM's).

Sends N streamed requests (`/v1/completions` or `/v1/chat/completions`) with Poisson arrivals and/or a
concurrency cap, and reports what vLLM's `benchmark_serving.py` reports: request and token throughput, and
TTFT, TPOT, ITL and end-to-end latency (mean, median, p90, p99). Run from the repository root, e.g.

    python -m benchmarks.bench_serving --base-url http://127.0.0.1:8080 --num-prompts 32 \\
        --input-len 512 --output-len 128 --max-concurrency 8 --ignore-eos --json result.json

Definitions (all times measured by this client, `time.perf_counter`):
  TTFT   request sent -> first streamed chunk carrying output: text, or an empty text that is not the chat
         role chunk or a finish-only chunk (llama.cpp streams one chunk per token, empty for tokens without text)
  E2E    request sent -> end of the stream
  TPOT   per request, (E2E - TTFT) / (output_tokens - 1): the first token is excluded; requests with one
         output token have no TPOT
  ITL    the gaps between successive output chunks, pooled over requests (one chunk is normally one token;
         `mean_tokens_per_chunk` says whether a server merged tokens into chunks)
  output tokens: `usage.completion_tokens` when the server streams usage (`stream_options.include_usage`,
         sent always); else the requested max_tokens when the request ended with finish_reason "length"
         (unless it streamed more chunks than that: llama-cpp-python overruns max_tokens when the output ends in
         an incomplete UTF-8 sequence, as random-weight models' often does); else the number of output chunks
         (a lower bound). `output_tokens_source` says which was used; `requests_over_max_tokens` counts requests
         that got more tokens than they asked for.
  prompt tokens: `usage.prompt_tokens` when streamed; else the server's tokenize route (`/tokenize` of
         vLLM and InferFlux, `/extras/tokenize` of llama-cpp-python, `/tokenize` of llama.cpp's own server);
         else the target length (an estimate). `prompt_tokens_source` says which.

Prompts are random common English words, calibrated against the server's tokenize route (when it has one) to
the target token count, so two servers with the same model see the same token counts. `--dataset FILE.jsonl`
takes prompts (`prompt`, optional `output_len`) from a file instead.

`--ignore-eos` sends `ignore_eos: true` (vLLM, InferFlux) and `min_tokens = max_tokens` (llama-cpp-python has
no `ignore_eos`; its `min_tokens` bans EOS until then), so every request produces exactly its output length.
Decoding is greedy (`temperature: 0`) unless `--temperature` says otherwise.

Failed requests (HTTP errors, connection errors, errors inside the stream, streams that end without finishing)
are counted, and the first error message and a count per message are kept; they never stop the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")

# Common English words; most are one token with a leading space in Llama/Qwen/GPT-2 style vocabularies.
WORDS = """the of and to in is was for that with as on by at from his her he she it they we you this be are
have has had not but or an which one all were there their when what who will would can more if no out so up
said about than into them only other new some could time these two may first then do any like my now over
such our man me even most made after also did many before must through back years where much your way well
down should because each just those people how too little state good very make world still own see men work
long get here between both life being under never day same another know while last might us great old year
off come since against go came right used take three states himself few house use during without again place
around however home small found thought went say part once general high upon school every does got united left
number course war until always away something fact though water less public put think almost hand enough far
took head yet government system better set told nothing night end why called eyes find going look asked later
knew point next city give group toward young let room side social present given several order national second
possible rather per face among form important often things looked early white case john become large big need
four within felt along children saw best church ever least power development light thing seemed family interest
want members mind country area others done turned although open god service certain kind problem began different
door thus help sense means whole matter perhaps itself york times law human line above name example action
company hands local show whether five history gave today either act feet across taken past quite anything seen
having death experience body word half really week car field money words already themselves information tell
together sometimes shall university""".split()


@dataclass
class BenchRequest:
    prompt: str
    output_len: int
    prompt_len: int | None = None  # tokens, when known before sending (tokenize route or dataset)
    prompt_len_source: str = "estimate"


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    prompt_tokens_source: str = "estimate"
    output_tokens: int = 0
    output_tokens_source: str = "chunks"
    chunks: int = 0  # chunks that carried output (see `_is_token_event`)
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    max_tokens: int = 0  # what the request asked for
    start: float = 0.0  # perf_counter at send, relative to the benchmark start


# --- prompts ---


def _lengths(dist: str, mean: int, count: int, rng: random.Random) -> list[int]:
    if dist == "fixed":
        return [mean] * count
    return [rng.randint(max(1, mean // 2), max(1, mean * 3 // 2)) for _ in range(count)]


def _strip_v1(base_url: str) -> str:
    base_url = base_url.rstrip("/")
    return base_url[:-3] if base_url.endswith("/v1") else base_url


async def token_count(client: httpx.AsyncClient, base_url: str, model: str | None, text: str) -> int | None:
    """The server's count of `text`'s tokens (BOS included where the route adds it), or None without a route."""
    routes = [("/tokenize", {"model": model, "prompt": text}),  # vLLM, InferFlux
              ("/extras/tokenize", {"model": model, "input": text}),  # llama-cpp-python
              ("/tokenize", {"content": text, "add_special": True})]  # llama.cpp's llama-server
    for path, payload in routes:
        try:
            resp = await client.post(base_url + path, json=payload, timeout=30)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            continue
        try:
            data = resp.json()
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("tokens"), list):
            if not data["tokens"] and text:
                continue  # llama-server answers a body without `content` with no tokens: try its own shape
            return len(data["tokens"])
        if isinstance(data, dict) and isinstance(data.get("count"), int):
            return data["count"]
    return None


FILLERS = (" a", ".", ",", " I", " the", "!", " of")  # short pieces that top a prompt up one token at a time


async def _calibrated_prompt(count: Callable[[str], Awaitable[int | None]] | None, target: int,
                             rng: random.Random, source: str) -> tuple[str, int, str]:
    """A random-word prompt of `target` tokens where the counter allows: (text, tokens, how it was counted).

    Searches the number of words whose count is closest below the target, then tops it up with short
    fillers; a prompt of exactly the target length keeps the page and bucket counts of every prompt equal.
    """
    words = [rng.choice(WORDS) for _ in range(2 * target + 16)]
    words[0] = words[0].capitalize()

    def text(n: int) -> str:
        return " ".join(words[:n])

    if count is None:
        return text(max(1, target - 1)), target, "estimate"  # about one token per word, plus BOS
    seen: dict[int, int] = {}

    async def tokens_of(n: int) -> int | None:
        if n not in seen:
            got = await count(text(n))
            if got is None:
                return None
            seen[n] = got
        return seen[n]

    n = max(1, target - 1)
    for _ in range(12):  # secant-like steps towards the target
        n = max(1, min(n, len(words)))
        got = await tokens_of(n)
        if got is None:
            return text(max(1, target - 1)), target, "estimate"
        if got == target:
            return text(n), got, source
        step = round((target - got) / max(got / n, 0.25))
        step = step or (1 if got < target else -1)
        if n + step in seen or not 1 <= n + step <= len(words):
            break
        n += step
    under = [k for k, v in seen.items() if v <= target]
    while not under and n > 1:  # every count so far is above the target: drop words until one is not
        n = max(1, n // 2)
        got = await tokens_of(n)
        if got is None:
            return text(max(1, target - 1)), target, "estimate"
        under = [k for k, v in seen.items() if v <= target]
    n = max(under, key=lambda k: (seen[k], k)) if under else min(seen)
    # One more word may still fit.
    while n + 1 <= len(words) and (await tokens_of(n + 1) or target + 1) <= target:
        n += 1
    prompt, got = text(n), seen[n]
    while got < target:  # top up with one-token fillers
        for filler in FILLERS:
            more = await count(prompt + filler)
            if more is not None and got < more <= target:
                prompt, got = prompt + filler, more
                break
        else:
            break
    return prompt, got, source


def _read_dataset(dataset: str, num_prompts: int, output_len: int) -> list[BenchRequest]:
    out: list[BenchRequest] = []
    for line in Path(dataset).read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        out.append(BenchRequest(str(item["prompt"]), int(item.get("output_len") or output_len),
                                item.get("prompt_len"), "dataset" if item.get("prompt_len") else "estimate"))
    if not out:
        raise ValueError(f"{dataset}: no prompts")
    return [out[i % len(out)] for i in range(num_prompts)]


async def build_requests(base_url: str | None, model: str | None = None, *, num_prompts: int = 16,
                         input_len: int = 512, output_len: int = 128, dist: str = "fixed",
                         dataset: str | None = None, seed: int = 0, client: httpx.AsyncClient | None = None,
                         tokenizer: Callable[[str], int] | None = None) -> list[BenchRequest]:
    """The benchmark's prompts: from `dataset` (JSON lines with `prompt`, optional `output_len` and
    `prompt_len`), or random words calibrated to `input_len` tokens with `tokenizer` (a local token counter,
    BOS included) if given, else the tokenize route of the server at `base_url`; estimated (about one token
    per word) when neither is there."""
    rng = random.Random(seed)
    if dataset:
        return _read_dataset(dataset, num_prompts, output_len)
    in_lens = _lengths(dist, input_len, num_prompts, rng)
    out_lens = _lengths(dist, output_len, num_prompts, rng)
    own = client is None and base_url is not None and tokenizer is None
    client = httpx.AsyncClient() if own else client
    try:
        count: Callable[[str], Awaitable[int | None]] | None = None
        source = "estimate"
        if tokenizer is not None:
            async def count(text: str) -> int | None:
                return tokenizer(text)

            source = "tokenizer"
        elif base_url is not None and client is not None:
            url = _strip_v1(base_url)
            if await token_count(client, url, model, "Hello world") is not None:
                async def count(text: str) -> int | None:
                    return await token_count(client, url, model, text)

                source = "tokenize"
        requests = []
        for n_in, n_out in zip(in_lens, out_lens):
            text, tokens, how = await _calibrated_prompt(count, n_in, rng, source)
            requests.append(BenchRequest(text, n_out, tokens, how))
        return requests
    finally:
        if own:
            await client.aclose()


# --- one request ---


def _payload(endpoint: str, model: str, req: BenchRequest, temperature: float, ignore_eos: bool,
             extra_body: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = req.output_len
    body.update(extra_body or {})
    return body


def _is_token_event(choice: dict[str, Any], endpoint: str) -> bool:
    """Whether a streamed choice carries generated output: text, or an empty text that is neither the chat
    role chunk nor a finish-only chunk (llama.cpp streams one chunk per token, empty for tokens with no text)."""
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text:
            return True
        return text == "" and "role" not in delta and not choice.get("finish_reason")
    text = choice.get("text")
    if text:
        return True
    return text == "" and not choice.get("finish_reason")


def _error_text(obj: Any) -> str:
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    return str(obj)


async def send_request(client: httpx.AsyncClient, url: str, endpoint: str, model: str, req: BenchRequest,
                       temperature: float = 0.0, ignore_eos: bool = False,
                       extra_body: dict[str, Any] | None = None, t0: float | None = None) -> RequestResult:
    """One streamed request; never raises (failures come back as `success=False` with the message)."""
    result = RequestResult(prompt_tokens=req.prompt_len or 0, prompt_tokens_source=req.prompt_len_source,
                           max_tokens=req.output_len)
    body = _payload(endpoint, model, req, temperature, ignore_eos, extra_body)
    start = time.perf_counter()
    result.start = start - (t0 if t0 is not None else start)
    last = start
    usage: dict[str, Any] | None = None
    done = False
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", errors="replace")
                try:
                    message = _error_text(json.loads(text))
                except ValueError:
                    message = text[:300]
                result.error = f"HTTP {resp.status_code}: {message}"
                return result
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments and pings, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                try:
                    obj = json.loads(data)
                except ValueError:
                    result.error = f"bad SSE data: {data[:200]}"
                    return result
                if not isinstance(obj, dict):
                    continue
                if "error" in obj:
                    result.error = f"error in stream: {_error_text(obj)}"
                    return result
                if obj.get("usage"):
                    usage = obj["usage"]
                for choice in obj.get("choices") or []:
                    if _is_token_event(choice, endpoint):
                        if result.chunks == 0:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        result.chunks += 1
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
        result.e2e = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - any failure is a failed request, never a crash
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return result
    if not done and result.finish_reason is None:
        result.error = "the stream ended before the request finished"
        return result
    if usage and isinstance(usage.get("completion_tokens"), int):
        result.output_tokens, result.output_tokens_source = usage["completion_tokens"], "usage"
    elif result.finish_reason == "length" and result.chunks <= req.output_len:
        result.output_tokens, result.output_tokens_source = req.output_len, "max_tokens"
    else:
        result.output_tokens, result.output_tokens_source = result.chunks, "chunks"
    if usage and isinstance(usage.get("prompt_tokens"), int):
        result.prompt_tokens, result.prompt_tokens_source = usage["prompt_tokens"], "usage"
    if result.chunks == 0:
        result.ttft = result.e2e  # nothing visible streamed: the whole answer came at the end
    result.success = True
    return result


# --- metrics ---


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "std": None, "p90": None, "p99": None}
    arr = np.asarray(values, dtype=np.float64) * scale
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std()),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99))}


def calculate_metrics(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM-style aggregate metrics; latencies in milliseconds, None where there is no sample."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    ttfts = [r.ttft for r in ok]
    e2els = [r.e2e for r in ok]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    errors = Counter(r.error for r in failed)
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "requests_over_max_tokens": sum(r.output_tokens > r.max_tokens for r in ok if r.max_tokens),
        "mean_tokens_per_chunk": (total_out / sum(r.chunks for r in ok)) if ok and sum(r.chunks for r in ok) else None,
        "first_error": failed[0].error if failed else None,
        "errors": dict(errors.most_common(10)),
        "finish_reasons": dict(Counter(str(r.finish_reason) for r in ok)),
        "prompt_tokens_source": sorted({r.prompt_tokens_source for r in ok}),
        "output_tokens_source": sorted({r.output_tokens_source for r in ok}),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        for stat, value in _stats(values).items():
            metrics[f"{stat}_{name}_ms"] = value
    return metrics


METRIC_KEYS = [
    "completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput",
    *[f"{stat}_{name}_ms" for name in LATENCY_METRICS for stat in ("mean", "median", "std", "p90", "p99")],
]


# --- the run ---


async def _first_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(base_url + "/v1/models", timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_benchmark(
    base_url: str,
    model: str | None = None,
    *,
    endpoint: str = "completions",
    requests: list[BenchRequest] | None = None,
    num_prompts: int = 16,
    input_len: int = 512,
    output_len: int = 128,
    dist: str = "fixed",
    dataset: str | None = None,
    seed: int = 0,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
    temperature: float = 0.0,
    extra_body: dict[str, Any] | None = None,
    warmup: int = 1,
    timeout: float = 600.0,
    label: str | None = None,
    progress: bool = True,
    tokenizer: Callable[[str], int] | None = None,
    client: httpx.AsyncClient | None = None,
) -> dict[str, Any]:
    """Run the benchmark against `base_url` (with or without `/v1`) and return the result dict.

    `requests` (from `build_requests`) fixes the prompts, e.g. to send the same ones to two servers; otherwise
    they are built here (`tokenizer`: a local token counter to calibrate them with, instead of the server's
    tokenize route). `warmup` requests (fresh prompts with the lengths of the first timed ones, at the same
    concurrency) run first and are not timed; `warmup=num_prompts` is an untimed copy of the whole workload,
    which compiles what a JIT server (InferFlux's shape buckets) would otherwise compile during the timed pass.

    Failures never raise: they are counted in the result (a server that does not answer GET /v1/models when no
    `model` is given fails every request with that error). `client`: an `httpx.AsyncClient` to use (e.g. with a
    mock transport); by default one is made with `timeout`.
    """
    if endpoint not in ("completions", "chat"):
        raise ValueError(f"endpoint must be completions or chat, not {endpoint!r}")
    base_url = _strip_v1(base_url)
    url = base_url + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    config: dict[str, Any] = {
        "base_url": base_url, "endpoint": endpoint, "num_prompts": num_prompts, "input_len": input_len,
        "output_len": output_len, "dist": dist, "dataset": dataset, "seed": seed,
        "request_rate": request_rate if math.isfinite(request_rate) else "inf", "max_concurrency": max_concurrency,
        "ignore_eos": ignore_eos, "temperature": temperature, "extra_body": extra_body, "warmup": warmup}
    if client is None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=30.0)) as own:
            return await _run(own, url, base_url, model, requests, config, label, progress, tokenizer)
    return await _run(client, url, base_url, model, requests, config, label, progress, tokenizer)


async def _run(client: httpx.AsyncClient, url: str, base_url: str, model: str | None,
               requests: list[BenchRequest] | None, config: dict[str, Any], label: str | None, progress: bool,
               tokenizer: Callable[[str], int] | None) -> dict[str, Any]:
    c = config
    shape = dict(num_prompts=c["num_prompts"], input_len=c["input_len"], output_len=c["output_len"],
                 dist=c["dist"], dataset=c["dataset"], seed=c["seed"])
    setup_error = None
    if model is None:
        try:
            model = await _first_model(client, base_url)
        except Exception as exc:  # noqa: BLE001
            setup_error = f"GET /v1/models: {type(exc).__name__}: {exc}"
    if requests is None:  # without a server to calibrate against, estimated prompts (the failures get counted)
        requests = await build_requests(None if setup_error else base_url, model, client=client,
                                        tokenizer=tokenizer, **shape)
    config["num_prompts"] = len(requests)
    config["model"] = model
    config["prompt_len_source"] = sorted({r.prompt_len_source for r in requests})
    if setup_error is not None:
        results = [RequestResult(error=setup_error) for _ in requests]
        return _result(label, config, calculate_metrics(results, 0.0), results)

    semaphore = asyncio.Semaphore(c["max_concurrency"]) if c["max_concurrency"] else None

    async def send(req: BenchRequest, t0: float) -> RequestResult:
        if semaphore is None:
            return await send_request(client, url, c["endpoint"], model, req, c["temperature"], c["ignore_eos"],
                                      c["extra_body"], t0)
        async with semaphore:
            return await send_request(client, url, c["endpoint"], model, req, c["temperature"], c["ignore_eos"],
                                      c["extra_body"], t0)

    if c["warmup"] > 0:
        if c["dataset"]:
            warm = requests[:c["warmup"]]
        else:
            # Fresh prompts (so no prefix-cache hits later) with the lengths of the timed ones, in order.
            warm = []
            for i in range(c["warmup"]):
                like = requests[i % len(requests)]
                warm += await build_requests(base_url, model, num_prompts=1,
                                             input_len=like.prompt_len or c["input_len"], output_len=like.output_len,
                                             seed=c["seed"] + 1_000_003 + i, client=client, tokenizer=tokenizer)
        warm_start = time.perf_counter()
        warm_results = await asyncio.gather(*(send(r, time.perf_counter()) for r in warm))
        config["warmup_s"] = time.perf_counter() - warm_start
        config["warmup_failed"] = sum(not r.success for r in warm_results)

    rng = np.random.default_rng(c["seed"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=label or "requests", file=sys.stderr)

    async def tracked(req: BenchRequest, t0: float) -> RequestResult:
        result = await send(req, t0)
        if bar is not None:
            bar.update(1)
        return result

    rate = c["request_rate"]
    t0 = time.perf_counter()
    tasks = []
    for i, req in enumerate(requests):
        if i and rate != "inf" and rate > 0:
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
        tasks.append(asyncio.create_task(tracked(req, t0)))
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return _result(label, config, calculate_metrics(results, duration), results)


def _result(label: str | None, config: dict[str, Any], metrics: dict[str, Any],
            results: list[RequestResult]) -> dict[str, Any]:
    per_request = []
    for r in results:
        item = asdict(r)
        item["itl"] = [round(x, 6) for x in r.itl]
        per_request.append(item)
    return {"label": label, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config, **metrics,
            "requests": per_request}


def benchmark(base_url: str, model: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Synchronous `run_benchmark`."""
    return asyncio.run(run_benchmark(base_url, model, **kwargs))


# --- output ---


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """vLLM-style text summary of one result."""
    width = 50
    title = " Serving Benchmark Result " + (f"({result['label']}) " if result.get("label") else "")
    lines = [f"{title:=^{width}}"]

    def row(name: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{name:<40}{_fmt(value, digits):>10}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("first_error"):
        lines.append(f"  first error: {result['first_error'][:200]}")
    cfg = result["config"]
    row("Max concurrency:", cfg.get("max_concurrency") or "-")
    row("Request rate (req/s):", cfg.get("request_rate"))
    row("Benchmark duration (s):", result["duration_s"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in LATENCY_METRICS:
        lines.append(f"{titles[name]:-^{width}}")
        for stat, title in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{title} {name.upper()} (ms):", result[f"{stat}_{name}_ms"])
    lines.append(f"prompt tokens from: {', '.join(result['prompt_tokens_source']) or '-'}; "
                 f"output tokens from: {', '.join(result['output_tokens_source']) or '-'}")
    lines.append("=" * width)
    return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(result: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, default=_json_default, allow_nan=False) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8080", help="server address (with or without /v1)")
    parser.add_argument("--model", help="served model name (default: the first of GET /v1/models)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrivals per second; inf (default) sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens (mean for --dist uniform)")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens (mean for --dist uniform)")
    parser.add_argument("--dist", choices=["fixed", "uniform"], default="fixed",
                        help="fixed lengths, or uniform in [len/2, 3*len/2]")
    parser.add_argument("--dataset", help="JSON lines with `prompt` and optional `output_len` (and `prompt_len`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos: true and min_tokens = max_tokens (exact output lengths)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    parser.add_argument("--extra-body", type=json.loads, default=None, metavar="JSON",
                        help="fields merged into every request body")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests sent first (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--label", help="name of this run in the table and the JSON")
    parser.add_argument("--json", help="write the result (every metric, per-request details) to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every request succeeded, 1 otherwise."""
    args = parse_args(argv)
    result = benchmark(args.base_url, args.model, endpoint=args.endpoint, num_prompts=args.num_prompts,
                       input_len=args.input_len, output_len=args.output_len, dist=args.dist, dataset=args.dataset,
                       seed=args.seed, request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                       ignore_eos=args.ignore_eos, temperature=args.temperature, extra_body=args.extra_body,
                       warmup=args.warmup, timeout=args.timeout, label=args.label, progress=not args.no_progress)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0 if result["failed"] == 0 and result["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
