"""Multi-LoRA at run time: fidelity to transformers on merged weights, mixed batches, stacking, hot unload,
no recompilation, prefix-cache isolation and clear errors for adapters that do not fit the base model."""

from __future__ import annotations

from pathlib import Path

import httpx
import ollama
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from inferflux import LLM, SamplingParams
from inferflux.engine.lora import LoraError
from inferflux.engine.sampling_params import SamplingParamsError
from tests.fixtures.server import Server

PROMPT = [5, 17, 42, 99, 7, 230, 64, 3, 150, 11, 300, 12]
STEPS = 24
RUNTIME = dict(page_size=8, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128, num_pages=160,
               max_logprobs=5, max_loras=4, max_lora_rank=8)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (r, lora_alpha, target_modules, use_rslora, seed)
ADAPTERS = {"a1": (4, 8, ALL, False, 1), "a2": (8, 16, ["q_proj", "v_proj", "down_proj"], True, 2),
            "a3": (2, 4, ["o_proj", "up_proj"], False, 3)}


def greedy(lora=None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, lora=lora)


def hf_greedy(model: torch.nn.Module, prompt: list[int] = PROMPT) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def make_adapter(base: Path, out: Path, r: int, alpha: int, targets: list[str], rslora: bool, seed: int) -> Path:
    """A PEFT adapter with random (non-zero) B, saved as PEFT does."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


def merged(base: Path, adapters: list[tuple[Path, float]]) -> torch.nn.Module:
    """transformers' base model plus each adapter's merged delta (merge_and_unload minus base) times its scale."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for path, scale in adapters:
        one = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                        path).merge_and_unload()
        for k, v in one.state_dict().items():
            state[k] += scale * (v - model.state_dict()[k])
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model, tmp_path_factory):
    base = tiny_model(request.param)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    paths = {name: make_adapter(base, root / name, *spec) for name, spec in ADAPTERS.items()}
    llm = LLM(base, **RUNTIME)
    llm.load_lora("a1", paths["a1"])
    llm.load_lora("a2", paths["a2"])
    refs: dict[tuple, list[int]] = {}

    def ref(*stack: tuple[str, float]) -> list[int]:
        """transformers' greedy tokens on the base with these (adapter, scale) merged; cached per module."""
        if stack not in refs:
            refs[stack] = hf_greedy(merged(base, [(paths[name], scale) for name, scale in stack]))
        return refs[stack]

    return ref, paths, llm, base


def test_single_adapter_matches_merged_transformers(setup) -> None:
    ref, paths, llm, _ = setup
    assert llm.generate([PROMPT], greedy())[0].outputs[0].token_ids == ref()
    for name in ("a1", "a2"):
        expected = ref((name, 1.0))
        assert expected != ref()  # the adapter really changes the output
        assert llm.generate([PROMPT], greedy([(name, 1.0)]))[0].outputs[0].token_ids == expected


def test_mixed_batch_and_stack(setup) -> None:
    """Base, a1, a2 and a stack a1 x 1.0 + a2 x 0.5 in one batch: each equals its own reference."""
    ref, paths, llm, _ = setup
    cases = [None, [("a1", 1.0)], [("a2", 1.0)], [("a1", 1.0), ("a2", 0.5)]]
    refs = [ref(*(c or ())) for c in cases]
    assert len({tuple(r) for r in refs}) == 4
    outs = llm.generate([PROMPT] * 4, [greedy(c) for c in cases])
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_hot_load_unload_never_recompiles(setup) -> None:
    ref, paths, llm, _ = setup
    mix = [None, [("a1", 1.0)], [("a1", 0.5), ("a2", 1.0)]]
    before = llm.generate([PROMPT] * 3, [greedy(c) for c in mix])  # warm these shapes
    compiles = llm.runner.programs.compiles
    llm.load_lora("a3", paths["a3"])
    assert sorted(llm.list_loras()) == ["a1", "a2", "a3"]
    a3 = llm.generate([PROMPT], greedy([("a3", 1.0)]))[0].outputs[0].token_ids
    assert a3 == ref(("a3", 1.0))
    llm.unload_lora("a3")
    with pytest.raises(SamplingParamsError, match="a3"):
        llm.generate([PROMPT], greedy([("a3", 1.0)]))
    # A different adapter under the same name: the prefix cache must not hand it a3's pages.
    llm.load_lora("a3", paths["a1"])
    assert llm.generate([PROMPT], greedy([("a3", 1.0)]))[0].outputs[0].token_ids == before[1].outputs[0].token_ids
    llm.unload_lora("a3")
    again = llm.generate([PROMPT] * 3, [greedy(c) for c in mix])
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in before]
    assert llm.runner.programs.compiles == compiles


