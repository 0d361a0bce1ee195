"""GGUF files run from their quantized blocks and compute exactly what transformers' float32 loading computes.

The tiny GGUF (tests/gguf_checkpoints.py) mixes Q8_0, Q4_1, Q4_K, Q6_K and F32 tensors and stores q/k rows in
llama.cpp's order. Converted by ``resolve_model``, its weights stay blocks; loaded, Q8_0/Q4_1/Q4_K linears are
``GGUFLinear`` parts and the rest is dequantized. The reference is transformers loading the same file with
``gguf_file=`` (everything dequantized to float32), which was the conversion before weights stayed quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open
from tests.gguf_checkpoints import write_tiny_gguf
from tests.tiny_models import random_prompts
from tests.test_quant_loading import load, twin_greedy
from transformers import AutoModelForCausalLM

from tfbackend.entrypoints.check import compare, run_greedy
from tfbackend.model_source import resolve_model
from tfbackend.quantization.gguf import GGUFLinear, PlanarGGUF

CPU = torch.device("cpu")
PROMPTS = random_prompts([4, 17, 30])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """(the .gguf file, its converted folder)."""
    directory = tmp_path_factory.mktemp("gguf")
    gguf_file = write_tiny_gguf(directory / "tiny-llama.gguf")
    return gguf_file, resolve_model(str(gguf_file), cache_dir=directory / "cache", progress=False)


def test_conversion_keeps_every_tensor_in_its_blocks(tiny_gguf):
    gguf_file, folder = tiny_gguf
    assert json.loads((folder / "config.json").read_text())["quantization_config"] == {"quant_method": "gguf"}
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        types = {name.removesuffix(".qweight_type"): GGMLQuantizationType(int(f.get_tensor(name)))
                 for name in f.keys() if name.endswith(".qweight_type")}
        dense = sorted(name for name in f.keys() if not name.endswith(("qweight", "qweight_type")))
    assert types["model.layers.0.self_attn.q_proj"] == GGMLQuantizationType.Q4_1  # q rows un-permuted as blocks
    assert types["model.layers.1.self_attn.v_proj"] == GGMLQuantizationType.Q6_K
    assert types["model.layers.0.mlp.down_proj"] == GGMLQuantizationType.Q4_K
    assert types["model.embed_tokens"] == GGMLQuantizationType.Q8_0
    assert all(name.endswith("norm.weight") for name in dense)  # only the F32 norms are stored as floats
    # The folder holds the file's bytes, not a float32 expansion of them.
    assert (folder / "model.safetensors").stat().st_size < 1.05 * gguf_file.stat().st_size


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_gguf_runs_from_its_blocks_like_transformers_dequantized(tiny_gguf, impl):
    gguf_file, folder = tiny_gguf
    model, hf_config = load(folder, impl)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 2 * (4 if impl == "native" else 7)
    kinds = [type(weight).__name__ for layer in layers for _, _, weight in layer.parts]
    assert kinds.count("Tensor") == 1  # layer 1's Q6_K v projection; everything else runs from blocks
    assert all(isinstance(weight, PlanarGGUF) or weight.dtype == torch.float32
               for layer in layers for _, _, weight in layer.parts)
    quantized = run_greedy(model, PROMPTS, 8, torch.float32, CPU, block_size=4)

    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    result = compare(quantized, twin_greedy(reference.eval(), PROMPTS), atol=1e-4)
    assert result.ok, result
