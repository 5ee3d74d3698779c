"""The OpenAI-compatible server, as clients see it: a real process on loopback, the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferflux import LLM, SamplingParams
from tests.fixtures.server import Server


@pytest.fixture(scope="module")
def reference(tiny_model):
    return LLM(tiny_model("llama"), max_model_len=256, num_pages=200, max_logprobs=5)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about llamas."}]


def test_chat_greedy_equals_llm(client, reference) -> None:
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = reference.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))[0]
    assert got.choices[0].message.content == expected.outputs[0].text
    assert got.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert got.object == "chat.completion" and got.model == "tiny"


def test_completion_greedy_equals_llm(client, reference) -> None:
    got = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    expected = reference.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=10))[0]
    assert got.choices[0].text == expected.outputs[0].text
    ids = client.completions.create(model="tiny", prompt=expected.prompt_token_ids, max_tokens=10, temperature=0)
    assert ids.choices[0].text == expected.outputs[0].text


def test_streaming_matches_non_streaming(client) -> None:
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=8, temperature=0, stream=True))
    assert streamed == client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0) \
        .choices[0].text


def test_n_stop_seed_logprobs(client) -> None:
    two = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, n=2, seed=11,
                                         temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, n=2, seed=11,
                                           temperature=1.0)
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]
    free = client.completions.create(model="tiny", prompt="The", max_tokens=16, temperature=0).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 2]
    if stop.strip():
        cut = client.completions.create(model="tiny", prompt="The", max_tokens=16, temperature=0, stop=[stop])
        assert cut.choices[0].text == free[: free.find(stop)] and cut.choices[0].finish_reason == "stop"
    chat_lp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                             logprobs=True, top_logprobs=3)
    content = chat_lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].logprob == pytest.approx(max(t.logprob for t in content[0].top_logprobs))  # greedy
    legacy = client.completions.create(model="tiny", prompt="The", max_tokens=4, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == 4
    assert "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text


def test_models_tokenize_version(server, client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, timeout=120).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=120).json()["prompt"]
    assert "Hello world" in text
    assert httpx.get(server.url + "/version", timeout=120).json()["version"]


def test_async_client(server) -> None:
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        results = await asyncio.gather(*[
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Q{i}"}],
                                           max_tokens=6, temperature=0) for i in range(4)])
        await client.close()
        return results

    results = asyncio.run(main())
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)


def test_32_concurrent_streams(server) -> None:
    async def one(http: httpx.AsyncClient, i: int) -> list[str]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"stream {i}"}], "max_tokens": 12,
                "stream": True}
        lines = []
        async with http.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line[len("data: "):])
        return lines

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*[one(http, i) for i in range(32)])

    for lines in asyncio.run(main()):
        assert lines.count("[DONE]") == 1 and lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ("{not json", 400, "not valid JSON"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": MESSAGES, "n": 0}, 400, "n must be"),
        ({"model": "tiny", "messages": MESSAGES, "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": 5000}, 400, "maximum context length is 256"),
        ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
        ({"model": "gpt-9", "messages": MESSAGES}, 404, "gpt-9"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70000}]}, 413, "limit"),
    ],
)
def test_bad_input(server, body, status: int, fragment: str) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + "/v1/chat/completions", content=data,
                          headers={"Content-Type": "application/json"}, timeout=120)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                    timeout=120)
    assert ok.status_code == 200  # still serving


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"1.5": 1}}, "logit_bias"),
        ("/tokenize", {"model": None, "prompt": None, "messages": []}, "messages"),
        ("/tokenize", {"messages": None}, "prompt"),
    ],
)
def test_malformed_fields_are_400s(server, path: str, body: dict, fragment: str) -> None:
    response = httpx.post(server.url + path, json=body, timeout=120)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]
    assert httpx.get(server.url + "/healthz", timeout=60).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_every_n_up_to_max_num_seqs_completes(server, client, stream: bool) -> None:
    """n samples finishing on the same step (greedy, one length) and on different steps (sampled, stop string)."""
    for n in range(1, 17):  # runtime.max_num_seqs of the test server
        for kind in ("same", "different"):
            extra = dict(temperature=0, max_tokens=3) if kind == "same" else dict(
                temperature=1.0, seed=n, max_tokens=12, stop=["e", "a"])
            if n % 2:
                res = client.chat.completions.create(model="tiny", messages=MESSAGES, n=n, stream=stream,
                                                     timeout=60, **extra)
            else:
                res = client.completions.create(model="tiny", prompt="Once upon", n=n, stream=stream, timeout=60,
                                                **extra)
            if stream:
                finished = [c.choices[0].index for c in res if c.choices and c.choices[0].finish_reason]
            else:
                finished = [c.index for c in res.choices if c.finish_reason]
            assert sorted(finished) == list(range(n)), (n, kind)


def test_completion_refusals(server) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "suffix": "b"}, timeout=120)
    assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]


def test_metrics_move(server, client) -> None:
    def scrape() -> dict[tuple[str, tuple], float]:
        text = httpx.get(server.url + "/metrics", timeout=120).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return values

    def total(values, name, **labels) -> float:
        return sum(v for (n, lab), v in values.items() if n == name and all((k, val) in lab for k, val in
                                                                             labels.items()))

    before = scrape()
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    after = scrape()
    ok = dict(endpoint="/v1/chat/completions", status="200")
    assert total(after, "inferflux:requests_total", **ok) - total(before, "inferflux:requests_total", **ok) == 2
    assert total(after, "inferflux:generation_tokens_total") - total(before, "inferflux:generation_tokens_total") \
        == 10
    assert total(after, "inferflux:e2e_request_latency_seconds_count") - \
        total(before, "inferflux:e2e_request_latency_seconds_count") == 2
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert any(n == name for n, _ in after)


def test_cors(server) -> None:
    allowed = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}, timeout=120)
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example"}, timeout=120)
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
    assert "evil.example" in other.json()["error"]["message"]
    preflight = httpx.options(server.url + "/api/chat", headers={"Origin": "https://evil.example"}, timeout=120)
    assert preflight.status_code == 403
    plain = httpx.get(server.url + "/v1/models", timeout=120)  # no Origin: not a browser, allowed
    assert plain.status_code == 200


def test_websocket_chat(server) -> None:
    import websockets.sync.client as ws_client

    with ws_client.connect(server.url.replace("http", "ws") + "/v1/chat/completions/ws") as ws:
        ws.send(json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}))
        messages = []
        while True:
            message = json.loads(ws.recv())
            messages.append(message)
            if message.get("object") == "done" or "error" in message:
                break
    assert messages[-1] == {"object": "done"}
    assert messages[0]["choices"][0]["delta"]["role"] == "assistant"
    assert messages[-2]["choices"][0]["finish_reason"] == "length"


def test_reload_swaps_model_mid_stream(tiny_model) -> None:
    server = Server(tiny_model("llama"), "first")
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
            "model": "first", "messages": MESSAGES, "max_tokens": 200, "stream": True,
            "extra": 1, "ignore_eos": True}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            reload = httpx.post(server.url + "/admin/reload", timeout=180,
                                json={"model": str(tiny_model("qwen2")), "served_model_name": "second"})
            assert reload.status_code == 200, reload.text
            rest = [line for line in lines if line.startswith("data: ")]
        chunks = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
        assert rest[-1] == "data: [DONE]"
        assert all(c["model"] == "first" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        after = httpx.post(server.url + "/v1/chat/completions", json={"model": "second", "messages": MESSAGES,
                                                                      "max_tokens": 3}, timeout=120)
        assert after.status_code == 200 and after.json()["model"] == "second"
        gone = httpx.post(server.url + "/v1/chat/completions", json={"model": "first", "messages": MESSAGES},
                          timeout=120)
        assert gone.status_code == 404
    finally:
        assert server.stop() == 0, server.output()


def test_sigterm_drains_streams(tiny_model) -> None:
    server = Server(tiny_model("llama"), "drain", ["server.drain_seconds=1.5"])
    results: list[list[str]] = []
    ready_codes: list[int] = []

    async def one(http: httpx.AsyncClient, i: int, long: bool) -> None:
        body = {"model": "drain", "messages": [{"role": "user", "content": f"s{i}"}], "stream": True,
                "max_tokens": 230 if long else 8, "ignore_eos": True}
        lines = []
        async with http.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
        results.append(lines)

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            tasks = [asyncio.create_task(one(http, i, long=i % 2 == 0)) for i in range(8)]
            await asyncio.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            for _ in range(20):
                try:
                    ready_codes.append((await http.get(server.url + "/readyz")).status_code)
                except httpx.HTTPError:
                    break
                if ready_codes[-1] == 503:
                    break
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert server.proc.wait(60) == 0, server.output()
    assert 503 in ready_codes
    assert len(results) == 8
    for lines in results:
        assert lines and lines[-1] == "[DONE]"
        last = json.loads(lines[-2])
        finished = "choices" in last and last["choices"] and last["choices"][0]["finish_reason"]
        assert finished or "error" in last


def test_client_disconnect_frees_pages(server) -> None:
    """Closing the connection mid-stream aborts the request: nothing keeps running or holds pages."""

    def gauge(name: str) -> float:
        text = httpx.get(server.url + "/metrics", timeout=120).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    generated_before = gauge("inferflux:generation_tokens_total")
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break  # leaving the block closes the connection
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gauge("inferflux:num_requests_running") == 0 and gauge("inferflux:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    assert gauge("inferflux:num_requests_running") == 0
    assert gauge("inferflux:kv_cache_usage_perc") == 0
    # Not aborted, each would have generated 200 tokens.
    assert gauge("inferflux:generation_tokens_total") - generated_before < 100


def test_overloaded_server_answers_503(tiny_model) -> None:
    server = Server(tiny_model("qwen2"), "busy", ["server.max_queued_requests=0"])
    try:
        response = httpx.post(server.url + "/v1/completions", json={"model": "busy", "prompt": "hi"}, timeout=120)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(server.url + "/healthz", timeout=120).status_code == 200
    finally:
        assert server.stop() == 0, server.output()
