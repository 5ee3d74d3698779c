"""Anthropic Messages request bodies, validated by pydantic, and their translation to the generation layer.

Field names, required fields and ranges follow Anthropic's API (`max_tokens` is required,
`temperature` and `top_p` are 0..1), so a body Anthropic refuses is refused here with a 400 naming
the field; unknown fields are ignored, so newer clients keep working. Content blocks become the
messages chat templates expect (the shape transformers' templates are written for):

- `system` (a string or text blocks) -> a first `system` message;
- text blocks -> the message's `content`, joined;
- an assistant's `tool_use` blocks -> its `tool_calls` (`{"id", "type": "function", "function":
  {"name", "arguments": <the input object>}}`);
- a user's `tool_result` blocks -> `tool` messages (`tool_call_id`, the tool's `name` looked up from
  the call, the result's text), in block order with the user's text;
- `tools` -> OpenAI-style function tools (`parameters` is the `input_schema`), which templates render.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from inferflux.engine.grammar import Constraint
from inferflux.engine.sampling_params import SamplingParams
from inferflux.server.errors import bad_request
from inferflux.server.generation import GenerationSpec, Limits, Prompt
from inferflux.server.reasoning import thinking_kwargs


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class ImageBlock(_Body):
    """Accepted by the schema so the refusal can say why (no vision model is served), not "unknown type"."""

    type: Literal["image", "document"]


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = None
    is_error: bool = False


class ThinkingBlock(_Body):
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock,
                  Field(discriminator="type")]


class Message(_Body):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Body):
    type: Literal["custom"] | None = None  # server tools (web search, bash, ...) are not served
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Body):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1)


class Metadata(_Body):
    user_id: str | None = None


class OutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class CountTokensRequest(_Body):
    """What a prompt is made of: `POST /v1/messages/count_tokens` takes just this."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    @property
    def think(self) -> bool | str | None:
        """The reasoning switch (server/reasoning.py): None leaves the template's default, as without `thinking`
        (so a conversation renders as the OpenAI endpoint renders it); `disabled` is off; otherwise on, at
        `output_config.effort` when given (Anthropic's two levels above `high` are `high`)."""
        if self.thinking is None:
            return None
        if self.thinking.type == "disabled":
            return False
        effort = self.output_config.effort if self.output_config is not None else None
        return {"xhigh": "high", "max": "high"}.get(effort or "", effort) or True

    def prompt(self) -> Prompt:
        """The conversation as chat-template messages, with the tools and the thinking switch."""
        if self.tool_choice is not None and self.tool_choice.type == "tool":
            if not any(tool.name == self.tool_choice.name for tool in self.tools or []):
                raise bad_request(f"tool_choice names the tool {self.tool_choice.name!r}, which is not in `tools`",
                                  param="tool_choice.name")
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                   "parameters": t.input_schema}} for t in self.tools or []]
        return Prompt(messages=template_messages(self.system, self.messages), tools=tools or None,
                      template_kwargs=thinking_kwargs(self.think))


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False
    # Speculative decoding (docs/speculative.md): false opts this request out; absent follows the server.
    speculative: StrictBool | None = None  # an InferFlux extension

    @property
    def forced_tools(self) -> list[dict[str, Any]] | None:
        """`any`: the output is a call to one of the tools; `tool`: to the named one (a grammar constraint)."""
        choice = self.tool_choice
        if choice is None or choice.type not in ("any", "tool"):
            return None
        if not self.tools:
            raise bad_request(f"tool_choice `{choice.type}` needs `tools`", param="tool_choice")
        return [{"name": t.name, "parameters": t.input_schema} for t in self.tools
                if choice.type == "any" or t.name == choice.name]

    def constraint(self) -> Constraint | None:
        """`output_config.format`: the output is JSON valid against the schema (the engine's grammar)."""
        fmt = self.output_config.format if self.output_config is not None else None
        return None if fmt is None else Constraint.json_schema(fmt.schema_)

    @property
    def tool_names(self) -> set[str] | None:
        """Tool calls are parsed out of the text when tools were given and `tool_choice` is not `none`."""
        if not self.tools or (self.tool_choice is not None and self.tool_choice.type == "none"):
            return None
        return {tool.name for tool in self.tools}

    def spec(self) -> GenerationSpec:
        thinking = self.thinking
        if thinking is not None and thinking.type == "enabled" and thinking.budget_tokens is None:
            raise bad_request("thinking.budget_tokens is required when thinking is enabled",
                              param="thinking.budget_tokens")
        # Anthropic's defaults: temperature 1, no top-p / top-k cut.
        params = SamplingParams(max_tokens=None, temperature=1.0 if self.temperature is None else self.temperature,
                                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                                stop=list(self.stop_sequences or []) or None, constraint=self.constraint(),
                                speculative=self.speculative)
        forced = self.forced_tools
        if forced and params.constraint is not None:
            raise bad_request("a forced tool call (`tool_choice` any/tool) cannot be combined with "
                              "`output_config.format`", param="tool_choice")
        # `enabled` asks for thinking: on a model whose template does not reason that is a 400 (as Anthropic
        # refuses it for models without extended thinking); `adaptive` lets the model decide, so it never fails.
        # budget_tokens is not enforced: the generation layer has no reasoning budget to give it to.
        think = self.think if thinking is not None and thinking.type == "enabled" else None
        return GenerationSpec(model=self.model, prompts=[self.prompt()], params=params,
                              limits=Limits(max_tokens=self.max_tokens, overflow="cap"), tool_names=self.tool_names,
                              think=think, forced_tools=forced, parallel_tool_calls=not (
                                  self.tool_choice is not None and self.tool_choice.disable_parallel_tool_use))


