"""SamplingParams refuse what cannot run, with messages that say why (the server answers them as 400s)."""

from __future__ import annotations

import math

import pytest

from tfbackend.sampling_params import MAX_N, SamplingParams, StructuredOutputsParams


@pytest.mark.parametrize(("fields", "message"), [
    (dict(n=0), "n must be between 1 and 128"),
    (dict(n=MAX_N + 1), "n must be between 1 and 128"),
    (dict(n=10**12), "n must be between"),
    (dict(temperature=-0.1), r"temperature must be in \[0, 2\]"),
    (dict(temperature=2.5), r"temperature must be in \[0, 2\]"),
    (dict(temperature=1e9), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=math.nan), "top_p"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(seed=2**63), "seed must be a 64-bit signed integer"),
    (dict(seed=-(2**63) - 1), "seed must be a 64-bit signed integer"),
    (dict(logit_bias={5: math.nan}), "logit_bias"),
    (dict(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+")), "min_tokens cannot be combined"),
])
def test_out_of_range_values_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_accepted_edges_and_vllm_normalisations() -> None:
    assert SamplingParams(n=MAX_N, temperature=2.0, seed=2**63 - 1).n == MAX_N
    assert SamplingParams(temperature=1e-5).temperature == 1e-2  # a near-zero temperature would overflow; as vLLM
    assert SamplingParams(temperature=0).greedy
    bias = SamplingParams(logit_bias={"7": 250, 8: -math.inf}).logit_bias
    assert bias == {7: 100.0, 8: -100.0}  # OpenAI's range, clamped as vLLM does


def test_structured_outputs_take_exactly_one_constraint() -> None:
    assert StructuredOutputsParams(json={"type": "object"}).kind == "json"
    assert StructuredOutputsParams(choice=["a", "b"]).choice == ("a", "b")
    assert StructuredOutputsParams(json={"b": 1, "a": 2}).json == '{"b": 1, "a": 2}'  # order kept, as written
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of json, json_object, regex, choice or grammar, got json, regex"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="non-empty list of non-empty strings"):
        StructuredOutputsParams(choice=["a", ""])
