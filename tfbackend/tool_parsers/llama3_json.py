"""Llama 3.x JSON style: the whole output is ``{"name": ..., "parameters": {...}}`` (several joined by ``;``),
optionally after ``<|python_tag|>``."""

from __future__ import annotations

import json

from tfbackend.tool_parsers.base import (
    ToolParser,
    ToolParseResult,
    call_from_json,
    complete_json_values,
)

_PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def parse(self, text: str, final: bool) -> ToolParseResult:
        body = text.lstrip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG):].lstrip()
        elif not final and _PYTHON_TAG.startswith(body):
            return ToolParseResult("")  # could still become the tag
        if not body.startswith("{"):
            return ToolParseResult(text)
        values, end = complete_json_values(body, 0, separators=";")
        calls = [call_from_json(value) for value in values]
        if final and (not values or None in calls or body[end:].strip()):  # not (only) calls: it was text
            return ToolParseResult(text)
        return ToolParseResult("", [call for call in calls if call is not None])

    def render_call(self, name: str, arguments: dict) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
