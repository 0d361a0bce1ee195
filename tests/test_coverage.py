"""Coverage: every causal-LM type of the installed transformers either generates exactly what HF generates, or
is refused up front with a reason. Never wrong tokens, never an error mid-run.

By default a sample runs: the types that exercise each hard case the fallback meets (MLA, per-layer KV layouts,
shared KV, windows only HF's masks express, chunked attention, two attention calls per layer, head transforms,
encoder heads used as decoders, multimodal text decoders, native ports declining a config) plus a fixed spread of
the rest. ``pytest --sweep`` runs every type (minutes per dozen types on a laptop CPU; scripts/coverage_sweep.py
runs them in parallel and writes docs/supported_models.md).
"""

from __future__ import annotations

import pytest

from tests.coverage import MATCH, NOT_BUILT, REFUSED, check_model_type
from tests.model_zoo import causal_lm_types

HARD_CASES = (
    "deepseek_v2",  # MLA: keys wider than values
    "mimo_v2_flash",  # sliding layers with more KV heads than full ones
    "gemma3n_text",  # per-layer head dims, layers sharing another layer's KV
    "jetmoe",  # KV heads not where the config says
    "exaone",  # LlamaForCausalLM architecture, another model_type: the native port declines
    "llama4_text",  # chunked attention, expressed only through HF's mask
    "phimoe",  # a sliding window expressed only through HF's mask
    "diffllama",  # two attention calls per layer with the same keys and other values
    "doge",  # its own attention bias passed as the mask
    "moshi",  # a sliding window only in its HF cache, not in its mask: decode sees fewer keys than prefill
    "modernbert-decoder",  # get_decoder() returns the LM head
    "bert",  # encoder family as a decoder, LM head with a transform
    "electra",  # head that projects before the output embedding
    "mllama",  # text decoder of a multimodal checkpoint: a config type no auto class maps
    "lfm2",  # convolution layers in an interface-capable class
    "gpt_oss",  # attention sinks
    "gemma2",  # softcaps
)
SPREAD = 6  # and every SPREAD-th of the remaining types, in name order
# Hard cases that are about the tier serving them: Llama 4's chunked layers keep an HF cache window no longer than
# their chunk, which the paged fallback reproduces; Moshi's cache window is not in its mask, which only compat can.
EXPECTED_TIER = {"llama4_text": "transformers", "moshi": "compat"}


def sample(types: list[str]) -> list[str]:
    rest = [t for t in types if t not in HARD_CASES]
    return [t for t in HARD_CASES if t in types] + rest[::SPREAD]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_type" in metafunc.fixturenames:
        types = causal_lm_types()
        metafunc.parametrize("model_type", types if metafunc.config.getoption("sweep") else sample(types))


@pytest.mark.timeout(300)
def test_generates_what_hf_generates_or_is_refused_with_a_reason(model_type: str) -> None:
    outcome = check_model_type(model_type)
    if outcome.status == NOT_BUILT:
        pytest.skip(f"{model_type} has no tiny form HF itself runs: {outcome.reason}")
    assert outcome.status in (MATCH, REFUSED), f"{outcome.status}: {outcome.reason}"
    assert outcome.reason, "every outcome says which tier ran it and why, or why none could"
    if model_type in EXPECTED_TIER:
        assert outcome.model_impl == EXPECTED_TIER[model_type], outcome.reason
