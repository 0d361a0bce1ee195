"""What every tool-call parser provides, and the JSON helpers they share."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class ToolCall:
    """One function call: its name and its arguments as JSON text (as OpenAI returns them).

    While an output streams, a call may be shown before it is ``complete``: its ``arguments`` then only grow.
    """

    name: str
    arguments: str
    complete: bool = True


@dataclass
class ToolParseResult:
    """``content``: the text meant for the user (without the calls); ``calls`` in output order."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)


class ToolParser(ABC):
    """A model family's way of writing tool calls in its output.

    ``parse(text, final)`` is called on the whole output so far: while streaming (``final`` false) it must
    return as ``content`` only text that cannot turn out to be part of a call (holding back a half-written
    marker), and only calls it has fully read; at the end (``final``) every call it can read. Content is
    always a prefix of the final content, so streamed deltas add up to the non-streamed answer.
    """

    name: ClassVar[str]
    # The call marker is a special token that detokenization would drop unless told to keep special tokens.
    needs_special_tokens: ClassVar[bool] = False

    @abstractmethod
    def parse(self, text: str, final: bool) -> ToolParseResult: ...

    @abstractmethod
    def render_call(self, name: str, arguments: dict) -> str:
        """One call as this format writes it, for templates that cannot render tool calls."""

    def new_call_id(self) -> str:
        """An id for a call, in the shape this model family's templates accept."""
        return openai_call_id()


def openai_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def held_back_marker_prefix(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker`` (to hold back while streaming)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def call_from_json(value: object, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A ToolCall from a decoded ``{"name": ..., "arguments": {...}}`` object, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[key] for key in arguments_keys if key in value), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def complete_json_values(text: str, start: int, separators: str) -> tuple[list[object], int]:
    """Decode consecutive JSON values in ``text`` from ``start``, skipping whitespace and ``separators``
    between them; stop at the first value that is incomplete or invalid. Returns the values and where
    decoding stopped."""
    decoder = json.JSONDecoder()
    values, position = [], start
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            position += 1
        if position >= len(text):
            return values, position
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return values, position
        values.append(value)
        position = end
