"""Tool calling through the server on the default model, whose chat template knows nothing of tools.

``tool_choice: "required"`` and a named function make any model call (a grammar forces the call); the server
runs with ``--enable-auto-tool-choice --tool-call-parser hermes``, and ``auto`` is checked on an output that a
regex forces into the hermes format. Each round trip goes call -> tool result -> answer, streamed and not.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server_process import SERVER_API_KEY, SERVER_MODEL, Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"]}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(smollm2_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_server.url}/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=120)


def create(client: openai.OpenAI, stream: bool, **kwargs) -> dict:
    """A chat completion as ``{"content", "tool_calls", "finish_reason"}``; a stream is put back together from
    its deltas, as OpenAI's clients do."""
    if not stream:
        choice = client.chat.completions.create(model=SERVER_MODEL, **kwargs).choices[0]
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls or []]
        return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason}
    content, calls, finish_reason = "", [], None
    for chunk in client.chat.completions.create(model=SERVER_MODEL, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.index == len(calls):  # a call's first delta: its id and name
                assert call.id and call.function.name and call.type == "function"
                calls.append({"id": call.id, "name": call.function.name, "arguments": ""})
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    return {"content": content or None, "tool_calls": calls, "finish_reason": finish_reason}


def check_calls(calls: list[dict]) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert len({call["id"] for call in calls}) == len(calls)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_required_tool_call_round_trip(smollm2_server: Server, client: openai.OpenAI, stream: bool) -> None:
    first = create(client, stream, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0.7, seed=5,
                   max_tokens=120)
    assert first["finish_reason"] == "tool_calls" and first["content"] is None
    check_calls(first["tool_calls"])

    results = [{"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature_c": 21 + i})}
               for i, call in enumerate(first["tool_calls"])]
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        for call in first["tool_calls"]]}
    conversation = [*QUESTION, assistant, *results]
    answer = create(client, stream, messages=conversation, tools=TOOLS, tool_choice="none", temperature=0,
                    max_tokens=24)
    assert answer["tool_calls"] == [] and answer["content"] and answer["finish_reason"] in ("stop", "length")

    # The template has no tool support, so the server wrote tools, the call and its result into plain turns.
    rendered = httpx.post(f"{smollm2_server.url}/tokenize", json={"messages": conversation, "tools": TOOLS},
                          headers={"Authorization": f"Bearer {SERVER_API_KEY}"}).json()["tokens"]
    prompt = httpx.post(f"{smollm2_server.url}/detokenize", json={"tokens": rendered},
                        headers={"Authorization": f"Bearer {SERVER_API_KEY}"}).json()["prompt"]
    assert '"name": "get_weather"' in prompt and "<tool_response>" in prompt and '"temperature_c": 21' in prompt
    assert f'<tool_call>\n{{"name": "{first["tool_calls"][0]["name"]}"' in prompt


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_named_tool_choice_calls_that_function(client: openai.OpenAI, stream: bool) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    result = create(client, stream, messages=QUESTION, tools=TOOLS, tool_choice=choice, temperature=0.7, seed=2,
                    max_tokens=60)
    assert [call["name"] for call in result["tool_calls"]] == ["get_time"]
    check_calls(result["tool_calls"])
    assert result["finish_reason"] == "stop"  # as OpenAI: a forced function ends with "stop"


def test_no_parallel_calls_when_asked(client: openai.OpenAI) -> None:
    result = create(client, False, messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                    temperature=0.9, seed=1, max_tokens=120)
    assert len(result["tool_calls"]) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_auto_tool_choice_reads_hermes_calls(client: openai.OpenAI, stream: bool) -> None:
    # The model is made to write a hermes-style call after some text, as a tool-trained model would.
    forced = (r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Lyon)"\}\}'
              r'\n</tool_call>')
    result = create(client, stream, messages=QUESTION, tools=TOOLS, tool_choice="auto", temperature=0.7,
                    max_tokens=60, extra_body={"guided_regex": forced})
    assert result["content"] == "Let me check.\n"
    assert [call["name"] for call in result["tool_calls"]] == ["get_weather"]
    assert json.loads(result["tool_calls"][0]["arguments"])["city"] in ("Paris", "Lyon")
    assert result["finish_reason"] == "tool_calls"


def test_tool_errors_are_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=SERVER_MODEL, messages=QUESTION, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="cannot be combined with tool_choice"):
        client.chat.completions.create(model=SERVER_MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="unique"):
        client.chat.completions.create(model=SERVER_MODEL, messages=QUESTION, tools=[WEATHER, WEATHER])
    with pytest.raises(openai.BadRequestError, match="arguments must be a JSON object"):
        client.chat.completions.create(model=SERVER_MODEL, tools=TOOLS, messages=[*QUESTION, {
            "role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": "not json"}}]}])
