"""Several models behind one server, as the real `ollama` client sees them: pull, copy, delete, keep-alive.

One server for the module (the tiny llama folder as "tiny", defaults otherwise: `server.keep_alive`
5m, `server.max_loaded_models` 1), with its own INFERFLUX_HOME; its store gets the same tiny model
as an F32 GGUF, so a stored model and the served one must give identical greedy text. The last test
drives the same server with the npm `ollama` package (Ollama's JavaScript client) when `node` and
`npm` are installed and npm can install `ollama` (cached under $TMPDIR/inferflux-npm-ollama).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.server import Server

GREEDY = {"temperature": 0, "num_predict": 8}
HI = [{"role": "user", "content": "Tell me about llamas."}]
STORED = "llama-F32"  # the GGUF's file stem: the name a pull from a path gets


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = Server(tiny_model("llama"), "tiny")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def gguf(tiny_gguf):
    return tiny_gguf("llama", "F32")


def ensure_stored(client, gguf) -> None:
    if f"{STORED}:latest" not in [m.model for m in client.list().models]:
        assert client.pull(str(gguf)).status == "success"


def loaded(client) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.model: m for m in client.ps().models}


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def seconds_left(model) -> float:
    return (model.expires_at - datetime.datetime.now(datetime.UTC)).total_seconds()


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=60).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_pull_list_show_copy_delete(server, client, gguf) -> None:
    progress = list(client.pull(str(gguf), stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == [
        "verifying sha256 digest", "writing manifest", "success"]
    layers = [p for p in progress if p.digest]
    size = gguf.stat().st_size
    assert layers and all(p.status == f"pulling {p.digest[7:19]}" and p.total == size for p in layers)
    assert layers[-1].completed == size and layers[0].digest.startswith("sha256:")
    assert client.pull(str(gguf), stream=False).status == "success"  # again: the blob is reused

    models = {m.model: m for m in client.list().models}
    assert set(models) == {"tiny:latest", f"{STORED}:latest"}
    stored = models[f"{STORED}:latest"]
    assert stored.size == size and len(stored.digest) == 64
    assert stored.details.format == "gguf" and stored.details.family == "llama"
    assert stored.details.quantization_level == "F32" and stored.details.parameter_size
    assert stored.details.parameter_size == models["tiny:latest"].details.parameter_size

    show = client.show(STORED)  # read from the file's headers: nothing is loaded
    assert show.details.format == "gguf" and show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["tokenizer.ggml.tokens"] is None  # arrays only with verbose, as Ollama
    assert show.template and "completion" in show.capabilities
    assert f"{STORED}:latest" not in loaded(client)

    assert client.copy(STORED, "mycopy:v1").status == "success"
    copied = {m.model: m for m in client.list().models}["mycopy:v1"]
    assert copied.digest == stored.digest and copied.size == size
    assert client.copy("tiny", "tiny-saved").status == "success"  # the served folder, stored under a name
    saved = {m.model: m for m in client.list().models}["tiny-saved:latest"]
    assert saved.details.format == "safetensors" and saved.size > 0

    assert client.delete("mycopy:v1").status == "success"
    assert client.delete("tiny-saved").status == "success"
    assert {m.model for m in client.list().models} == {"tiny:latest", f"{STORED}:latest"}
    with pytest.raises(ollama.ResponseError) as info:
        client.delete("mycopy:v1")
    assert info.value.status_code == 404 and "mycopy" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        client.copy("nope", "other")
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        client.delete("tiny")  # the served folder is not a stored model
    assert info.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as info:
        client.pull("/no/such/model.gguf")
    assert info.value.status_code == 404


def test_listing_reads_only_manifests(server, client, gguf) -> None:
    """/api/tags, /api/v0/models and /v1/models answer from the facts recorded at pull: with the stored model's
    blob moved away (no model file left to open), they list it with the same details as before."""
    ensure_stored(client, gguf)
    manifest = json.loads((server.home / "models" / "manifests" / STORED / "latest.json").read_text())
    facts = manifest["facts"]
    assert (facts["kind"], facts["architecture"], facts["quantization"]) == ("llm", "llama", "F32")
    assert facts["capabilities"] == ["completion", "tools"] and facts["context_length"] > 0
    before = {m.model: m for m in client.list().models}[f"{STORED}:latest"]
    blob = server.home / "models" / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")
    hidden = blob.with_name(".hidden-" + blob.name)
    blob.rename(hidden)
    try:
        after = {m.model: m for m in client.list().models}[f"{STORED}:latest"]
        assert after.details == before.details and after.size == before.size and after.digest == before.digest
        lmstudio = httpx.get(f"{server.url}/api/v0/models/{STORED}", timeout=30).json()
        assert (lmstudio["type"], lmstudio["arch"], lmstudio["quantization"]) == ("llm", "llama", "F32")
        assert lmstudio["state"] == "not-loaded" and lmstudio["max_context_length"] > 0
        ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]]
        assert any(i.startswith(STORED) for i in ids)
    finally:
        hidden.rename(blob)


def test_load_on_first_use_and_lru_eviction(server, client, gguf) -> None:
    ensure_stored(client, gguf)
    client.generate(model="tiny", prompt="", keep_alive=-1)  # make sure the served model is the loaded one
    served = client.chat(model="tiny", messages=HI, options=GREEDY)
    assert set(loaded(client)) == {"tiny:latest"}
    reply = client.chat(model=STORED, messages=HI, options=GREEDY)
    assert reply.message.content == served.message.content  # same weights, same greedy text
    assert reply.load_duration > 0 and reply.total_duration > reply.load_duration
    assert reply.eval_count == served.eval_count and reply.prompt_eval_count == served.prompt_eval_count
    # max_loaded_models is 1: the idle served model made room; the stored one gets the 5m default.
    models = loaded(client)
    assert set(models) == {f"{STORED}:latest"}
    assert 240 < seconds_left(models[f"{STORED}:latest"]) <= 300
    assert models[f"{STORED}:latest"].size == gguf.stat().st_size
    again = client.chat(model="tiny", messages=HI, options=GREEDY)  # loads it back, evicting the other
    assert again.message.content == served.message.content and again.load_duration > 0
    assert set(loaded(client)) == {"tiny:latest"} and loaded(client)["tiny:latest"].expires_at.year > 2100
    loaded_now = client.chat(model="tiny", messages=HI, options=GREEDY)
    assert loaded_now.load_duration == 0


def test_keep_alive(server, client, gguf) -> None:
    ensure_stored(client, gguf)
    reply = client.generate(model=STORED, prompt="hi", options=GREEDY, keep_alive=0)
    assert reply.done and reply.eval_count > 0
    assert wait_for(lambda: f"{STORED}:latest" not in loaded(client))  # unloaded after the request
    reply = client.generate(model=STORED, prompt="hi", options=GREEDY, keep_alive="10m")  # loads it again
    assert reply.load_duration > 0
    assert 540 < seconds_left(loaded(client)[f"{STORED}:latest"]) <= 600
    client.generate(model=STORED, prompt="hi", options=GREEDY, keep_alive=30)
    assert 20 < seconds_left(loaded(client)[f"{STORED}:latest"]) <= 30
    client.generate(model=STORED, prompt="hi", options=GREEDY, keep_alive="1h30m")
    assert 5300 < seconds_left(loaded(client)[f"{STORED}:latest"]) <= 5400
    client.generate(model=STORED, prompt="hi", options=GREEDY, keep_alive=-1)
    assert loaded(client)[f"{STORED}:latest"].expires_at.year > 2100
    # An empty prompt loads (or with keep_alive 0 unloads) without generating, as in Ollama.
    assert client.generate(model=STORED, prompt="", keep_alive=0).done_reason == "unload"
    assert wait_for(lambda: f"{STORED}:latest" not in loaded(client))
    assert client.chat(model=STORED, messages=[]).done_reason == "load"
    assert f"{STORED}:latest" in loaded(client)
    # A timer that runs out unloads the model by itself.
    client.chat(model=STORED, messages=HI, options=GREEDY, keep_alive="1s")
    assert wait_for(lambda: f"{STORED}:latest" not in loaded(client), timeout=20)
    # The served model too follows an explicit keep_alive, and comes back on the next request.
    assert client.generate(model="tiny", prompt="", keep_alive=0).done_reason == "unload"
    assert wait_for(lambda: not loaded(client))
    assert client.generate(model="tiny", prompt="hi", options=GREEDY).done
    assert loaded(client)["tiny:latest"].expires_at.year > 2100
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model=STORED, prompt="hi", keep_alive="soon")
    assert info.value.status_code == 400 and "keep_alive" in info.value.error


def test_concurrent_first_requests_load_once(server, client, gguf) -> None:
    ensure_stored(client, gguf)
    client.generate(model=STORED, prompt="", keep_alive=0)
    assert wait_for(lambda: f"{STORED}:latest" not in loaded(client))
    loads = metric(server, "inferflux:model_loads_total")

    async def main():
        async_client = ollama.AsyncClient(host=server.url)
        return await asyncio.gather(*[
            async_client.chat(model=STORED, messages=[{"role": "user", "content": f"q{i}"}], options=GREEDY)
            for i in range(4)])

    replies = asyncio.run(main())
    assert all(r.done and r.eval_count > 0 for r in replies)
    assert any(r.load_duration > 0 for r in replies)  # the first ones waited for the one load
    assert metric(server, "inferflux:model_loads_total") - loads == 1
    assert metric(server, "inferflux:models_loaded") == 1


def test_openai_and_lmstudio_routes_reach_stored_models(server, client, gguf) -> None:
    ensure_stored(client, gguf)
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=60).json()["data"]]
    assert ids == ["tiny", f"{STORED}:latest"]
    assert httpx.get(server.url + f"/v1/models/{STORED}", timeout=60).json()["id"] == f"{STORED}:latest"
    body = {"messages": HI, "max_tokens": 6, "temperature": 0, "ttl": 120}
    reply = httpx.post(server.url + "/v1/chat/completions", json={**body, "model": STORED}, timeout=120).json()
    served = httpx.post(server.url + "/v1/chat/completions", json={**body, "model": "tiny"}, timeout=120).json()
    assert reply["choices"][0]["message"]["content"] == served["choices"][0]["message"]["content"]
    assert reply["model"] == f"{STORED}:latest"
    # `ttl` (LM Studio) is the keep-alive: the served model now unloads 120 s after its last request.
    assert 100 < seconds_left(loaded(client)["tiny:latest"]) <= 120
    client.generate(model="tiny", prompt="", keep_alive=-1)
    states = {m["id"]: m for m in httpx.get(server.url + "/api/v0/models", timeout=60).json()["data"]}
    assert states["tiny"]["state"] == "loaded" and states[f"{STORED}:latest"]["state"] == "not-loaded"
    assert states[f"{STORED}:latest"]["compatibility_type"] == "gguf"
    assert states[f"{STORED}:latest"]["max_context_length"] == 256
    embedded = httpx.post(server.url + "/v1/embeddings", json={"model": STORED, "input": "hi"}, timeout=120)
    assert embedded.status_code == 200 and embedded.json()["model"] == f"{STORED}:latest"


def test_delete_unloads_a_loaded_model(server, client, gguf) -> None:
    ensure_stored(client, gguf)
    assert client.copy(STORED, "doomed").status == "success"
    client.generate(model="doomed", prompt="hi", options=GREEDY, keep_alive=-1)
    assert f"{STORED}:latest" in loaded(client) or "doomed:latest" in loaded(client)
    assert client.delete("doomed").status == "success"
    assert not {f"{STORED}:latest", "doomed:latest"} & set(loaded(client))
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="doomed", prompt="hi")
    assert info.value.status_code == 404
    assert client.generate(model=STORED, prompt="hi", options=GREEDY).done  # the other name still works


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/api/generate", "{not json", 400),
    ("POST", "/api/chat", "[1, 2]", 400),
    ("POST", "/api/pull", "{}", 400),
    ("POST", "/api/pull", json.dumps({"model": "bad name!"}), 400),
    ("POST", "/api/copy", json.dumps({"source": "tiny"}), 400),
    ("POST", "/api/copy", json.dumps({"source": "tiny", "destination": "../escape"}), 400),
    ("DELETE", "/api/delete", "{oops", 400),
    ("DELETE", "/api/delete", json.dumps({"model": "nope"}), 404),
    ("POST", "/api/show", json.dumps({"model": "nope"}), 404),
    ("POST", "/api/embed", json.dumps({"model": "nope", "input": "x"}), 404),
    ("POST", "/api/chat", json.dumps({"model": "nope:v2", "messages": HI}), 404),
    ("POST", "/api/generate", json.dumps({"model": "tiny", "prompt": "x", "keep_alive": [1]}), 400),
    ("GET", "/api/pull", "", 405),
    ("POST", "/api/chat", json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70000}]}),
     413),
])
def test_malformed_and_unknown_get_ollama_errors(server, method: str, path: str, body: str, status: int) -> None:
    response = httpx.request(method, server.url + path, content=body, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)
    assert httpx.get(server.url + "/api/tags", timeout=60).status_code == 200  # still serving


# --- pull of a model the server has, and /api/create over an existing model ---

SYSTEM = "You are a llama farmer. Answer in one sentence."
DERIVED = {"temperature": 0, "num_predict": 6}
JINJA = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "


def manifest_layers(server, name: str) -> list[dict]:
    return json.loads((server.home / "models" / "manifests" / name / "latest.json").read_text())["layers"]


def test_pull_of_a_model_already_here_succeeds(server, client, gguf) -> None:
    """Ollama answers a pull of a model it has with success; pull-before-use tools rely on it."""
    ensure_stored(client, gguf)
    progress = list(client.pull(STORED, stream=True))  # a bare name: no longer looked up in Ollama's store
    assert [p.status for p in progress][0] == "pulling manifest" and progress[-1].status == "success"
    layers = [p for p in progress if p.digest]
    assert [(p.digest, p.total) for p in layers] == [(layer["digest"], layer["size"])
                                                     for layer in manifest_layers(server, STORED)]
    assert all(p.completed == p.total for p in layers)
    assert client.pull(f"{STORED}:latest").status == "success"
    assert client.pull("tiny").status == "success"  # the served model
    with pytest.raises(ollama.ResponseError) as info:
        client.pull("not-here-anywhere")
    assert info.value.status_code == 400 and "not in the Ollama store" in info.value.error


def test_create_from_an_existing_model(server, client, gguf) -> None:
    """`from` + system / parameters / template: a new name over the same blobs, honoured by show, chat, generate."""
    ensure_stored(client, gguf)
    blobs = sorted((server.home / "models" / "blobs").iterdir())
    progress = list(client.create(model="farmer", from_=STORED, system=SYSTEM, parameters=DERIVED, stream=True))
    assert progress[-1].status == "success"
    assert manifest_layers(server, "farmer") == manifest_layers(server, STORED)  # the same blobs, nothing copied
    assert sorted((server.home / "models" / "blobs").iterdir()) == blobs
    listed = {m.model: m for m in client.list().models}
    assert listed["farmer:latest"].size == listed[f"{STORED}:latest"].size
    assert listed["farmer:latest"].digest != listed[f"{STORED}:latest"].digest  # it answers differently

    shown = client.show("farmer")
    assert "temperature" in shown.parameters and "num_predict" in shown.parameters
    assert f'SYSTEM """{SYSTEM}"""' in shown.modelfile and "PARAMETER num_predict 6" in shown.modelfile
    raw = httpx.post(server.url + "/api/show", json={"model": "farmer"}, timeout=60).json()
    assert raw["system"] == SYSTEM

    prompt = "Tell me about llamas."
    made = client.generate(model="farmer", prompt=prompt)
    explicit = client.generate(model=STORED, prompt=prompt, system=SYSTEM, options=DERIVED)
    plain = client.generate(model=STORED, prompt=prompt, options=DERIVED)
    assert made.response == explicit.response and made.eval_count == explicit.eval_count <= 6
    assert made.prompt_eval_count == explicit.prompt_eval_count > plain.prompt_eval_count
    chat = client.chat(model="farmer", messages=HI)
    explicit_chat = client.chat(model=STORED, messages=[{"role": "system", "content": SYSTEM}, *HI], options=DERIVED)
    assert chat.message.content == explicit_chat.message.content
    assert chat.prompt_eval_count == explicit_chat.prompt_eval_count
    # The request's own values win: its options, its system message.
    assert client.chat(model="farmer", messages=HI, options={"num_predict": 2}).eval_count <= 2
    own = [{"role": "system", "content": "Be terse."}, *HI]
    assert client.chat(model="farmer", messages=own).prompt_eval_count == client.chat(
        model=STORED, messages=own, options=DERIVED).prompt_eval_count

    # A Jinja template, on a name made from the made one (which keeps its parameters).
    assert client.create(model="farmer-plain", from_="farmer", template=JINJA).status == "success"
    assert client.show("farmer-plain").template == JINJA
    templated = client.chat(model="farmer-plain", messages=[{"role": "user", "content": "Hi"}])
    rendered = client.generate(model=STORED, prompt=f"[system] {SYSTEM}\n[user] Hi\n[assistant] ", raw=True,
                               options=DERIVED)
    assert templated.prompt_eval_count == rendered.prompt_eval_count
    assert templated.message.content == rendered.response

    # The modelfile form older clients send, FROM a stored name.
    modelfile = f'FROM {STORED}\nSYSTEM """{SYSTEM}"""\nPARAMETER temperature 0\nPARAMETER num_predict 6\n'
    response = httpx.post(server.url + "/api/create", json={"model": "farmer-mf", "modelfile": modelfile,
                                                            "stream": False}, timeout=60)
    assert response.status_code == 200 and response.json() == {"status": "success"}
    assert client.generate(model="farmer-mf", prompt=prompt).response == made.response

    for name in ("farmer", "farmer-plain", "farmer-mf"):
        assert client.delete(name).status == "success"
    assert sorted((server.home / "models" / "blobs").iterdir()) == blobs  # still the stored model's
    assert client.generate(model=STORED, prompt=prompt, system=SYSTEM, options=DERIVED).response == made.response


@pytest.mark.parametrize(("fields", "status", "fragment"), [
    ({"files": {"model.gguf": "sha256:" + "0" * 64}}, 400, "use `inferctl pull`"),
    ({"modelfile": "FROM ./model.gguf\n"}, 400, "use `inferctl pull`"),
    ({"from": "/models/x.gguf"}, 400, "use `inferctl pull`"),
    ({}, 400, "`from`"),
    ({"from": "nope"}, 404, "nope"),
    ({"from": "tiny", "template": "{{ .System }} {{ .Prompt }}"}, 400, "Go templates are not supported"),
    ({"from": "tiny", "parameters": {"temprature": 0.1}}, 400, "unknown parameter `temprature`"),
    ({"from": "tiny", "adapters": {"lora.gguf": "sha256:" + "0" * 64}}, 400, "not supported"),
    ({"from": "tiny", "quantize": "q4_K_M"}, 400, "inferctl pull"),
])
def test_create_refuses_what_it_cannot_do(server, fields: dict, status: int, fragment: str) -> None:
    response = httpx.post(server.url + "/api/create", json={"model": "refused", "stream": False, **fields},
                          timeout=60)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and fragment in response.json()["error"]
    tags = httpx.get(server.url + "/api/tags", timeout=60).json()["models"]
    assert "refused:latest" not in [m["model"] for m in tags]


def test_create_with_the_ollama_client_from_the_served_model(server, client) -> None:
    """`from` the model given to `inferctl serve` (a folder path): it is stored under the new name."""
    assert client.create(model="tiny-terse", from_="tiny", system="Be terse.").status == "success"
    assert client.show("tiny-terse").details.format == "safetensors"
    terse = client.chat(model="tiny-terse", messages=HI, options=GREEDY)
    served = client.chat(model="tiny", messages=[{"role": "system", "content": "Be terse."}, *HI], options=GREEDY)
    assert terse.message.content == served.message.content
    with pytest.raises(ollama.ResponseError) as info:
        client.create(model="x", from_="tiny", files={"a.gguf": "sha256:" + "0" * 64})
    assert info.value.status_code == 400 and "inferctl pull" in info.value.error
    assert client.delete("tiny-terse").status == "success"


# --- the npm `ollama` package ---

JS_SCRIPT = r"""
import { Ollama } from 'ollama'

