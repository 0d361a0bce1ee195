"""GPTQ (the int4 variant of ``tfbackend perplexity``): rounding errors absorbed by the remaining columns."""

from __future__ import annotations

import pytest
import torch

from tfbackend.quantization.config import INT4_GPTQ
from tfbackend.quantization.gptq import gptq, gptq_shards, input_second_moments
from tfbackend.quantization.int4 import round_to_nearest


def dequantized(codes, zeros, scales, group_size: int) -> torch.Tensor:
    groups = torch.arange(codes.shape[0]) // group_size
    return ((codes.float() - zeros[groups].float()) * scales[groups]).T


def correlated_inputs(num_tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    return torch.randn(num_tokens, features, generator=generator) @ mixing + 0.3 * torch.randn(
        num_tokens, features, generator=generator
    )


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(1)) * 0.05
    x = correlated_inputs(1024, 320)
    hessian = x.T @ x / x.shape[0]
    codes, zeros, scales = gptq(weight, hessian, 128)
    assert codes.shape == (320, 96) and zeros.shape == scales.shape == (3, 96) and codes.max() <= 15

    def output_error(w: torch.Tensor) -> float:
        return (x @ (w - weight).T).square().mean().item()
    gptq_error = output_error(dequantized(codes, zeros, scales, 128))
    rtn_error = output_error(dequantized(*round_to_nearest(weight, 128), 128))
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_gptq_shards_load_as_a_gptq_checkpoint():
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    x = correlated_inputs(300, 256, seed=3)  # fewer tokens than features would leave H singular: damping helps
    hessian = x.T @ x / x.shape[0]
    layer = INT4_GPTQ.make_linear(256, [64, 32], ["a", "b"], False, torch.float32, torch.device("cpu"))
    for prefix, tensors in zip(("a", "b"), gptq_shards(weight, hessian, [64, 32], 128)):
        for leaf, tensor in tensors.items():
            layer.checkpoint_sinks()[f"{prefix}.{leaf}"](tensor)
    assert layer.ready
    torch.testing.assert_close(layer.dequantize(), dequantized(*gptq(weight, hessian, 128), 128))


def test_input_second_moments_average_every_call_of_each_layer():
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    batches = [torch.randn(5, 8), torch.randn(2, 3, 8)]

    def run():
        for x in batches:
            second(first(x))
    moments = input_second_moments({"first": first, "second": second}, run)
    inputs = torch.cat([x.reshape(-1, 8) for x in batches])
    torch.testing.assert_close(moments["first"], inputs.T @ inputs / 11)
    with torch.no_grad():
        hidden = first(inputs)
    torch.testing.assert_close(moments["second"], hidden.T @ hidden / 11)


def test_a_layer_the_calibration_never_reaches_is_an_error():
    used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"never reached \['unused'\]"):
        input_second_moments({"used": used, "unused": unused}, lambda: used(torch.randn(3, 4)))
