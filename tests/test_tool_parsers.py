"""Tool-call parsers: reading calls from whole outputs, from outputs as they stream, and writing calls as text."""

from __future__ import annotations

import json

import pytest

from tfbackend.server.tools import ToolCallStream, ToolReader
from tfbackend.tool_parsers import TOOL_PARSERS, get_tool_parser

ARGS = {"city": "Paris", "days": 3}


def calls(parser_name: str, text: str, final: bool = True) -> tuple[str, list[tuple[str, dict]]]:
    result = get_tool_parser(parser_name).parse(text, final)
    return result.content, [(call.name, json.loads(call.arguments)) for call in result.calls]


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_a_rendered_call_parses_back(name: str) -> None:
    parser = get_tool_parser(name)
    text = parser.render_call("get_weather", ARGS)
    assert calls(name, text) == ("", [("get_weather", ARGS)])


def test_hermes_content_then_several_calls() -> None:
    text = ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    assert calls("hermes", text) == ("Let me look.\n", [("a", {"x": 1}), ("b", {"y": 2})])
    # The model may end (EOS) before closing its last block.
    assert calls("hermes", '<tool_call>{"name": "a", "arguments": {}}') == ("", [("a", {})])
    # Not a call after all: everything is content.
    assert calls("hermes", "<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert calls("hermes", "plain answer") == ("plain answer", [])


def test_llama3_json_calls_and_plain_text() -> None:
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert calls("llama3_json", text) == ("", [("a", {"x": 1}), ("b", {})])
    assert calls("llama3_json", "The answer is {not a call}") == ("The answer is {not a call}", [])
    assert calls("llama3_json", '{"name": "a", "parameters": {}} and then text') == (
        '{"name": "a", "parameters": {}} and then text', [])


def test_mistral_both_call_formats() -> None:
    listed = 'Sure.[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    assert calls("mistral", listed) == ("Sure.", [("a", {"x": 1}), ("b", {})])
    newer = '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}'
    assert calls("mistral", newer) == ("", [("a", {"x": 1}), ("b", {})])
    assert get_tool_parser("mistral").needs_special_tokens  # [TOOL_CALLS] is a special token
    call_id = get_tool_parser("mistral").new_call_id()
    assert len(call_id) == 9 and call_id.isalnum()  # what Mistral's templates demand


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_streamed_deltas_add_up_to_the_whole_answer(name: str) -> None:
    parser = get_tool_parser(name)
    content = "" if name == "llama3_json" else "Checking the weather. "
    text = content + parser.render_call("get_weather", ARGS) + (
        "" if name == "llama3_json" else parser.render_call("get_time", {}))
    stream = ToolCallStream(ToolReader(parser, parser))
    sent_content, sent_calls = "", []
    for end in range(1, len(text) + 1):  # one character at a time: markers arrive in pieces
        delta = stream.delta(text[:end], final=end == len(text))
        sent_content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(sent_calls):
                sent_calls.append([call["function"]["name"], ""])
            sent_calls[call["index"]][1] += call["function"]["arguments"]
        assert "<tool_call" not in sent_content and "[TOOL" not in sent_content  # never a piece of a marker
    final = parser.parse(text, final=True)
    assert sent_content == final.content == content
    assert [(n, json.loads(a)) for n, a in sent_calls] == [(c.name, json.loads(c.arguments)) for c in final.calls]


def test_a_call_goes_out_once_complete_not_before() -> None:
    stream = ToolCallStream(ToolReader(get_tool_parser("hermes"), None))
    assert stream.delta('<tool_call>{"name": "a", "argu', final=False) == {}
    delta = stream.delta('<tool_call>{"name": "a", "arguments": {}}</tool_call>', final=False)
    assert delta["tool_calls"][0]["function"] == {"name": "a", "arguments": "{}"}
    assert delta["tool_calls"][0]["id"].startswith("call_")
