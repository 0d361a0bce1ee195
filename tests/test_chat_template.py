"""Rendering conversations with tools, through templates that know tools and templates that do not."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tfbackend.server.chat_template import ChatRenderer, load_chat_template
from tfbackend.server.protocol import ChatMessage, Tool
from tfbackend.tool_parsers import get_tool_parser

TOOL = Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
CONVERSATION = [ChatMessage.model_validate(m) for m in [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]]
# A minimal tool-aware template: it reads `tools` and each message's `tool_calls` itself.
TOOL_TEMPLATE = (  # newlines as expressions: HF's Jinja environment trims those after block tags
    "{% for tool in tools or [] %}TOOL {{ tool.function.name }};{% endfor %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for call in m.tool_calls or [] %} CALL {{ call.function.name }} {{ call.function.arguments.city }}"
    "{% endfor %}{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}{{ '|' }}{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_a_template_without_tool_support_gets_plain_turns(tokenizer) -> None:
    renderer = ChatRenderer(tokenizer, None, get_tool_parser("hermes"))
    assert not renderer.renders_tools  # the default model's template
    text = renderer.render(CONVERSATION, [TOOL])
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call these functions")
    assert json.dumps(TOOL.function.model_dump(exclude_none=True)) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_tool_aware_template_gets_tools_and_calls_as_data(tokenizer) -> None:
    renderer = ChatRenderer(tokenizer, TOOL_TEMPLATE, get_tool_parser("hermes"))
    assert renderer.renders_tools
    assert renderer.render(CONVERSATION, [TOOL], add_generation_prompt=False) == (
        'TOOL get_weather;system: Be brief.|user: Weather in Paris?|assistant:  CALL get_weather Paris|'
        'tool: {"temp": 21} (for call_1)|'
    )


def test_rendering_errors_are_value_errors(tokenizer) -> None:
    renderer = ChatRenderer(tokenizer, None, get_tool_parser("hermes"))
    user = [ChatMessage(role="user", content="hi")]
    with pytest.raises(ValueError, match="cannot both be true"):
        renderer.render(user, None, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="needs the last message to be from the assistant"):
        renderer.render(user, None, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ValueError, match="may not set messages"):
        renderer.render(user, None, template_kwargs={"messages": []})
    with pytest.raises(ValueError, match="no chat template"):
        ChatRenderer(None, None, get_tool_parser("hermes")).render(user, None)
    broken = ChatRenderer(tokenizer, "{{ raise_exception('no system messages') }}", get_tool_parser("hermes"))
    with pytest.raises(ValueError, match="the chat template rejected these messages: no system messages"):
        broken.render(user, None)


def test_chat_template_flag_takes_a_file_or_the_template(tmp_path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text(TOOL_TEMPLATE)
    assert load_chat_template(str(path)) == TOOL_TEMPLATE
    assert load_chat_template(TOOL_TEMPLATE) == TOOL_TEMPLATE
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
