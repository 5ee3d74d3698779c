"""Chat templates render exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from inferflux.formats.chat_template import (
    FALLBACK_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    special_tokens_from_hf_dir,
    template_from_hf_dir,
)
from tests.fixtures.models import CHATML_TEMPLATE, INST_TEMPLATE, LLAMA3_TEMPLATE

# Exercises namespace, loop controls, slicing, filters, strftime_now, the generation block and tojson options.
FEATURE_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages if m.role == 'system' %}{% set ns.system = ns.system + m.content %}{% endfor -%}
[date {{ strftime_now('%Y-%m-%d') }}]{{ ns.system | upper }}
{% for m in messages %}
{%- if m.role == 'system' %}{% continue %}{% endif -%}
{%- if loop.index > 6 %}{% break %}{% endif -%}
<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content | replace('\\n', ' ') }}{% endif %}</{{ m.role }}>
{% endfor %}
{%- if tools %}{{ tools | tojson(indent=1, sort_keys=True) }}{% endif %}
{%- if documents %}{% for d in documents %}[{{ d.title }}]{% endfor %}{% endif %}
{{- extra_flag | default('no-flag') }}{% if add_generation_prompt %}<assistant>{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city, in °C",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "  What is 2+2?\n"}],
    [{"role": "user", "content": "Wie geht's? 你好 🙂"}, {"role": "assistant", "content": "Gut, danke."},
     {"role": "user", "content": "Und dir?"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
         "name": "get_weather", "arguments": {"city": "Zürich"}}}]},
     {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]}],
]
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "features": FEATURE_TEMPLATE}


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model("llama"))


# Only ChatML here handles list-of-parts content; the others take strings (their contract, not ours).
CASES = [(t, c) for t in sorted(TEMPLATES) for c in range(len(CONVERSATIONS))
         if t == "chatml" or all(isinstance(m["content"], str) for m in CONVERSATIONS[c])]


@pytest.mark.parametrize(("template_name", "conversation"), CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_matches_transformers(hf_tokenizer, tiny_model, template_name, conversation, add_generation_prompt,
                              with_tools) -> None:
    source = TEMPLATES[template_name]
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if with_tools else None
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=source, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
        extra_flag="FLAG", documents=[{"title": "Doc A", "text": "a"}],
    )
    template = ChatTemplate(source, special_tokens_from_hf_dir(tiny_model("llama")))
    got = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                          extra_flag="FLAG", documents=[{"title": "Doc A", "text": "a"}])
    assert got == expected


def test_raise_exception_becomes_clear_error(tiny_model) -> None:
    template = ChatTemplate(INST_TEMPLATE, special_tokens_from_hf_dir(tiny_model("mistral")))
    ok = template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert ok.startswith("<s>[INST] a [/INST]b</s>") or "[INST] a [/INST]" in ok
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render([{"role": "assistant", "content": "first"}])


def test_template_sources(tiny_model, tmp_path) -> None:
    folder = tiny_model("qwen2")
    assert template_from_hf_dir(folder) == CHATML_TEMPLATE
    # chat_template.jinja wins over tokenizer_config.json, as in transformers.
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "ignored"}')
    assert template_from_hf_dir(tmp_path) == "{{ messages[0]['content'] }}"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}')
    assert template_from_hf_dir(tmp_path) == "D"


def test_fallback_and_sandbox() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback and template.source == FALLBACK_TEMPLATE
    text = template.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "System: S\nUser: U\nAssistant:"
    # Templates are untrusted: the sandbox refuses access to Python internals.
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ChatTemplate("{% for %}")
