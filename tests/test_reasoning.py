"""Reasoning split out of the answer (`inferflux/server/reasoning.py`), on a tiny model whose template thinks.

The model is the tiny random llama with a Qwen3-style template (it opens `<think>` in the prompt, and
writes `<think>\n\n</think>` there when `enable_thinking` is false) and two of its reserved tokens made
the plain-text `<think>` / `</think>`. `logit_bias` keeps greedy decoding among `</think>` and one
ordinary token, so the engine's own output has reasoning, the closing tag, then an answer.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from tokenizers import Tokenizer

from inferflux.formats.chat_template import ChatTemplate
from inferflux.server.reasoning import ReasoningStream, split_reasoning, thinking_kwargs

TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
NAME = "tiny-think"


# --- the splitter on its own ---

SPLITS = [
    ("<think>\nstep one\n</think>\n\nThe answer.", False, ("step one\n", "The answer.")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("step one\n</think>\n\nThe answer.", True, ("step one\n", "The answer.")),  # the prompt opened <think>
    ("no reasoning here", False, ("", "no reasoning here")),
    ("The <think> tag later is text", False, ("", "The <think> tag later is text")),
    ("<think>cut short by max_tokens", False, ("cut short by max_tokens", "")),
    ("<thin", False, ("", "<thin")),
    ("a </thi", True, ("a </thi", "")),
]


@pytest.mark.parametrize(("output", "inside", "expected"), SPLITS)
def test_split_whole_and_in_random_pieces(output: str, inside: bool, expected: tuple[str, str]) -> None:
    assert split_reasoning(output, inside) == expected
    rng = random.Random(0)
    for _ in range(20):
        stream, thought, answer, pos = ReasoningStream(inside), [], [], 0
        while pos < len(output):
            size = rng.randint(1, 5)
            r, a = stream.feed(output[pos:pos + size])
            pos += size
            thought.append(r)
            answer.append(a)
        r, a = stream.finish()
        assert ("".join(thought) + r, "".join(answer) + a) == expected
        assert not any("<think" in piece or "</think" in piece for piece in thought + answer if piece) or \
            "<thin" in output or "later is text" in output


def test_a_constrained_output_is_the_answer_even_after_an_opened_think() -> None:
    """With a grammar (response_format, a forced call) the first token is the answer's, not a thought's."""
    from inferflux.server.output_split import splitters

    prompt = ChatTemplate(TEMPLATE).render(MESSAGES)
    assert prompt.endswith("<think>\n")
    free, constrained = (splitters(TEMPLATE, [prompt], 1, None, None, constrained=c)[0] for c in (False, True))
    assert free.feed('{"a": 1}', True) == ('{"a": 1}', "", [])
    assert constrained.feed('{"a": 1}', True) == ("", '{"a": 1}', [])


def test_thinking_switches() -> None:
    assert thinking_kwargs(False) == {"enable_thinking": False}
    assert thinking_kwargs("none") == {"enable_thinking": False}
    assert thinking_kwargs(True) == {"enable_thinking": True}
    assert thinking_kwargs("high") == {"enable_thinking": True, "reasoning_effort": "high"}
    assert thinking_kwargs(None) == {}
    assert thinking_kwargs(False, {"enable_thinking": True}) == {"enable_thinking": True}  # the client's kwargs win


# --- a real server ---


@pytest.fixture(scope="module")
def think_model(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("think-model") / "model"
    shutil.copytree(tiny_model("llama"), folder)
    renames = {"<|reserved_special_token_0|>": "</think>", "<|reserved_special_token_1|>": "<think>"}
    tok = json.loads((folder / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] in renames:
            added["content"], added["special"] = renames[added["content"]], False
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for added in config["added_tokens_decoder"].values():
        if added["content"] in renames:
            added["content"], added["special"] = renames[added["content"]], False
    config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def think_server(think_model):
    from tests.fixtures.server import Server

    srv = Server(think_model, NAME)
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def oai(think_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=think_server.url + "/v1", api_key="unused", max_retries=0)


def _prompt_tokens(model: Path, messages=MESSAGES, **kwargs) -> int:
    text = ChatTemplate(TEMPLATE).render(messages, **kwargs)
    return len(Tokenizer.from_file(str(model / "tokenizer.json")).encode(text, add_special_tokens=False).ids)


def _vocab(model: Path) -> dict[str, int]:
    return Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab(with_added_tokens=True)


@pytest.fixture(scope="module")
def biased(oai, think_model) -> tuple[dict[str, float], str]:
    """A logit_bias under which the greedy output thinks, closes `</think>`, then answers; and that raw output."""
    vocab = _vocab(think_model)
    close = vocab["</think>"]
    for word in ("a", "e", "the", "in", "s", "t", "o", "and", "of", "to"):
        if word not in vocab:
            continue
        bias = {str(close): 50.0, str(vocab[word]): 50.0}
        resp = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                           logit_bias=bias, logprobs=True)
        raw = "".join(t.token for t in resp.choices[0].logprobs.content)
        before, _, after = raw.partition("</think>")
        if before and after.strip():
            return bias, raw
    pytest.fail("no candidate token gave reasoning, </think> and an answer")


def test_openai_client_reads_reasoning_apart(oai, biased) -> None:
    bias, raw = biased
    resp = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0, logit_bias=bias)
    message = resp.choices[0].message
    extra = message.model_extra or {}
    reasoning, answer = extra["reasoning_content"], message.content
    assert extra["reasoning"] == reasoning  # both names (llama.cpp/DeepSeek and vLLM/OpenRouter)
    assert reasoning and answer and "think>" not in reasoning + answer
    before, _, after = raw.partition("</think>")
    assert (reasoning, answer) == (before.lstrip(), after.lstrip())  # the engine's text, split at the tag

    thought, text, named = [], [], []
    for chunk in oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                             logit_bias=bias, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        thought.append(extra.get("reasoning_content") or "")
        named.append(extra.get("reasoning") or "")
        text.append(delta.content or "")
    assert "".join(thought) == "".join(named) == reasoning
    assert "".join(text) == answer
    assert sum(1 for piece in thought if piece) > 1  # reasoning streams as its own deltas, not one at the end


def test_switch_reaches_the_template(oai, think_server, think_model) -> None:
    """Every dialect's off switch renders the template with enable_thinking false (a longer prompt here)."""
    on, off = _prompt_tokens(think_model), _prompt_tokens(think_model, enable_thinking=False)
    assert off > on

    def prompt_tokens(**extra) -> int:
        return oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=1, **extra).usage.prompt_tokens

    assert prompt_tokens() == on
    assert prompt_tokens(reasoning_effort="none") == off
    assert prompt_tokens(reasoning_effort="low") == on
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}}) == off
    lms = httpx.post(think_server.url + "/api/v0/chat/completions", timeout=60, json={
        "model": NAME, "messages": MESSAGES, "max_tokens": 1, "reasoning": "off"}).json()
    assert lms["usage"]["prompt_tokens"] == off
    client = ollama.Client(host=think_server.url)
    no_think = client.chat(model=NAME, messages=MESSAGES, think=False, options={"num_predict": 1, "temperature": 0})
    assert no_think.prompt_eval_count == off and not no_think.message.thinking
    thinks = client.generate(model=NAME, prompt=MESSAGES[0]["content"], think=True,
                             options={"num_predict": 1, "temperature": 0})
    assert thinks.prompt_eval_count == on