def test_unload_waits_for_running_requests(setup) -> None:
    ref, paths, llm, _ = setup
    llm.load_lora("a3", paths["a3"])
    slot = llm.engine.loras.by_name["a3"]
    stream = llm.stream(PROMPT, greedy([("a3", 1.0)]))
    tokens = list(next(stream).new_token_ids)
    llm.unload_lora("a3")  # the running request keeps its adapter to the end
    assert slot in llm.engine.loras.slots
    for out in stream:
        tokens += out.new_token_ids
    assert tokens == ref(("a3", 1.0))
    assert slot not in llm.engine.loras.slots  # zeroed and free once it finished
    assert llm.generate([PROMPT], greedy())[0].outputs[0].token_ids == ref()


def test_bad_adapters_are_clear_errors(setup, tiny_model, tmp_path) -> None:
    _, paths, llm, base = setup
    with pytest.raises(LoraError, match="rank 16"):
        llm.load_lora("big", make_adapter(base, tmp_path / "big", 16, 16, ["q_proj"], False, 4))
    other = make_adapter(tiny_model("mistral"), tmp_path / "mistral", 4, 8, ["k_proj"], False, 5)
    with pytest.raises(LoraError, match="not an adapter of this base model"):
        llm.load_lora("mistral", other)
    with pytest.raises(LoraError, match="unsupported tensor"):
        llm.load_lora("head", make_adapter(base, tmp_path / "head", 4, 8, ["lm_head"], False, 6))
    with pytest.raises(LoraError, match="already loaded"):
        llm.load_lora("a1", paths["a1"])
    with pytest.raises(LoraError, match="not a PEFT adapter"):
        llm.load_lora("none", tmp_path)
    with pytest.raises(LoraError, match="no adapter named"):
        llm.unload_lora("missing")
    assert sorted(llm.list_loras()) == ["a1", "a2"]


def test_lora_off_by_default(tiny_model, tmp_path) -> None:
    llm = LLM(tiny_model("llama"), **{**RUNTIME, "max_loras": 0})
    with pytest.raises(LoraError, match="runtime.max_loras"):
        llm.load_lora("a1", tmp_path)
    assert not any("lora" in str(path) for path, _ in llm.runner.state.flat_state())


def test_gguf_base_model(tiny_model, tiny_gguf, tmp_path) -> None:
    """A GGUF base (Q/K rows un-permuted to Hugging Face order at load) takes PEFT's B as is."""
    base = tiny_model("llama")
    path = make_adapter(base, tmp_path / "a1", *ADAPTERS["a1"])
    llm = LLM(tiny_gguf("llama", "F32"), **RUNTIME)
    llm.load_lora("a1", path)
    out = llm.generate([PROMPT], greedy([("a1", 1.0)]))[0].outputs[0].token_ids
    assert out == hf_greedy(merged(base, [(path, 1.0)]))


@pytest.fixture(scope="module")
def lora_server(tiny_model, tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("lora-http")
    paths = {name: make_adapter(base, root / name, *spec) for name, spec in ADAPTERS.items()}
    server = Server(base, "tiny", ["runtime.max_loras=2", "runtime.max_lora_rank=8"])
    yield server, paths
    server.stop()


def test_http_load_select_stack_unload(lora_server) -> None:
    """vLLM's load/unload routes, `/v1/models` parents, `model: "<adapter>"` and the `lora` stacking extension."""
    server, paths = lora_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")

    def complete(model: str = "tiny", **extra) -> str:
        out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0,
                                        extra_body=extra or None)
        return out.choices[0].text

    base_text = complete()
    for name in ("a1", "a2"):
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(paths[name])})
        assert r.status_code == 200, r.text
    cards = {m.id: m for m in client.models.list().data}
    assert cards["a1"].parent == "tiny" and cards["a2"].parent == "tiny"
    assert client.models.retrieve("a2").parent == "tiny"
    a1 = complete("a1")
    assert a1 != base_text
    assert complete(lora=[{"name": "a1", "scale": 1.0}]) == a1
    stacked = complete(lora=[{"name": "a1", "scale": 1.0}, {"name": "a2", "scale": 0.5}])
    assert complete("a1", lora=[{"name": "a2", "scale": 0.5}]) == stacked
    assert stacked not in (a1, base_text)
    # Ollama: the adapter's name as the model, or `options.lora` on the base.
    ollama_client = ollama.Client(host=server.url)

    def ollama_text(model: str = "tiny", **options) -> str:
        return ollama_client.generate(model=model, prompt="Once upon a time", raw=True,
                                      options={"temperature": 0, "num_predict": 12, **options}).response

    ollama_a1 = ollama_text("a1")
    assert ollama_a1 == ollama_text(lora=[{"name": "a1", "scale": 1.0}]) != ollama_text()
    # Errors: a full slot table, a bad folder, an unknown adapter in `lora`.
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": str(paths["a3"])})
    assert r.status_code == 400 and "slots" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="nope"):
        complete(lora=[{"name": "nope", "scale": 1.0}])
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        complete("a1")
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 404
    assert "a1" not in {m.id for m in client.models.list().data}
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    assert r.status_code == 400 and "PEFT" in r.json()["error"]["message"]
    assert complete() == base_text
