"""Tool calling for chat requests: what ``tool_choice`` does to generation, and reading calls from the output.

* ``none`` (or no tools): the output is content.
* ``auto``: the model decides; the server's ``--tool-call-parser`` reads calls out of the text.
* ``required``: a grammar forces a JSON list of one or more calls ``[{"name": ..., "parameters": {...}}]``
  (at most one when ``parallel_tool_calls`` is false), so any model calls a tool.
* a named function: a grammar forces that function's arguments; the whole output is them.

Streamed, calls go out as OpenAI's tool-call deltas: a call's first delta has its id, name and the arguments
known so far; later ones add to the arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfbackend.sampling_params import StructuredOutputsParams
from tfbackend.server.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from tfbackend.tool_parsers import ToolCall, ToolParser, ToolParseResult
from tfbackend.tool_parsers.base import call_from_json, complete_json_values, openai_call_id


class _RequiredCalls:
    """Reads the ``required`` grammar's output: a JSON list of ``{"name", "parameters"}`` objects."""

    def parse(self, text: str, final: bool) -> ToolParseResult:
        start = text.find("[")
        values, _ = complete_json_values(text, start + 1, separators=",") if start != -1 else ([], 0)
        calls = [call for call in map(call_from_json, values) if call is not None]
        return ToolParseResult("", calls)


@dataclass
class _NamedCall:
    """Reads a named function's output: all of it is the call's arguments."""

    name: str

    def parse(self, text: str, final: bool) -> ToolParseResult:
        return ToolParseResult("", [ToolCall(self.name, text, complete=final)])


class ToolReader:
    """Reads the calls of one request's output in the way its ``tool_choice`` makes the model write them."""

    def __init__(self, reader: ToolParser | _RequiredCalls | _NamedCall, call_ids: ToolParser | None) -> None:
        self.reader = reader
        self.call_ids = call_ids  # the parser whose id format to follow, if any

    def parse(self, text: str, final: bool) -> ToolParseResult:
        return self.reader.parse(text, final)

    def new_call_id(self) -> str:
        return self.call_ids.new_call_id() if self.call_ids is not None else openai_call_id()

    def finish_reason(self, finish_reason: str | None) -> str | None:
        """OpenAI ends with ``tool_calls`` when the model chose to call; a forced named call ends with ``stop``."""
        if finish_reason == "stop" and not isinstance(self.reader, _NamedCall):
            return "tool_calls"
        return finish_reason


@dataclass
class ToolPlan:
    """What a chat request's tools change: a grammar to force calls, and how to read them back."""

    grammar: StructuredOutputsParams | None
    reader: ToolReader | None
    keep_special_tokens: bool = False


def plan_tools(body: ChatCompletionRequest, parser: ToolParser | None, auto_enabled: bool) -> ToolPlan:
    """Raise ValueError (a 400) for tool settings this request or server cannot honour."""
    tools = body.tools or []
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise ValueError("tool_choice needs tools")
        return ToolPlan(None, None)
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise ValueError("tool function names must be unique")
    choice = "auto" if choice is None else choice
    if choice == "none":
        return ToolPlan(None, None)
    if choice == "auto":
        if not auto_enabled or parser is None:
            raise ValueError('"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                             '--tool-call-parser; or use tool_choice "required", a named function or "none"')
        return ToolPlan(None, ToolReader(parser, parser), keep_special_tokens=parser.needs_special_tokens)
    if choice == "required":
        grammar = StructuredOutputsParams(json=_required_schema(tools, body.parallel_tool_calls))
        return ToolPlan(grammar, ToolReader(_RequiredCalls(), parser))
    assert isinstance(choice, NamedToolChoice)
    tool = next((tool for tool in tools if tool.function.name == choice.function.name), None)
    if tool is None:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
    grammar = StructuredOutputsParams(json=_parameters_schema(tool))
    return ToolPlan(grammar, ToolReader(_NamedCall(tool.function.name), parser))


def _parameters_schema(tool: Tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _required_schema(tools: list[Tool], parallel: bool) -> dict:
    """One or more ``{"name": <a tool>, "parameters": <its schema>}`` objects in a list."""
    calls = [
        {"type": "object",
         "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                        "parameters": _parameters_schema(tool)},
         "required": ["name", "parameters"]}
        for tool in tools
    ]
    schema: dict = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ToolCallStream:
    """Turns a streamed choice's growing output into OpenAI deltas: content, then tool calls."""

    def __init__(self, reader: ToolReader) -> None:
        self.reader = reader
        self.content_sent = 0
        self.arguments_sent: list[int] = []  # per call already opened: characters of its arguments sent

    @property
    def num_calls(self) -> int:
        return len(self.arguments_sent)

    def delta(self, text: str, final: bool) -> dict:
        parsed = self.reader.parse(text, final)
        delta: dict = {}
        if len(parsed.content) > self.content_sent:
            delta["content"] = parsed.content[self.content_sent:]
            self.content_sent = len(parsed.content)
        calls = []
        for index, call in enumerate(parsed.calls):
            if index == len(self.arguments_sent):
                calls.append({"index": index, "id": self.reader.new_call_id(), "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}})
                self.arguments_sent.append(len(call.arguments))
            elif len(call.arguments) > self.arguments_sent[index]:
                calls.append({"index": index, "function": {"arguments": call.arguments[self.arguments_sent[index]:]}})
                self.arguments_sent[index] = len(call.arguments)
        if calls:
            delta["tool_calls"] = calls
        return delta

