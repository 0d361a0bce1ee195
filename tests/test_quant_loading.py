"""Quantized HF checkpoints load into native ports and the Transformers fallback, and compute what their
dequantized weights compute.

Each format's tiny checkpoint is written from one random dense model (Qwen2-shaped: biased q/k/v, so fused
quantized projections also carry per-shard biases; 128-wide, so int4 uses real 128-row groups and the fused
64-row k/v shards straddle 128x128 FP8 blocks). The reference is the dequantized twin: the dense model holding
the weights the checkpoint's tensors dequantize to, run by the same implementation through the fallback's HF
code. Int4 is weight-only, so logits must match the twin to float32 rounding. FP8 also rounds every linear's
input to FP8, which on these deliberately chaotic random models moves logits by up to ~20% of their range, so
it is held to the twin that rounds its inputs the same way (to float32 rounding, up to a rare tie that an ulp
of difference sends to the other FP8 neighbour), and against the plain twin only its first greedy token must
agree. On a real model the difference is small: see docs/quantization.md (perplexity).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tests.quant_checkpoints import (
    FORMATS,
    FP8_ACTIVATIONS,
    emulate_fp8_activations,
    fp8_online_twin,
    write_quantized,
)
from tests.tiny_models import make_config, random_prompts
from transformers import AutoConfig, AutoModelForCausalLM

from tfbackend import LLM, SamplingParams
from tfbackend.adapter import TransformersForCausalLM
from tfbackend.attention_bridge import ATTN_IMPLEMENTATION
from tfbackend.entrypoints.check import compare, run_greedy
from tfbackend.quantization.linear import QuantizedLinear
from tfbackend.registry import resolve

CPU = torch.device("cpu")
PROMPTS = random_prompts([5, 19, 33])
MAX_TOKENS = 8
TOLERANCE = 1e-4  # max |Δlogit|, weight-only formats against the dequantized twin
FP8_TOLERANCE = 1e-2  # max |Δlogit| against the twin that rounds its inputs to FP8 too (logits span about ±7)


def dense_model(seed: int = 0) -> torch.nn.Module:
    config = make_config("qwen2", hidden_size=128, intermediate_size=256, head_dim=32,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0, 0.2) if "norm" in name else param.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """format -> (quantized checkpoint, its dequantized twin)."""
    model = dense_model()
    return {fmt: (path, write_quantized(model, path, fmt)) for fmt in FORMATS
            for path in [tmp_path_factory.mktemp(fmt)]}


def load(path: Path, impl: str, **kwargs):
    hf_config = AutoConfig.from_pretrained(path)
    return resolve(hf_config, impl).model_class.load(path, hf_config, torch.float32, CPU, **kwargs), hf_config


def greedy(path: Path, impl: str, **kwargs):
    model, hf_config = load(path, impl, **kwargs)
    return model, run_greedy(model, PROMPTS, MAX_TOKENS, torch.float32, CPU, block_size=4)


def twin_greedy(twin: torch.nn.Module, prompts: list[list[int]] = PROMPTS):
    """A dense HF model through the fallback's code path (HF modules, our paged attention)."""
    twin.config._attn_implementation = ATTN_IMPLEMENTATION
    return run_greedy(TransformersForCausalLM.wrap(twin), prompts, MAX_TOKENS, torch.float32, CPU, block_size=4)


@pytest.mark.parametrize("impl", ["native", "transformers"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_checkpoint_matches_its_dequantized_weights(checkpoints, fmt, impl):
    path, twin = checkpoints[fmt]
    model, quantized = greedy(path, impl)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    # Every decoder linear is quantized: 7 per layer in HF, fused into qkv, o, gate_up and down natively.
    assert len(layers) == 2 * (4 if impl == "native" else 7)
    plain = compare(quantized, twin_greedy(copy.deepcopy(twin)), atol=TOLERANCE)
    if fmt not in FP8_ACTIVATIONS:
        assert plain.ok, plain
        return
    assert all(index is None or index >= 1 for index in plain.first_divergence), plain
    emulated_twin = emulate_fp8_activations(copy.deepcopy(twin), FP8_ACTIVATIONS[fmt], path)
    emulated = compare(quantized, twin_greedy(emulated_twin), FP8_TOLERANCE)
    assert emulated.ok, emulated


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_fp8_quantizes_a_dense_checkpoint_at_load(tmp_path, impl):
    model = dense_model()
    model.save_pretrained(tmp_path)
    quantized_model, quantized = greedy(tmp_path, impl, quantization="fp8")
    layers = [m for m in quantized_model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * (4 if impl == "native" else 7)
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    result = compare(quantized, twin_greedy(fp8_online_twin(model)), FP8_TOLERANCE)
    assert result.ok, result


@pytest.mark.parametrize("impl", ["auto", "compat"])
def test_engine_serves_a_quantized_checkpoint(checkpoints, tmp_path, impl):
    """Through the engine, also in the compat tier (HF's own attention and caches around our linears)."""
    path, twin = checkpoints["awq"]
    twin.save_pretrained(tmp_path)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    tokens = []
    for folder in (path, tmp_path):
        llm = LLM(str(folder), model_impl=impl, dtype="float32", device="cpu", block_size=4, max_model_len=64)
        tokens.append([out.outputs[0].token_ids for out in llm.generate(prompts, params)])
    assert tokens[0] == tokens[1]
