"""Structured outputs in the engine: grammar masks in the batched sampler, matchers advanced per token.

A tiny random model with a real tokenizer samples freely (temperature 1), so only the grammar keeps its output
in shape; the outputs are checked with independent validators. Logit bias shares the sampler path.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tfbackend import LLM, SamplingParams
from tfbackend.sampling_params import StructuredOutputsParams
from tfbackend.structured_output import GrammarCompiler, apply_token_bitmask

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "tags"]}


def test_bitmask_forbids_exactly_the_cleared_bits() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word's high bits name no token
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    bitmask[1] = -1  # a row without a grammar: every bit set
    logits = torch.randn(3, vocab, generator=generator)
    masked = apply_token_bitmask(logits, bitmask)
    for row in range(3):
        for token in range(vocab):
            allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1
            assert masked[row, token] == (logits[row, token] if allowed else float("-inf"))
    assert torch.equal(masked[1], logits[1])


@pytest.fixture(scope="module")
def llm(tiny_text_model) -> LLM:
    return LLM(str(tiny_text_model), device="cpu", dtype="float32", max_model_len=256, kv_cache_memory=8 * 2**20)


def test_invalid_constraints_are_value_errors(llm: LLM) -> None:
    compiler = GrammarCompiler(llm.get_tokenizer(), llm.engine.vocab_size, llm.engine.eos_token_ids)
    for params, message in [
        (StructuredOutputsParams(json={"type": "wat"}), "invalid structured output json: .*wat"),
        (StructuredOutputsParams(json="[1, 2]"), "must be a JSON object"),
        (StructuredOutputsParams(regex="(unclosed"), "invalid structured output regex"),
        (StructuredOutputsParams(grammar="root ::= undefined_rule"), "invalid structured output grammar"),
    ]:
        with pytest.raises(ValueError, match=message):
            compiler.compile(params)
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="structured outputs need a tokenizer"):
        GrammarCompiler(None, 10, set()).compile(StructuredOutputsParams(regex="a"))
    with pytest.raises(ValueError, match="invalid structured output json"):  # refused before anything is queued
        llm.engine.add_request("bad", "hi", SamplingParams(structured_outputs=StructuredOutputsParams(
            json={"type": "wat"})))
    assert not llm.engine.has_unfinished_requests()


def run(llm: LLM, run_ahead: bool) -> list:
    """A mixed batch: grammars of every kind next to free sampling and logit bias, seeded."""
    llm.engine.run_ahead = run_ahead
    biased = llm.get_tokenizer()(" yes", add_special_tokens=False)["input_ids"][0]
    params = [
        SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=60, structured_outputs=StructuredOutputsParams(
            json=SCHEMA)),
        SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=20, structured_outputs=StructuredOutputsParams(
            choice=["red", "green", "blue"])),
        SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=20, structured_outputs=StructuredOutputsParams(
            regex=r"[0-9]{2}-[a-z]{3}")),
        SamplingParams(temperature=1.0, seed=4, max_tokens=40, structured_outputs=StructuredOutputsParams(
            grammar='root ::= "(" item ("," item)* ")"\nitem ::= [a-c]+')),
        SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=6, max_tokens=10, ignore_eos=True, logit_bias={biased: 100.0}),
    ]
    outputs = llm.generate(["Once upon a time"] * len(params), params)
    return [[(c.text, c.token_ids, c.finish_reason) for c in output.outputs] for output in outputs]


def test_grammars_hold_in_a_mixed_batch_with_and_without_run_ahead(llm: LLM) -> None:
    results = run(llm, run_ahead=False)
    json_outputs, choices, regexes, grammar, free, biased = results
    for text, _, finish_reason in json_outputs:
        assert finish_reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    assert all(text in ("red", "green", "blue") for text, _, _ in choices)
    assert all(re.fullmatch(r"[0-9]{2}-[a-z]{3}", text) for text, _, _ in regexes)
    assert re.fullmatch(r"\([a-c]+(,[a-c]+)*\)", grammar[0][0])
    assert len(free[0][1]) == 10 and free[0][0] != biased[0][0]
    assert biased[0][0] == " yes" * 10  # +100 outweighs anything a model prefers
    # Grammar rows wait for their previous token before the next step's mask: run-ahead changes nothing.
    assert run(llm, run_ahead=True) == results
    assert llm.engine.stats().num_kv_blocks_used == 0
