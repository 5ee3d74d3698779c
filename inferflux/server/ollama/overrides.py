"""What Ollama's `/api/create` sets over an existing model, and how generate, chat and show apply it.

`ollama create mario --from llama3.2` with a system prompt, default options (`parameters`) or a
template makes a new name for the same weights: tools use it to ship a persona or sampling
defaults. The store records these per name in the manifest (`ModelStore.copy(..., overrides)`);
the routes read them for the name a request gives (never for the names of the model given to
`inferctl serve`, which win over stored names). A request's own values win over them: its `system`
(or a system message in `messages`), each of its `options`.

`template` is a Jinja chat template, the language InferFlux renders prompts with (and what
`/api/show` returns as `template`, so a show-then-create round trip works). Ollama's Go templates
are refused with a 400 naming the alternative, rather than applied wrongly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from inferflux.formats.chat_template import ChatTemplate, ChatTemplateError
from inferflux.server.errors import bad_request

# Ollama options honoured by the sampling (see generate.sampling), and those accepted and ignored.
KNOWN_OPTIONS = frozenset({
    "num_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "seed", "stop", "num_ctx", "lora", "speculative",
})
IGNORED_OPTIONS = frozenset({
    "num_keep", "repeat_last_n", "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
    "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_gqa",
})
# `{{ .Prompt }}`, `{{ if .System }}`, `{{ range .Messages }}`, `{{ end }}`: Go's text/template, not Jinja.
_GO_TEMPLATE = re.compile(r"\{\{-?\s*(?:\.|(?:if|range|with|else if)\s+\.|end\s*-?\}\}|else\s*-?\}\})")


@dataclasses.dataclass(frozen=True)
class Overrides:
    """One stored name's settings from `/api/create`; the empty one changes nothing."""

    system: str | None = None
    template: str | None = None
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    license: str | None = None

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Overrides:
        """From a manifest's `overrides` (files users can edit: anything malformed is left out)."""
        params = raw.get("parameters")

        def text(key: str) -> str | None:
            value = raw.get(key)
            return value if isinstance(value, str) and value else None

        return cls(text("system"), text("template"), dict(params) if isinstance(params, Mapping) else {},
                   text("license"))

    def options(self, requested: Any) -> Any:
        """The request's `options` over this model's `parameters` (a malformed `options` is left to be refused)."""
        if not self.parameters or (requested is not None and not isinstance(requested, Mapping)):
            return requested
        return {**self.parameters, **(requested or {})}

    def messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The system prompt goes first unless the conversation has its own."""
        if not self.system or any(m.get("role") == "system" for m in messages):
            return list(messages)
        return [{"role": "system", "content": self.system}, *messages]

    def chat_template(self, model_template: ChatTemplate) -> ChatTemplate:
        """The recorded template, with the model's special tokens (bos_token, ...), else the model's own."""
        if not self.template:
            return model_template
        try:
            return ChatTemplate(self.template, model_template.special_tokens)
        except ChatTemplateError as exc:
            raise bad_request(f"this model's recorded template: {exc}") from None


NONE = Overrides()


async def overrides_for(name: Any) -> Overrides:
    """What `/api/create` recorded for the name a request gives; nothing for the served model's names."""
    from inferflux.server.http import server_state  # the app's state: imported when a request runs

    pool = server_state().pool
    if not isinstance(name, str) or not name or pool.is_default(name):
        return NONE
    raw = await asyncio.to_thread(pool.store.overrides, name)
    return Overrides.of(raw) if raw else NONE


def check_create_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """`system`, `template`, `parameters` and `license` of a create request, checked; what the store records."""
    found: dict[str, Any] = {}
    for key in ("system", "template"):
        value = data.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise bad_request(f"`{key}` must be a string")
        found[key] = value
    if "template" in found:
        if _GO_TEMPLATE.search(found["template"]):
            raise bad_request("Go templates are not supported: `template` is a Jinja chat template here (what "
                              "/api/show returns); leave it out to keep the model's own")
        try:
            ChatTemplate(found["template"])
        except ChatTemplateError as exc:
            raise bad_request(f"`template`: {exc}") from None
    license_text = data.get("license")
    if isinstance(license_text, list) and all(isinstance(t, str) for t in license_text):
        license_text = "\n".join(license_text)
    if license_text not in (None, ""):
        if not isinstance(license_text, str):
            raise bad_request("`license` must be a string or a list of strings")
        found["license"] = license_text
    params = data.get("parameters")
    if params not in (None, {}):
        found["parameters"] = check_parameters(params)
    return found


def check_parameters(params: Any) -> dict[str, Any]:
    """Ollama options as a model's defaults: known names and JSON scalars (`stop`: strings) only."""
    if not isinstance(params, Mapping):
        raise bad_request("`parameters` must be an object of Ollama options, e.g. {\"temperature\": 0.2}")
    checked: dict[str, Any] = {}
    for key, value in params.items():
        if key not in KNOWN_OPTIONS | IGNORED_OPTIONS:
            raise bad_request(f"unknown parameter `{key}`; known: {', '.join(sorted(KNOWN_OPTIONS))}")
        if value is None:
            continue
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
                raise bad_request("parameter `stop` must be a string or a list of strings")
            checked[key] = stops
        elif isinstance(value, (bool, int, float, str)):
            checked[key] = value
        else:
            raise bad_request(f"parameter `{key}` must be a number, got {json.dumps(value)[:40]}")
    return checked


def parameters_text(params: Mapping[str, Any]) -> str:
    """Ollama's `/api/show` `parameters`: one `name value` line each, `stop` once per string."""
    lines = []
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        lines += [f"{key:<30} {json.dumps(v) if isinstance(v, str) else _scalar(v)}" for v in values]
    return "\n".join(lines)


def modelfile_lines(overrides: Overrides) -> list[str]:
    """SYSTEM, PARAMETER, TEMPLATE and LICENSE lines of a Modelfile for what a name overrides."""
    lines = []
    if overrides.template:
        lines.append(f'TEMPLATE """{overrides.template}"""')
    if overrides.system:
        lines.append(f'SYSTEM """{overrides.system}"""')
    for key, value in overrides.parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(item) if isinstance(item, str) else _scalar(item)}")
    if overrides.license:
        lines.append(f'LICENSE """{overrides.license}"""')
    return lines


def _scalar(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
