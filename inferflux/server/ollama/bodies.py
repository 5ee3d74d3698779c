"""Ollama's request bodies as pydantic models (field names and defaults from Ollama's docs/api.md).

Unknown fields are accepted and ignored, as Ollama does. The legacy `name` is read as `model`.
`options` keeps unknown keys (they are logged and ignored, see `generate.py`); the ones it uses are
typed, so `{"temperature": "hot"}` is a 400 naming `options.temperature`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from inferflux.server.adapters import LoraRef
from inferflux.server.keep_alive import parse_keep_alive


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _name_is_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" in cls.model_fields and not data.get("model") and data.get("name"):
            return {**data, "model": data["name"]}
        return data


class _Named(_Body):
    model: str = Field(min_length=1)


class _Loads(_Named):
    keep_alive: str | float | None = None

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_parses(cls, value: str | float | None) -> str | float | None:
        parse_keep_alive(value)  # raises ValueError with the reason
        return value

    @property
    def keep_alive_seconds(self) -> float | None:
        return parse_keep_alive(self.keep_alive)


class Options(_Body):
    num_predict: StrictInt | None = None
    temperature: float | None = None
    top_k: StrictInt | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    num_ctx: StrictInt | None = None
    lora: list[LoraRef] | None = None  # InferFlux: LoRA adapters to stack, with scales (server/openai/lora.py)
    speculative: StrictBool | None = None  # InferFlux: false opts out of speculative decoding (docs/speculative.md)

    @field_validator("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
                     mode="before")
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        return value


class _Generates(_Loads):
    stream: bool = True
    format: Any = None
    options: Options | None = None
    think: bool | Literal["low", "medium", "high"] | None = None  # reasoning models: `thinking` apart, or off

    def refused(self) -> str | None:
        """Why this request cannot be served, or None (`format` is structured output: server/structured.py)."""
        return None


class GenerateRequest(_Generates):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[StrictInt] | None = None
    raw: bool = False
    images: list[str] | None = None

    def refused(self) -> str | None:
        if self.images:
            return "images are not supported: this server has no vision models"
        if self.suffix:
            return "`suffix` (fill-in-the-middle) is not supported"
        if self.template:
            return ("custom Go `template`s are not supported; the model's chat template is used "
                    "(or send `raw: true` with a formatted prompt)")
        return super().refused()


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None  # an earlier answer's reasoning, sent back

    def for_template(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.thinking is not None:  # the name reasoning templates read (Qwen3, DeepSeek-R1)
            message["reasoning_content"] = self.thinking
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_name:
            message["name"] = message["tool_name"] = self.tool_name
        return message


class ChatRequest(_Generates):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None

    def refused(self) -> str | None:
        if any(m.images for m in self.messages):
            return "images are not supported: this server has no vision models"
        return super().refused()


class EmbedRequest(_Loads):
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: StrictInt | None = None
    options: dict[str, Any] | None = None


class EmbeddingsRequest(_Loads):
    prompt: str = ""
    options: dict[str, Any] | None = None


class ShowRequest(_Named):
    verbose: bool = False


class PullRequest(_Named):
    insecure: bool = False
    stream: bool = True


class CopyRequest(_Body):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class DeleteRequest(_Named):
    pass


class CreateRequest(_Named):
    from_: str | None = Field(default=None, alias="from")
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] | None = None
    license: str | list[str] | None = None
    modelfile: str | None = None
    files: dict[str, Any] | None = None
    adapters: dict[str, Any] | None = None
    quantize: str | None = None
    messages: list[dict[str, Any]] | None = None
    stream: bool = True
