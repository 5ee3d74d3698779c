"""Chat templates: Jinja programs shipped with a model that turn messages into a prompt.

Templates come from the model (GGUF `tokenizer.chat_template`, or a Hugging
Face folder's `chat_template.jinja` / `tokenizer_config.json`) and are
untrusted code, so they run in Jinja's immutable sandbox. The environment
matches the one `transformers.apply_chat_template` builds (trim_blocks,
lstrip_blocks, loop controls, a non-escaping `tojson`, `raise_exception`,
`strftime_now`, the `{% generation %}` block), because model authors test
their templates there and we must render the same prompt byte for byte.

A model with no template gets `FALLBACK_TEMPLATE`: plain "Role: text" lines
ending with "Assistant:" — readable by a base model, and free of special
tokens that its vocabulary may lack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inferflux.errors import InferFluxError
from inferflux.formats.json_file import read_json_object

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(InferFluxError):
    """The template rejected the conversation (e.g. roles out of order) or failed to render."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render it as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; model templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str | None, special_tokens: Mapping[str, str] | None = None) -> None:
        self.is_fallback = not source
        self.source = source or FALLBACK_TEMPLATE
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _compile(self.source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text (special tokens included as text).

        Extra keyword arguments reach the template as variables, like
        `chat_template_kwargs` in vLLM (e.g. `enable_thinking=False`).
        """
        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                tools=list(tools) if tools is not None else None,
                documents=list(documents) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ChatTemplateError(f"chat template failed on these messages: {exc}") from None


def template_from_hf_dir(folder: str | Path) -> str | None:
    """The default chat template of a Hugging Face folder, or None.

    `chat_template.jinja` wins over `tokenizer_config.json`, as in transformers;
    a list of named templates yields the one called "default".
    """
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config = read_json_object(folder / "tokenizer_config.json", missing_ok=True)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def special_tokens_from_hf_dir(folder: str | Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings that templates reference as variables."""
    config = read_json_object(Path(folder) / "tokenizer_config.json", missing_ok=True)
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # AddedToken serialized as a dict
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens
