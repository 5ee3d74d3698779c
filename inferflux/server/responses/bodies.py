"""Responses API request bodies (pydantic) and their translation into chat messages and a `GenerationSpec`.

The Responses API is chat with other nouns: `input` is a string (one user message) or a list of
items, and those items map onto the chat messages a chat template renders:

- `message` items (roles user/assistant/system/developer, content a string or `input_text` /
  `output_text` parts) -> that message (`developer` -> `system`, parts joined);
- `function_call` items -> an assistant message's `tool_calls` (consecutive calls, and a call right
  after an assistant message, join that message, as the chat API writes a turn);
- `function_call_output` items -> a `tool` message with its `tool_call_id`;
- `reasoning` items are accepted and not rendered (chat templates drop earlier turns' thinking).

`instructions` is a system message before all of that; it is not carried to the next turn of a
`previous_response_id` chain (OpenAI's rule). Unknown fields are ignored, as in the chat bodies;
unsupported item and content types (images, files, built-in tools) are a 400 naming the field.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from inferflux.engine.grammar import Constraint
from inferflux.engine.sampling_params import SamplingParams
from inferflux.server.errors import bad_request
from inferflux.server.generation import GenerationSpec, Limits, Prompt


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextContent(_Body):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text", "refusal"] = "input_text"
    text: str = ""
    refusal: str | None = None


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextContent]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or part.refusal or "" for part in self.content)


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = "{}"
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextContent]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class ReasoningItem(_Body):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[TextContent] = Field(default_factory=list)
    content: list[TextContent] | None = None
    encrypted_content: str | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(_Body):
    """A function tool in the Responses shape: flat, not nested under `function` as in chat."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def for_template(self) -> dict[str, Any]:
        """The chat API's tool shape, which chat templates are written for."""
        # In the chat API's key order (templates that `tojson` a tool render it as a chat client's would).
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


class ToolChoiceFunction(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class _Input(_Body):
    """What `/v1/responses` and `/v1/responses/input_tokens` share: the conversation and its tools."""

    model: str
    input: str | list[InputItem] = ""
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None

    def items(self) -> list[dict[str, Any]]:
        """This request's input as items with ids (what `/input_items` lists and the store keeps)."""
        if isinstance(self.input, str):
            items: list[dict[str, Any]] = [{"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": self.input}]}]
        else:
            items = [item.model_dump(exclude_none=True, by_alias=True) for item in self.input]
        for item in items:
            if not item.get("id"):
                item["id"] = _item_id(item["type"])
            if item["type"] == "message":
                if isinstance(item["content"], str):
                    part = "output_text" if item["role"] == "assistant" else "input_text"
                    item["content"] = [{"type": part, "text": item["content"]}]
                item.setdefault("status", "completed")
        return items

    def messages(self, prior: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat messages to render: instructions, the chained turns' items (`prior`), this input."""
        if not self.input:
            raise bad_request("`input` is empty: give a string or at least one item", param="input")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return messages + items_to_messages(prior + self.items())

    @property
    def parses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.for_template() for tool in self.tools] if self.tools else None

    def template_kwargs(self) -> dict[str, Any]:
        """The thinking switch (`enable_thinking`, `reasoning_effort`) from `reasoning.effort`, as chat sets it;
        a template without the switch ignores it."""
        from inferflux.server.reasoning import thinking_kwargs

        return thinking_kwargs(self.reasoning.effort if self.reasoning else None)


class ResponsesRequest(_Input):
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    metadata: dict[str, str] | None = None
    store: bool = True
    stream: bool = False
    user: str | None = None
    seed: int | None = None  # not in OpenAI's API; vLLM and llama.cpp accept it for reproducible samples
    # Speculative decoding (docs/speculative.md): false opts this request out; absent follows the server.
    speculative: StrictBool | None = None  # an InferFlux extension

    def spec(self, prior: list[dict[str, Any]]) -> GenerationSpec:
        from inferflux.server.structured import forced_tools
        from inferflux.server.tool_calls import tool_names

        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise bad_request("max_output_tokens must be at least 1", param="max_output_tokens")
        if self.metadata is not None and len(self.metadata) > 16:
            raise bad_request("metadata holds at most 16 pairs", param="metadata")
        prompt = Prompt(messages=self.messages(prior), tools=self.template_tools(),
                        template_kwargs=self.template_kwargs())
        params = SamplingParams(max_tokens=None, temperature=1.0 if self.temperature is None else self.temperature,
                                top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, n=1,
                                constraint=self.constraint(), speculative=self.speculative)
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, ToolChoiceFunction) else self.tool_choice
        forced = forced_tools(self.template_tools(), choice)  # required / a named function: a grammar-forced call
        if forced and params.constraint is not None:
            raise bad_request("`tool_choice` forcing a call cannot be combined with a `text.format` JSON format",
                              param="tool_choice")
        return GenerationSpec(model=self.model, prompts=[prompt], params=params,
                              limits=Limits(max_tokens=self.max_output_tokens),
                              tool_names=tool_names(self.template_tools()) if self.parses_tools else None,
                              forced_tools=forced, parallel_tool_calls=self.parallel_tool_calls)

    def constraint(self) -> Constraint | None:
        """`text.format` as the engine's grammar constraint: json_object is any JSON object, json_schema its
        `schema` (a name without one: any object, as OpenAI reads it). A schema that does not compile is a
        400 at submission (`GrammarError`)."""
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_schema" and not fmt.name:
            raise bad_request("text.format json_schema needs a `name`", param="text.format.name")
        return Constraint.json_schema(fmt.schema_ if fmt.type == "json_schema" else None)


class InputTokensRequest(_Input):
    """`POST /v1/responses/input_tokens`: the same conversation, counted instead of answered."""

    model: str = ""  # optional in OpenAI's API: the default model then


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input (and stored output) items as chat messages; see the module docstring."""
    messages: list[dict[str, Any]] = []
    for raw in items:
        kind = raw.get("type", "message")
        if kind == "message":
            item = MessageItem.model_validate(raw)
            messages.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
        elif kind == "function_call":
            call = FunctionCallItem.model_validate(raw)
            entry = {"id": call.call_id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(entry)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [entry]})
        elif kind == "function_call_output":
            out = FunctionCallOutputItem.model_validate(raw)
            messages.append({"role": "tool", "content": out.text(), "tool_call_id": out.call_id})
        elif kind != "reasoning":
            raise bad_request(f"input items of type {kind!r} are not supported", param="input")
    return messages


def function_call_arguments(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def _item_id(kind: str) -> str:
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}[kind]
    return f"{prefix}_{uuid.uuid4().hex}"