def _text(blocks: str | list[TextBlock] | list[Any] | None, where: str) -> str:
    """The text of a string or of text blocks; an image is a 400 (`where` names it)."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for i, block in enumerate(blocks):
        if isinstance(block, ImageBlock):
            raise _no_vision(block, f"{where}.{i}")
        parts.append(block.text)
    return "".join(parts)


def _no_vision(block: ImageBlock, where: str) -> Exception:
    return bad_request(f"{block.type} blocks are not supported: the models this server runs read text only "
                       f"({where})", param=where)


def template_messages(system: str | list[TextBlock] | None, messages: list[Message]) -> list[dict[str, Any]]:
    """Anthropic's system + messages as the role/content/tool_calls messages chat templates render."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text(system, "system")})
    names: dict[str, str] = {}  # tool_use id -> tool name, for the tool messages that answer it
    for m, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        else:
            out += _blocks(message.role, message.content, names, f"messages.{m}.content")
    return out


def _blocks(role: str, blocks: list[Any], names: dict[str, str], where: str) -> list[dict[str, Any]]:
    """One message's blocks: text (joined), its tool calls, and the tool results it carries, in order."""
    out: list[dict[str, Any]] = []
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for b, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ImageBlock):
            raise _no_vision(block, f"{where}.{b}")
        elif isinstance(block, ToolUseBlock):
            if role != "assistant":
                raise bad_request("tool_use blocks belong in assistant messages", param=f"{where}.{b}")
            names[block.id] = block.name
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})
        elif isinstance(block, ToolResultBlock):
            if role != "user":
                raise bad_request("tool_result blocks belong in user messages", param=f"{where}.{b}")
            if text:  # the user's words before this result stay before it
                out.append({"role": role, "content": "".join(text)})
                text = []
            result = _text(block.content, f"{where}.{b}.content")
            tool: dict[str, Any] = {"role": "tool", "tool_call_id": block.tool_use_id,
                                    "content": f"Error: {result}" if block.is_error else result}
            if block.tool_use_id in names:
                tool["name"] = names[block.tool_use_id]
            out.append(tool)
        # thinking blocks of earlier turns are not part of the prompt
    if calls:
        out.append({"role": role, "content": "".join(text), "tool_calls": calls})
    elif text or role == "assistant" or not blocks:
        out.append({"role": role, "content": "".join(text)})
    return out
