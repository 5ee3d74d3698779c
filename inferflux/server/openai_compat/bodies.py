"""OpenAI-format request bodies (with vLLM's and LM Studio's extra fields), validated by pydantic.

Field names and defaults follow OpenAI's API and vLLM's `protocol.py`, so
existing clients work unchanged. Unknown fields are ignored, as vLLM does, so
clients that send newer OpenAI fields keep working; mistyped known fields are
400s naming the field. Each generating body turns itself into a protocol-neutral
`GenerationSpec` (`spec()`); nothing else of the server reads these fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inferflux.engine.sampling_params import SamplingParams
from inferflux.server.adapters import LoraRef
from inferflux.server.errors import bad_request
from inferflux.server.generation import GenerationSpec, Limits, Prompt
from inferflux.server.keep_alive import parse_keep_alive


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier answer's reasoning, sent back (vLLM: `reasoning`)
    reasoning: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: `developer` is a system message, parts joined.

        Earlier reasoning goes to the template as `reasoning_content`, the name Qwen3's and DeepSeek's read.
        """
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        else:
            message["content"] = self.content or ""
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(self, key)
            if value is not None:
                message[key] = value
        thought = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if thought is not None:
            message["reasoning_content"] = thought
        return message


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    model: str
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids (integers), got {key!r}")
        return value
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repeat_penalty: float | None = None  # LM Studio's (and llama.cpp's) name for repetition_penalty
    ttl: int | None = None  # LM Studio: idle seconds before the model unloads (its keep-alive; negative = never)
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # LoRA adapters to stack, with scales (server/openai/lora.py); an unknown name is a 400.
    lora: list[LoraRef] | None = None
    # Speculative decoding (docs/speculative.md): false opts this request out; absent follows the server.
    speculative: bool | None = None
    # Structured output (server/structured.py): OpenAI / LM Studio, vLLM, llama.cpp; at most one per request.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

    @property
    def num_prompt_logprobs(self) -> int | None:
        """How many alternatives to return per prompt token, or None (vLLM's `prompt_logprobs`)."""
        return None

    def sampling_params(self, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        """The knobs; max_tokens is resolved per prompt by the generation layer (`Limits`)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=None, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=next((p for p in (self.repetition_penalty, self.repeat_penalty) if p is not None), 1.0),
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()} or None,
            seed=self.seed, stop=stop or None, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            logprobs=logprobs, n=self.n, skip_special_tokens=self.skip_special_tokens, prompt_logprobs=prompt_logprobs,
            lora=[(ref.name, ref.scale) for ref in self.lora] if self.lora else None,
            speculative=self.speculative,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def scores_prompt(self) -> bool:
        return False

    @property
    def num_logprobs(self) -> int | None:
        return None

    def _spec(self, prompts: list[Prompt], requested: int | None, tool_names: set[str] | None = None
              ) -> GenerationSpec:
        if requested is not None and requested < 1 and requested != -1 and not (requested == 0 and self.scores_prompt):
            raise bad_request("max_tokens must be at least 1 (or -1 for no limit; 0 only with echo)",
                              param="max_tokens")
        from inferflux.server.structured import openai_constraint

        params = self.sampling_params(self.num_logprobs, self.num_prompt_logprobs)
        params.constraint = openai_constraint(self.model_dump(include=_CONSTRAINT_FIELDS))
        return GenerationSpec(
            model=self.model, prompts=prompts, params=params,
            limits=Limits(max_tokens=None if requested == -1 else requested),  # -1: LM Studio's "no limit"
            keep_alive=parse_keep_alive(self.ttl), tool_names=tool_names)


_CONSTRAINT_FIELDS = {"response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar", "grammar", "json_schema"}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call (grammar and parser); None means true
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # Reasoning switches (server/reasoning.py): OpenAI's effort ("none" turns thinking off), and LM Studio's /
    # OpenRouter's `reasoning` ("off" | "on" | a level, or {"effort": ..., "enabled": ...}).
    reasoning_effort: str | None = None
    reasoning: str | bool | dict[str, Any] | None = None

    @property
    def think(self) -> str | bool | None:
        """The thinking switch: `reasoning`, else `reasoning_effort`; None leaves the template's default."""
        value = self.reasoning
        if isinstance(value, dict):
            value = False if value.get("enabled") is False else value.get("effort", value.get("enabled"))
        return self.reasoning_effort if value is None else value

    @property
    def parses_tools(self) -> bool:
        """Tool calls in the output become `tool_calls` when tools were given and not switched off."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def spec(self) -> GenerationSpec:
        from inferflux.server.reasoning import thinking_kwargs
        from inferflux.server.tool_calls import tool_names

        prompt = Prompt(messages=[m.for_template() for m in self.messages], tools=self.tools,
                        template_kwargs=thinking_kwargs(self.think, self.chat_template_kwargs),
                        add_generation_prompt=self.add_generation_prompt)
        from inferflux.server.structured import forced_tools

        spec = self._spec([prompt], self.requested_max_tokens,
                          tool_names(self.tools) if self.parses_tools else None)
        spec.forced_tools = forced_tools(self.tools, self.tool_choice)
        spec.parallel_tool_calls = self.parallel_tool_calls is not False
        if spec.forced_tools and spec.params.constraint is not None:
            raise bad_request("`tool_choice` forcing a call cannot be combined with a structured-output format",
                              param="tool_choice")
        return spec


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM: top-N logprobs of each prompt token, as `choices[].prompt_logprobs`

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """`echo` shows the prompt: with `logprobs`, scored, as lm-evaluation-harness loglikelihood reads it."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None

    @property
    def scores_prompt(self) -> bool:
        return self.echo or self.prompt_logprobs is not None

    def prompts(self) -> list[Prompt]:
        """One `Prompt` per prompt: text (BOS added as the model wants) or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [Prompt(text=prompt)]
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [Prompt(token_ids=[int(p) for p in prompt])]  # type: ignore[arg-type]
        return [Prompt(text=p) if isinstance(p, str) else Prompt(token_ids=list(p))  # type: ignore[arg-type]
                for p in prompt]

    def spec(self) -> GenerationSpec:
        if self.suffix:
            raise bad_request("`suffix` (fill-in-the-middle) is not supported", param="suffix")
        return self._spec(self.prompts(), self.requested_max_tokens)


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate: bool = False  # cut inputs to the model's maximum length instead of refusing them
    truncate_prompt_tokens: int | None = None  # vLLM: keep at most this many tokens (the first ones)
    ttl: int | None = None  # LM Studio: idle seconds before the model unloads

