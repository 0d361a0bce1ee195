"""Structured outputs through the server on the default model: every sampled output follows its grammar.

Sampling at temperature 0.7 (not greedy), so the outputs are whatever the model likes within the grammar; the
tests check them with independent validators (``jsonschema``, ``re``), not against expected strings.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.json_schemas import SCHEMAS
from tests.server_process import SERVER_API_KEY, SERVER_MODEL, Server

ASK = [{"role": "user", "content": "Give an example as JSON."}]


@pytest.fixture(scope="module")
def client(smollm2_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_server.url}/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=300)


def test_json_schemas_are_followed_at_temperature(client: openai.OpenAI) -> None:
    assert len(SCHEMAS) >= 20

    def ask(item: tuple[int, str]) -> tuple[str, openai.types.chat.ChatCompletion]:
        seed, name = item
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name],
                                                                  "strict": True}}
        return name, client.chat.completions.create(model=SERVER_MODEL, messages=ASK, temperature=0.7, seed=seed,
                                                    max_tokens=200, response_format=response_format)

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # all at once: one batch, shared steps
        answers = dict(pool.map(ask, enumerate(SCHEMAS)))
    for name, response in answers.items():
        choice = response.choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object_mode_gives_an_object(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Describe a cat as a JSON object with two fields."}]
    response = client.chat.completions.create(
        model=SERVER_MODEL, messages=messages, temperature=0, max_tokens=120, response_format={"type": "json_object"},
        extra_body={"structured_outputs": {"disable_any_whitespace": True}},  # compact: this model loops on indents
    )
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_guided_choice_only_returns_a_choice(client: openai.OpenAI) -> None:
    choices = ["Paris", "London", "a very long answer, with punctuation!"]
    for seed in range(6):
        response = client.completions.create(model=SERVER_MODEL, prompt="The capital of France is", n=2, seed=seed,
                                             temperature=0.7, max_tokens=30, extra_body={"guided_choice": choices})
        assert all(choice.text in choices and choice.finish_reason == "stop" for choice in response.choices)


def test_regex_is_matched_streamed_and_not(client: openai.OpenAI) -> None:
    pattern = r"[A-Z][a-z]{2,8} [0-9]{3}-[0-9]{4}"
    body = {"structured_outputs": {"regex": pattern}}
    response = client.chat.completions.create(model=SERVER_MODEL, messages=ASK, temperature=0.7, seed=1, n=3,
                                              max_tokens=40, extra_body=body)
    for choice in response.choices:
        assert re.fullmatch(pattern, choice.message.content), choice.message.content
    stream = client.chat.completions.create(model=SERVER_MODEL, messages=ASK, temperature=0.7, seed=2, max_tokens=40,
                                            stream=True, extra_body=body)
    assert re.fullmatch(pattern, "".join(chunk.choices[0].delta.content or "" for chunk in stream))


def test_grammar_errors_are_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="invalid structured output json"):
        client.completions.create(model=SERVER_MODEL, prompt="hi", extra_body={"guided_json": {"type": "wat"}})
    with pytest.raises(openai.BadRequestError, match="invalid structured output regex"):
        client.completions.create(model=SERVER_MODEL, prompt="hi", extra_body={"guided_regex": "(unclosed"})
    with pytest.raises(openai.BadRequestError, match="one structured output constraint"):
        client.completions.create(model=SERVER_MODEL, prompt="hi", extra_body={
            "response_format": {"type": "json_object"}, "guided_regex": "a+"})
    with pytest.raises(openai.BadRequestError, match="min_tokens cannot be combined"):
        client.completions.create(model=SERVER_MODEL, prompt="hi", extra_body={"guided_regex": "a+", "min_tokens": 2})
    with pytest.raises(openai.BadRequestError, match="not supported by this server: guided_whitespace_pattern"):
        client.completions.create(model=SERVER_MODEL, prompt="hi",
                                  extra_body={"guided_json": {"type": "object"}, "guided_whitespace_pattern": " "})
