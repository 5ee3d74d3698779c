"""Tool calls in model output: found, parsed, and shaped for OpenAI and Ollama clients (one parser for all).

`formats.py` picks the syntax from the model's chat template (Hermes/Qwen `<tool_call>`, Qwen3-coder's
XML style, Llama 3.x JSON, Mistral `[TOOL_CALLS]`); `stream.py` finds the calls as text streams in,
holding back only what may still become a call; `calls.py` has the call itself and the body parsers.
"""

from inferflux.server.tool_calls.calls import ToolCall, param_types, tool_names
from inferflux.server.tool_calls.formats import FORMATS, GENERIC, ToolFormat, detect_format
from inferflux.server.tool_calls.stream import ToolCallStream, parse_tool_calls

__all__ = ["FORMATS", "GENERIC", "ToolCall", "ToolCallStream", "ToolFormat", "detect_format", "param_types",
           "parse_tool_calls", "tool_names"]
