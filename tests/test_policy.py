"""Policy and guardrails end to end: a real server with auth, policies set through /admin/policies, the
real `openai` client, an in-process Rego policy (regorus), the audit log on disk, and the CLI.

There is no `opa` server binary in the package registries this project installs from, so the remote
OPA path (`policy.opa.url`) is not exercised here; the in-process engine evaluates the same Rego.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from inferflux.server.access.keys import KeyStore
from inferflux.server.policy.pii import detect

ROOT = Path(__file__).resolve().parents[1]
REGO = """package inferflux

default allow := false
allow if { not denied }
denied if { input.tenant == "blocked"; input.model == "tiny" }
reason := "model tiny is not allowed for tenant blocked" if { denied }
decision := {"allow": allow, "reason": reason} if { denied }
decision := {"allow": true} if { not denied }
"""


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.fixtures.server import Server, private_home

    home = private_home()
    store = KeyStore.at_home(home)
    keys = {}
    for tenant in ("ops", "masked", "plain", "filtered", "blocked", "local"):
        store.create_tenant(tenant)
        keys[tenant], _ = store.create_key(tenant, "admin,models:read" if tenant == "ops" else "inference,embeddings")
    rego = tmp_path_factory.mktemp("rego") / "policy.rego"
    rego.write_text(REGO)
    server = Server(tiny_model("llama"), "tiny", home=home, extra=[
        "security.auth=required", f"policy.opa.rego_file={rego}", "policy.opa.path=inferflux/decision",
        "policy.poll_seconds=0.2", "runtime.max_model_len=512"])
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['ops']}"}, timeout=60)
    for scope, document in (("masked", {"pii": {"EMAIL": "mask"}}), ("filtered", {"blocked_terms": ["@"]}),
                            ("filtered:tiny", {"blocked_patterns": ["forbidden\\s+word"]})):
        answer = admin.put("/admin/policies", json={"scope": scope, "document": document})
        assert answer.status_code == 200, answer.text
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("llama"))
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 100 for t in ("a", "b", "@", ".")}
    yield server, keys, admin, home, bias
    admin.close()
    status = server.stop()
    assert status == 0, server.output()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def audit_records(home: Path, request_id: str) -> list[dict]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for path in sorted((home / "audit").glob("audit-*.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("request_id") == request_id:
                    return [record]
        time.sleep(0.2)
    raise AssertionError(f"no audit record for {request_id}")


def test_echo_shows_the_masked_prompt_and_the_audit_holds_no_pii(served) -> None:
    server, keys, _, home, _ = served
    raw = client(server, keys["masked"]).completions.with_raw_response.create(
        model="tiny", prompt="contact bob.smith@example.com please", max_tokens=1, echo=True)
    answer = raw.parse()
    assert answer.choices[0].text.startswith("contact [EMAIL] please")
    request_id = raw.headers["x-request-id"]
    record = audit_records(home, request_id)[0]
    assert record["policy"].startswith("scrubbed opa=local-") and record["tenant"] == "masked"
    assert "allow" not in record["policy"] and record["status"] == 200
    for path in (home / "audit").glob("*.jsonl"):
        assert "bob.smith" not in path.read_text()
    # The tenant without a policy sees its prompt unchanged.
    plain = client(server, keys["plain"]).completions.create(
        model="tiny", prompt="contact bob.smith@example.com please", max_tokens=1, echo=True)
    assert plain.choices[0].text.startswith("contact bob.smith@example.com please")


def _generate(server, key: str, bias: dict, seed: int, stream: bool) -> tuple[str, str, list[str]]:
    """(text, finish_reason, the streamed pieces) of a completion pushed toward a, b, @ and '.'."""
    kwargs = dict(model="tiny", prompt="x", max_tokens=240, temperature=1.0, seed=seed, logit_bias=bias,
                  extra_body={"ignore_eos": True})
    if not stream:
        answer = client(server, key).completions.create(**kwargs)
        return answer.choices[0].text, answer.choices[0].finish_reason, [answer.choices[0].text]
    pieces, reason = [], None
    for chunk in client(server, key).completions.create(stream=True, **kwargs):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
    return "".join(pieces), reason, pieces


def _seed_with_email(server, keys, bias) -> tuple[int, str]:
    for seed in range(20):
        text, _, _ = _generate(server, keys["plain"], bias, seed, stream=False)
        if [e for e in detect(text) if e.kind == "EMAIL"]:
            return seed, text
    raise AssertionError("no seed made the model write an email address")


def test_output_is_scrubbed_streamed_and_not(served) -> None:
    server, keys, _, _, bias = served
    seed, raw = _seed_with_email(server, keys, bias)
    emails = [e.text for e in detect(raw) if e.kind == "EMAIL"]
    whole, reason, _ = _generate(server, keys["masked"], bias, seed, stream=False)
    streamed, stream_reason, pieces = _generate(server, keys["masked"], bias, seed, stream=True)
    assert whole == streamed and reason == stream_reason == "length"
    assert "[EMAIL]" in whole and len(pieces) > 3
    assert not [e for e in detect(streamed) if e.kind == "EMAIL"]
    for email in emails:
        assert email not in streamed
    so_far = ""
    for piece in pieces:  # no prefix of the stream ever held an address
        so_far += piece
        assert not [e for e in detect(so_far) if e.kind == "EMAIL"]


def test_content_filters(served) -> None:
    server, keys, _, _, bias = served
    with pytest.raises(openai.BadRequestError) as caught:
        client(server, keys["filtered"]).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "a forbidden   word"}], max_tokens=2)
    assert caught.value.status_code == 400 and caught.value.code == "content_policy_violation"
    seed, raw = _seed_with_email(server, keys, bias)
    whole, reason, _ = _generate(server, keys["filtered"], bias, seed, stream=False)
    streamed, stream_reason, _ = _generate(server, keys["filtered"], bias, seed, stream=True)
    assert reason == stream_reason == "content_filter"
    assert whole == streamed == raw[:raw.index("@")]
    answer = client(server, keys["filtered"]).completions.with_raw_response.create(
        model="tiny", prompt="x", max_tokens=240, temperature=1.0, seed=seed, logit_bias=bias,
        extra_body={"ignore_eos": True})
    record = audit_records(served[3], answer.headers["x-request-id"])[0]
    assert record["policy"].startswith("content_filter opa=local-"), record


def test_rego_denies_one_tenant_the_model(served) -> None:
    server, keys, _, home, _ = served
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(server, keys["blocked"]).chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "model tiny is not allowed for tenant blocked" in caught.value.message
    record = audit_records(home, caught.value.response.headers["x-request-id"])[0]
    assert record["policy"].startswith("deny:opa opa=local-") and record["status"] == 403
    raw = client(server, keys["plain"]).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.parse().choices[0].message is not None
    assert audit_records(home, raw.headers["x-request-id"])[0]["policy"].startswith("allow opa=local-")


def test_admin_versions_rollback_metric_and_cli(served) -> None:
    server, keys, admin, _, _ = served
    listed = admin.get("/admin/policies").json()
    version = listed["policy_version"]
    assert {r["scope"] for r in listed["data"]} >= {"masked", "filtered", "filtered:tiny"}
    bad = {"scope": "masked", "document": {"pii": {"EMAIL": "nope"}}}
    assert admin.put("/admin/policies", json=bad).status_code == 400
    assert admin.put("/admin/policies", json={"scope": "bad scope!", "document": {}}).status_code == 400
    assert admin.post("/admin/policies/rollback", json={"version": 9999}).status_code == 404
    masked_v = next(r["version"] for r in listed["data"] if r["scope"] == "masked")
    env = {"INFERFLUX_URL": server.url, "INFERFLUX_API_KEY": keys["ops"], "PATH": "/usr/bin:/bin"}
    policy_file = Path(server.home) / "hash.json"
    policy_file.write_text(json.dumps({"scope": "masked", "document": {"pii": {"EMAIL": "hash"}}}))
    run = [sys.executable, "-m", "inferctl.cli", "admin", "policy"]
    done = subprocess.run([*run, "set", str(policy_file)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    hashed = client(server, keys["masked"]).completions.create(model="tiny", prompt="to bob@example.com",
                                                                max_tokens=1, echo=True).choices[0].text
    assert hashed.startswith("to [EMAIL:") and "bob" not in hashed
    done = subprocess.run([*run, "rollback", str(masked_v)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    masked = client(server, keys["masked"]).completions.create(model="tiny", prompt="to bob@example.com",
                                                                max_tokens=1, echo=True).choices[0].text
    assert masked.startswith("to [EMAIL]")
    shown = subprocess.run([*run, "list", "--json"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert json.loads(shown.stdout)["policy_version"] == version + 2
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {keys['ops']}"}).text
    line = next(x for x in metrics.splitlines() if x.startswith("inferflux:policy_version{"))
    assert float(line.rsplit(" ", 1)[1]) == version + 2


def test_remote_opa_protocol_cache_and_fail_closed(tmp_path: Path) -> None:
    """The REST client against a stand-in that speaks OPA's Data API (POST /v1/data/<path>) and evaluates
    the same Rego with regorus: there is no `opa` binary here. Cache per input; unreachable denies."""
    import http.server
    import threading

    import regorus

    from inferflux.config_schema import OpaConfig
    from inferflux.server.policy.opa import Opa

    calls: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append({"path": self.path, **body})
            engine = regorus.Engine()
            engine.add_policy("policy.rego", REGO)
            engine.set_input_json(json.dumps(body["input"]))
            rule = "data." + self.path.removeprefix("/v1/data/").replace("/", ".")
            answer = json.dumps({"result": engine.eval_rule(rule), "decision_id": f"d{len(calls)}"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        opa = Opa(OpaConfig(url=f"http://127.0.0.1:{httpd.server_port}", path="inferflux/decision", cache_seconds=60))
        denied = opa.decide({"tenant": "blocked", "model": "tiny", "policy_version": 1})
        assert not denied.allow and "not allowed for tenant blocked" in denied.reason and denied.decision_id == "d1"
        assert calls[0]["path"] == "/v1/data/inferflux/decision" and calls[0]["input"]["tenant"] == "blocked"
        assert opa.decide({"tenant": "blocked", "model": "tiny", "policy_version": 1}) == denied  # cached
        assert len(calls) == 1
        again = opa.decide({"tenant": "blocked", "model": "tiny", "policy_version": 2})  # a new version: asked again
        assert not again.allow and again.decision_id == "d2" and len(calls) == 2
        assert opa.decide({"tenant": "acme", "model": "tiny", "policy_version": 2}).allow
    finally:
        httpd.shutdown()
    port = httpd.server_port
    assert not Opa(OpaConfig(url=f"http://127.0.0.1:{port}", timeout_ms=200)).decide({"tenant": "x"}).allow
    assert Opa(OpaConfig(url=f"http://127.0.0.1:{port}", timeout_ms=200, fail_open=True)).decide({"tenant": "x"}).allow


def test_scrub_hook_rewrites_messages_and_tool_results() -> None:
    from inferflux.server.generation import Prompt
    from inferflux.server.policy.document import PolicyDocument
    from inferflux.server.policy.hooks import PolicyContext, ScrubHook

    doc = PolicyDocument(pii={"EMAIL": "mask", "US_SSN": "redact"})
    ctx = PolicyContext("acme", "key_x", ["inference"], "openai.chat_completions", "tiny", None, doc, 3, b"salt")
    prompts = [Prompt(messages=[
        {"role": "system", "content": "never repeat 536-22-8726"},
        {"role": "user", "content": [{"type": "text", "text": "mail ann@example.org"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "found bob@example.com"}])]
    ScrubHook().pre(ctx, prompts)
    messages = prompts[0].messages
    assert messages[0]["content"] == "never repeat "
    assert messages[1]["content"][0]["text"] == "mail [EMAIL]" and messages[1]["content"][1] == {"type": "image_url"}
    assert messages[2]["tool_calls"] == [{"id": "c1"}]
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "found [EMAIL]"}
    assert ctx.found == ["US_SSN", "EMAIL", "EMAIL"]


def _metric(server, key: str, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name + "{"))


def test_a_content_filter_stop_aborts_the_engine_request(served) -> None:
    """The stopped choice's engine request is aborted (the client-disconnect path): it does not run on to
    max_tokens, its usage counts the tokens generated until then, and nothing is left running."""
    server, keys, _, home, bias = served
    seed, raw = _seed_with_email(server, keys, bias)
    assert raw.index("@") < 120  # the stop comes long before max_tokens
    kwargs = dict(model="tiny", prompt="x", max_tokens=240, temperature=1.0, seed=seed, logit_bias=bias,
                  extra_body={"ignore_eos": True})
    raw_answer = client(server, keys["filtered"]).completions.with_raw_response.create(**kwargs)
    answer = raw_answer.parse()
    assert answer.choices[0].finish_reason == "content_filter"
    assert 0 < answer.usage.completion_tokens < 240, answer.usage  # the old path reported all 240
    record = audit_records(home, raw_answer.headers["x-request-id"])[0]
    assert record["completion_tokens"] == answer.usage.completion_tokens
    usage = None
    for chunk in client(server, keys["filtered"]).completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs):
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].finish_reason:
            assert chunk.choices[0].finish_reason == "content_filter"
    assert usage is not None and 0 < usage.completion_tokens < 240, usage
    both = client(server, keys["filtered"]).completions.create(**{**kwargs, "n": 2})  # one engine request, 2 samples
    assert [c.finish_reason for c in both.choices] == ["content_filter"] * 2
    assert both.usage.completion_tokens < 2 * 240, both.usage  # aborted once both samples stopped
    deadline = time.monotonic() + 10  # the engine's gauges refresh after its next step
    while _metric(server, keys["ops"], "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, keys["ops"], "vllm:num_requests_running") == 0
    assert _metric(server, keys["ops"], "vllm:kv_cache_usage_perc") == 0


def test_a_local_cli_change_is_applied_by_the_poll(served) -> None:
    """`inferctl admin policy set` without --url writes state.db directly; the server's version poll
    (policy.poll_seconds, 0.2 s here) picks it up: requests themselves never read the store."""
    server, keys, _, home, _ = served
    prompt = "mail ann@example.org"
    talk = client(server, keys["local"])
    assert talk.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True).choices[0].text.startswith(
        prompt)
    policy_file = Path(home) / "local.json"
    policy_file.write_text(json.dumps({"scope": "local", "document": {"pii": {"EMAIL": "mask"}}}))
    env = {"INFERFLUX_HOME": str(home), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "inferctl.cli", "admin", "policy", "set", str(policy_file)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while True:
        text = talk.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True).choices[0].text
        if text.startswith("mail [EMAIL]") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert text.startswith("mail [EMAIL]"), text


SEND = {"type": "function", "function": {"name": "send", "description": "Send a mail", "parameters": {
    "type": "object", "properties": {"to": {"type": "string", "pattern": "[ab]{2,4}@[ab]{2,4}\\.com"}},
    "required": ["to"]}}}


def _send(server, key: str, stream: bool) -> tuple[list[dict], str | None]:
    """(each call's parsed arguments, finish_reason) of a chat completion forced to call `send`."""
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "mail it"}], tools=[SEND],
                  tool_choice={"type": "function", "function": {"name": "send"}}, max_tokens=60, seed=3)
    if not stream:
        choice = client(server, key).chat.completions.create(**kwargs).choices[0]
        calls = [json.loads(c.function.arguments) for c in choice.message.tool_calls or []]
        return calls, choice.finish_reason
    args, finish, names = "", None, 0
    for chunk in client(server, key).chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            for call in chunk.choices[0].delta.tool_calls or []:
                names += bool(call.function and call.function.name)
                args += (call.function.arguments or "") if call.function else ""
            finish = chunk.choices[0].finish_reason or finish
    return ([json.loads(args)] if names else []), finish


