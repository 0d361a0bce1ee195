"""Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call."""

from __future__ import annotations

import json
import re

from tfbackend.tool_parsers.base import (
    ToolParser,
    ToolParseResult,
    call_from_json,
    held_back_marker_prefix,
)

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(_OPEN) + r"(.*?)" + re.escape(_CLOSE), re.DOTALL)


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> ToolParseResult:
        start = text.find(_OPEN)
        if start == -1:
            keep = len(text) if final else len(text) - held_back_marker_prefix(text, _OPEN)
            return ToolParseResult(text[:keep])
        bodies = [match.group(1) for match in _BLOCK.finditer(text, start)]
        last_close = text.rfind(_CLOSE)
        unclosed = text.rfind(_OPEN)
        if final and unclosed > last_close:  # the model ended inside a block (EOS instead of </tool_call>)
            bodies.append(text[unclosed + len(_OPEN):])
        calls = []
        for body in bodies:
            try:
                call = call_from_json(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
        if final and not calls:  # nothing readable: it was text after all
            return ToolParseResult(text)
        return ToolParseResult(text[:start], calls)

    def render_call(self, name: str, arguments: dict) -> str:
        return f"{_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{_CLOSE}"
