"""Mistral style: the ``[TOOL_CALLS]`` token, then a JSON list ``[{"name": ..., "arguments": {...}}, ...]``
(tokenizer v3) or ``name[ARGS]{...}`` per call (tokenizer v11 and later)."""

from __future__ import annotations

import json
import random
import string

from tfbackend.tool_parsers.base import (
    ToolCall,
    ToolParser,
    ToolParseResult,
    call_from_json,
    complete_json_values,
    held_back_marker_prefix,
)

_MARKER, _ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True

    def parse(self, text: str, final: bool) -> ToolParseResult:
        start = text.find(_MARKER)
        if start == -1:
            keep = len(text) if final else len(text) - held_back_marker_prefix(text, _MARKER)
            return ToolParseResult(text[:keep])
        rest = text[start + len(_MARKER):]
        calls = self._list_calls(rest) if rest.lstrip().startswith("[") else self._args_calls(rest)
        if final and not calls:
            return ToolParseResult(text)
        return ToolParseResult(text[:start], calls)

    def _list_calls(self, rest: str) -> list[ToolCall]:
        """``[{...}, {...}]``: the objects read so far."""
        values, _ = complete_json_values(rest, rest.index("[") + 1, separators=",")
        return [call for call in map(call_from_json, values) if call is not None]

    def _args_calls(self, rest: str) -> list[ToolCall]:
        """``name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}``: the calls whose arguments are complete."""
        calls = []
        for part in rest.split(_MARKER):
            name, sep, arguments = part.partition(_ARGS)
            values, _ = complete_json_values(arguments, 0, separators="")
            if sep and name.strip() and values:
                call = call_from_json({"name": name.strip(), "arguments": values[0]})
                if call is not None:
                    calls.append(call)
        return calls

    def render_call(self, name: str, arguments: dict) -> str:
        return _MARKER + json.dumps([{"name": name, "arguments": arguments}], ensure_ascii=False)

    def new_call_id(self) -> str:
        """Mistral's templates require ids of exactly 9 letters and digits."""
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))