def test_tool_call_arguments_are_scrubbed_and_filtered(served) -> None:
    server, keys, _, _, _ = served
    (plain,), reason = _send(server, keys["plain"], stream=False)
    assert reason == "tool_calls" and [e.kind for e in detect(plain["to"])] == ["EMAIL"], plain
    for stream in (False, True):
        calls, reason = _send(server, keys["masked"], stream)
        assert calls == [{"to": "[EMAIL]"}] and reason == "tool_calls", (stream, calls)
        calls, reason = _send(server, keys["filtered"], stream)  # "@" is a blocked term: the call is not sent
        assert calls == [] and reason == "content_filter", (stream, calls, reason)


def test_embedding_inputs_are_scrubbed_openai_and_ollama(served) -> None:
    import numpy as np
    import ollama

    server, keys, _, home, _ = served
    texts = ["contact bob.smith@example.com today", "nothing to hide"]
    raw = client(server, keys["masked"]).embeddings.with_raw_response.create(model="tiny", input=texts)
    masked = raw.parse()
    as_seen = client(server, keys["plain"]).embeddings.create(model="tiny",
                                                              input=["contact [EMAIL] today", texts[1]])
    unscrubbed = client(server, keys["plain"]).embeddings.create(model="tiny", input=texts)
    assert masked.usage.prompt_tokens == as_seen.usage.prompt_tokens != unscrubbed.usage.prompt_tokens
    assert np.allclose(masked.data[0].embedding, as_seen.data[0].embedding, atol=1e-4)
    assert not np.allclose(masked.data[0].embedding, unscrubbed.data[0].embedding, atol=1e-4)
    record = audit_records(home, raw.headers["x-request-id"])[0]
    assert record["policy"] == "scrubbed" and "bob.smith" not in json.dumps(record)
    with pytest.raises(openai.BadRequestError) as caught:
        client(server, keys["filtered"]).embeddings.create(model="tiny", input=["write to a@b.com"])
    assert caught.value.code == "content_policy_violation"

    def ollama_client(tenant: str) -> ollama.Client:
        return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {keys[tenant]}"})

    got = ollama_client("masked").embed(model="tiny", input=texts[0])
    assert np.allclose(got.embeddings[0], as_seen.data[0].embedding, atol=1e-4)
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client("filtered").embed(model="tiny", input="write to a@b.com")
    assert refused.value.status_code == 400 and "content policy" in refused.value.error