def test_earlier_reasoning_reaches_the_template(oai, think_server, think_model) -> None:
    """An assistant turn sent back with its reasoning (OpenAI `reasoning_content`/`reasoning`, Ollama `thinking`)."""
    history = [MESSAGES[0], {"role": "assistant", "content": "Scattering.", "reasoning_content": "Light bends"},
               {"role": "user", "content": "Why?"}]
    expected = _prompt_tokens(think_model, history)
    assert expected > _prompt_tokens(think_model, [{k: v for k, v in m.items() if k != "reasoning_content"}
                                                   for m in history])
    for key in ("reasoning_content", "reasoning"):
        messages = [{(key if k == "reasoning_content" else k): v for k, v in m.items()} for m in history]
        got = oai.chat.completions.create(model=NAME, messages=messages, max_tokens=1).usage.prompt_tokens
        assert got == expected, key
    ollama_history = [{("thinking" if k == "reasoning_content" else k): v for k, v in m.items()} for m in history]
    reply = ollama.Client(host=think_server.url).chat(model=NAME, messages=ollama_history,
                                                      options={"num_predict": 1})
    assert reply.prompt_eval_count == expected


def test_ollama_client_thinking(oai, think_server) -> None:
    """`think=True`: the reasoning is `message.thinking` (chat) and `thinking` (generate), whole and streamed."""
    greedy = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    expected = (greedy.choices[0].message.model_extra or {}).get("reasoning_content")
    assert expected  # no </think> within 8 random tokens: all of it is reasoning
    client = ollama.Client(host=think_server.url)
    options = {"num_predict": 8, "temperature": 0}
    chat = client.chat(model=NAME, messages=MESSAGES, think=True, options=options)
    assert chat.message.thinking == expected and chat.message.content == greedy.choices[0].message.content
    streamed = list(client.chat(model=NAME, messages=MESSAGES, think=True, options=options, stream=True))
    assert "".join(c.message.thinking or "" for c in streamed) == expected
    assert sum(1 for c in streamed if c.message.thinking) > 1
    gen = client.generate(model=NAME, prompt=MESSAGES[0]["content"], think="high", options=options)
    assert gen.thinking == expected and "think>" not in (gen.response or "")


def test_think_on_a_model_without_reasoning_is_a_400(think_server) -> None:
    """A template without <think> (a created name over the model): Ollama answers think=true with a 400."""
    client = ollama.Client(host=think_server.url)
    client.create(model="plain-chat", from_=NAME, template="{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="plain-chat", messages=MESSAGES, think=True)
    assert err.value.status_code == 400 and "thinking" in str(err.value)
    plain = client.chat(model="plain-chat", messages=MESSAGES, options={"num_predict": 4, "temperature": 0})
    assert plain.message.content and not plain.message.thinking  # no template <think>: no splitting
