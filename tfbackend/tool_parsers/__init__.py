"""Tool-call parsers: finding the function calls a model wrote in its output text, in its own format.

``--tool-call-parser NAME`` picks one for ``tool_choice: "auto"``; each knows its format both ways (parsing
calls out of text, and writing a call as text for chat templates that cannot render tool calls themselves).
"""

from tfbackend.tool_parsers.base import ToolCall, ToolParser, ToolParseResult
from tfbackend.tool_parsers.hermes import HermesToolParser
from tfbackend.tool_parsers.llama3_json import Llama3JsonToolParser
from tfbackend.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose from {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()


__all__ = ["TOOL_PARSERS", "ToolCall", "ToolParseResult", "ToolParser", "get_tool_parser"]