const [host, gguf] = process.argv.slice(2)
const o = new Ollama({ host })
const messages = [{ role: 'user', content: 'Tell me about llamas.' }]
const options = { temperature: 0, num_predict: 8 }
const out = {}
out.list = (await o.list()).models.map(m => m.model)
const chat = await o.chat({ model: 'tiny', messages, options })
out.chat = chat.message.content
out.chat_counts = [chat.prompt_eval_count, chat.eval_count, chat.total_duration > 0]
out.chat_stream = ''
for await (const part of await o.chat({ model: 'tiny', messages, options, stream: true })) {
  out.chat_stream += part.message.content
}
out.generate = (await o.generate({ model: 'tiny', prompt: 'Tell me about llamas.', options })).response
out.generate_stream = ''
for await (const part of await o.generate({ model: 'tiny', prompt: 'Tell me about llamas.', options, stream: true })) {
  out.generate_stream += part.response
}
out.embed = (await o.embed({ model: 'tiny', input: ['hello world', 'llamas'] })).embeddings.map(e => e.length)
out.show = (await o.show({ model: 'tiny' })).details.family
out.ps = (await o.ps()).models.map(m => m.model)
out.pull = []
for await (const p of await o.pull({ model: gguf, stream: true })) out.pull.push(p.status)
out.pull_again = (await o.pull({ model: gguf })).status
await o.copy({ source: 'llama-F32', destination: 'js-copy' })
out.after_copy = (await o.list()).models.map(m => m.model).sort()
out.stored_chat = (await o.chat({ model: 'js-copy', messages, options, keep_alive: 0 })).message.content
await o.delete({ model: 'js-copy' })
await o.delete({ model: 'llama-F32' })
out.after_delete = (await o.list()).models.map(m => m.model)
try {
  await o.chat({ model: 'nope', messages })
} catch (e) {
  out.error = [e.status_code, e.error]
}
console.log(JSON.stringify(out))
"""


@pytest.fixture(scope="module")
def node_ollama() -> Path:
    """A folder where `import 'ollama'` resolves (npm install, once per machine)."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed")
    folder = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "inferflux-npm-ollama"
    if not (folder / "node_modules" / "ollama" / "package.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(folder), "ollama"],
                                    capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install ollama timed out (no registry access?)")
        if result.returncode != 0:
            pytest.skip(f"npm cannot install ollama: {result.stderr.strip()[-300:]}")
    return folder


def test_npm_ollama_client(server, client, node_ollama: Path, gguf) -> None:
    for model in client.list().models:  # start from an empty store, the served model loaded
        if model.model != "tiny:latest":
            client.delete(model.model)
    client.generate(model="tiny", prompt="", keep_alive=-1)
    script = node_ollama / "inferflux-check.mjs"
    script.write_text(JS_SCRIPT)
    result = subprocess.run(["node", str(script), server.url, str(gguf)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr + server.output()
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["list"] == ["tiny:latest"]
    assert out["chat"] == out["chat_stream"] == out["generate"] == out["generate_stream"]
    assert out["chat_counts"][0] > 0 and 0 < out["chat_counts"][1] <= 8 and out["chat_counts"][2]
    assert out["embed"] == [out["embed"][0]] * 2 and out["embed"][0] > 0
    assert out["show"] == "llama" and out["ps"] == ["tiny:latest"]
    assert out["pull"][0] == "pulling manifest" and out["pull"][-1] == "success"
    assert any(status.startswith("pulling ") and status != "pulling manifest" for status in out["pull"])
    assert out["pull_again"] == "success"
    assert out["after_copy"] == ["js-copy:latest", f"{STORED}:latest", "tiny:latest"]
    assert out["stored_chat"] == out["chat"]  # the same weights, stored as a GGUF
    assert out["after_delete"] == ["tiny:latest"]
    assert out["error"][0] == 404 and "nope" in out["error"][1]
