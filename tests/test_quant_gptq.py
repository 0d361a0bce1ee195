"""GPTQ (the calibrated variants of ``tfbackend perplexity``): rounding errors absorbed by the remaining columns, on
the int4 grid and on the FP8 one, stored as checkpoints that load like the Hub's."""

from __future__ import annotations

import pytest
import torch

from tfbackend.quantization.config import FP8_CHANNEL, int4_gptq
from tfbackend.quantization.fp8 import dequantize_weight, quantize_weight
from tfbackend.quantization.gptq import (
    Calibration,
    Fp8Rounding,
    Int4Rounding,
    decoder_block,
    gptq,
    gptq_fp8_shards,
    gptq_int4_shards,
    input_second_moments,
)
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


def output_error(x: torch.Tensor, weight: torch.Tensor, rounded: torch.Tensor) -> float:
    return (x @ (rounded - weight).T).square().mean().item()


def load(method, in_features: int, sizes: list[int], shards: list[dict[str, torch.Tensor]]):
    prefixes = [f"shard{i}" for i in range(len(sizes))]
    layer = method.make_linear(in_features, sizes, prefixes, False, torch.float32, torch.device("cpu"))
    for prefix, tensors in zip(prefixes, shards):
        for leaf, tensor in tensors.items():
            layer.checkpoint_sinks()[f"{prefix}.{leaf}"](tensor)
    assert layer.ready
    return layer


@pytest.mark.parametrize("group_size", [128, 32])
def test_int4_gptq_beats_round_to_nearest_on_the_layer_output(group_size: int):
    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(1)) * 0.05
    x = correlated_inputs(1024, 320)
    hessian = x.T @ x / x.shape[0]
    rounding = Int4Rounding(96, 320, group_size, torch.device("cpu"))
    gptq(weight, hessian, rounding)
    codes = rounding.codes.T
    assert codes.max() <= 15 and codes.min() >= 0 and torch.equal(codes, codes.round())
    assert rounding.zeros.shape == rounding.scales.shape == (-(-320 // group_size), 96)
    gptq_error = output_error(x, weight, dequantized(codes, rounding.zeros, rounding.scales, group_size))
    rtn_error = output_error(x, weight, dequantized(*round_to_nearest(weight, group_size, clip_search=True), group_size))
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_fp8_gptq_beats_round_to_nearest_on_the_layer_output():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    x = correlated_inputs(1024, 256, seed=5)
    hessian = x.T @ x / x.shape[0]
    shards = gptq_fp8_shards(weight, hessian, [64])
    assert shards[0]["weight"].dtype == torch.float8_e4m3fn and shards[0]["weight_scale"].shape == (64, 1)
    rounded = shards[0]["weight"].float() * shards[0]["weight_scale"]
    fp8, grid = quantize_weight(weight, clip_search=True)
    # Same per-channel scales as --quantization fp8 picks; only the rounding differs.
    torch.testing.assert_close(shards[0]["weight_scale"], grid.scale)
    gptq_error, rtn_error = output_error(x, weight, rounded), output_error(x, weight, dequantize_weight(fp8, grid))
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gptq_shards_load_as_a_gptq_checkpoint(act_order: bool):
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    x = correlated_inputs(300, 256, seed=3)  # fewer tokens than features would leave H singular: damping helps
    x[:, 7] *= 20  # an input act order takes first
    hessian = x.T @ x / x.shape[0]
    shards = gptq_int4_shards(weight, hessian, [64, 32], 32, act_order)
    layer = load(int4_gptq(32), 256, [64, 32], shards)
    assert (layer.g_idx is not None) == act_order  # a trivial g_idx is dropped at load
    rounding = Int4Rounding(96, 256, 32, torch.device("cpu"))
    order = gptq(weight, hessian, rounding, act_order=act_order)
    assert (order[0].item() == 7) == act_order
    expected = dequantized(rounding.codes.T, rounding.zeros, rounding.scales, 32)  # columns in rounding order
    torch.testing.assert_close(layer.dequantize()[:, order], expected)


def test_fp8_gptq_shards_load_as_a_per_channel_fp8_checkpoint():
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(6)) * 0.05
    x = correlated_inputs(500, 128, seed=7)
    shards = gptq_fp8_shards(weight, x.T @ x / 500, [32, 16], act_order=True)
    layer = load(FP8_CHANNEL, 128, [32, 16], shards)
    expected = torch.cat([shard["weight"].float() * shard["weight_scale"] for shard in shards])
    torch.testing.assert_close(layer.dequantize(), expected)
    assert (layer.dequantize() - weight).abs().max() < 0.1 * weight.abs().max()


def test_fp8_rounding_spans_all_columns_with_one_grid():
    rounding = Fp8Rounding(4, 64, torch.device("cpu"))
    assert rounding.group_size == 64


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


def test_decoder_blocks_are_named_by_their_index():
    assert decoder_block("model.layers.3.mlp.down_proj") == "model.layers.3"
    assert decoder_block("model.layers.12") == "model.layers.12"
    assert decoder_block("lm_head") == "lm_head"


def two_blocks() -> torch.nn.Module:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6, bias=False) for _ in range(2)])
    return model


def test_sequential_calibration_sees_the_earlier_blocks_as_quantized():
    model, x = two_blocks(), torch.randn(10, 6)
    runs, finished = [], []

    def run():
        runs.append(1)
        model.layers[1](model.layers[0](x))
        finished.append(1)
    calibration = Calibration(model, ["layers.0", "layers.1"], run, sequential=True)
    torch.testing.assert_close(calibration.hessian("layers.0"), x.T @ x / 10)
    assert finished == []  # stopped once its block had run
    with torch.no_grad():
        model.layers[0].weight.mul_(2)  # block 0 "quantized" before block 1 is asked for
        hidden = model.layers[0](x)
    torch.testing.assert_close(calibration.hessian("layers.1"), hidden.T @ hidden / 10)
    calibration.hessian("layers.1")
    assert len(runs) == 2 and finished == []  # one calibration run per block, each stopped after it


def test_one_pass_calibration_sees_the_unquantized_model():
    model, x = two_blocks(), torch.randn(10, 6)
    runs = []

    def run():
        runs.append(1)
        model.layers[1](model.layers[0](x))
    calibration = Calibration(model, ["layers.0", "layers.1"], run, sequential=False)
    with torch.no_grad():
        hidden = model.layers[0](x)
    torch.testing.assert_close(calibration.hessian("layers.0"), x.T @ x / 10)
    with torch.no_grad():
        model.layers[0].weight.mul_(2)  # quantizing block 0 changes nothing block 1 was calibrated on
    torch.testing.assert_close(calibration.hessian("layers.1"), hidden.T @ hidden / 10)
    assert len(runs) == 1
