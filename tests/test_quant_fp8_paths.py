"""Which GEMM an FP8 linear runs on a GPU, and the pieces of the ``torch._scaled_mm`` path against the reference.

The Triton activation quantizer runs under ``TRITON_INTERPRET=1`` and ``torch._scaled_mm`` has a CPU
implementation, so the GPU path's numerics are checked here; its speed is ``benchmarks/gpu_quant_check.py``'s.
"""

from __future__ import annotations

import os

# The interpreter is chosen when a kernel is defined, so this must come before the kernels are imported.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from tfbackend.quantization.fp8 import (  # noqa: E402
    ActivationScheme,
    ScaleGrid,
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)
from tfbackend.quantization.fp8_linear import (  # noqa: E402
    SCALED_MM,
    TRITON,
    Fp8Format,
    Fp8Linear,
    fp8_gemm_path,
)
from tfbackend.quantization.kernels.fp8_quant import fp8_quantize_tokens  # noqa: E402
from tfbackend.quantization.kernels.fp8_scaled_mm import fp8_scaled_mm  # noqa: E402

HOPPER, ADA, AMPERE = (9, 0), (8, 9), (8, 0)
PER_CHANNEL = ScaleGrid(torch.ones(4096, 1), 1, 4096)
PER_TENSOR = ScaleGrid(torch.ones(1, 1), 4096, 4096)
BLOCKS = ScaleGrid(torch.ones(32, 32), 128, 128)
PER_TOKEN = ActivationScheme()


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- which path -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capability", [HOPPER, ADA])
@pytest.mark.parametrize("grid", [PER_CHANNEL, PER_TENSOR], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("activation", [PER_TOKEN, ActivationScheme(scale_ub=1200.0), ActivationScheme(dynamic=False)],
                         ids=["per-token", "capped", "static"])
def test_row_wise_scales_in_bf16_take_scaled_mm(capability, grid, activation):
    assert fp8_gemm_path(capability, grid, activation, torch.bfloat16, 4096, 4096) == SCALED_MM


@pytest.mark.parametrize("grid, activation, dtype, in_features, out_features", [
    (BLOCKS, ActivationScheme(group_size=128), torch.bfloat16, 4096, 4096),  # block scales
    (PER_CHANNEL, ActivationScheme(group_size=128), torch.bfloat16, 4096, 4096),  # grouped activations
    (PER_CHANNEL, PER_TOKEN, torch.float16, 4096, 4096),  # torch's row-wise GEMM writes bf16
    (PER_CHANNEL, PER_TOKEN, torch.float32, 4096, 4096),
    (PER_CHANNEL, PER_TOKEN, torch.bfloat16, 4104, 4096),  # K not a multiple of 16
    (PER_CHANNEL, PER_TOKEN, torch.bfloat16, 4096, 4104),  # N not a multiple of 16
], ids=["blocks", "grouped-activations", "fp16", "fp32", "odd-K", "odd-N"])
def test_everything_else_takes_the_triton_gemm(grid, activation, dtype, in_features, out_features):
    assert fp8_gemm_path(HOPPER, grid, activation, dtype, in_features, out_features) == TRITON


def test_gpus_without_fp8_are_refused():
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or newer .* this one is 8\.0"):
        fp8_gemm_path(AMPERE, PER_CHANNEL, PER_TOKEN, torch.bfloat16, 4096, 4096)


# ---- the activation quantizer ------------------------------------------------------------------------------------


def agree_but_for_emulation(codes: torch.Tensor, expected: torch.Tensor, scaled: torch.Tensor) -> bool:
    """Equal FP8 codes, except where the interpreter's numpy emulation of the FP8 conversion is known to differ
    from torch's (and a GPU's, which converts in hardware): exact ties, which it does not round to even, and
    roundings up to the next power of two, whose carry it drops."""
    codes, expected = codes.float(), expected.float()
    ties = (scaled - codes).abs() == (scaled - expected).abs()
    carries = (expected.abs() > scaled.abs()) & (torch.frexp(expected)[0].abs() == 0.5)
    differ = codes != expected
    return bool((~differ | ties | carries).all()) and differ.float().mean() < 0.05


@pytest.mark.parametrize("num_tokens", [1, 37])
@pytest.mark.parametrize("scheme", [PER_TOKEN, ActivationScheme(group_size=128), ActivationScheme(scale_ub=1.0)],
                         ids=["per-token", "groups", "capped"])
def test_the_one_launch_quantizer_matches_quantize_activation(num_tokens, scheme):
    x = (random(num_tokens, 320, seed=1) * 3).to(torch.bfloat16)
    x[0, :] = 0  # an all-zero token takes the smallest scale, not a division by zero
    codes, scales = fp8_quantize_tokens(x, scheme.group_size or 320, scheme.scale_ub)
    expected_codes, expected_scales = quantize_activation(x, scheme)
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert torch.equal(scales, expected_scales)
    scaled = x.float() / expected_scales.repeat_interleave(scheme.group_size or 320, dim=1)[:, :320]
    assert agree_but_for_emulation(codes, expected_codes, scaled.clamp(-448, 448))


# ---- the scaled_mm path -----------------------------------------------------------------------------------------


def per_channel_layer(activation: ActivationScheme, dtype: torch.dtype) -> Fp8Linear:
    fmt = Fp8Format(activation, scale_leaves=("weight_scale",))
    layer = Fp8Linear(256, [96, 32], ["q", "k"], False, dtype, torch.device("cpu"), fmt)
    for prefix, rows, seed in (("q", 96, 2), ("k", 32, 3)):
        weight, grid = quantize_weight(random(rows, 256, seed=seed))
        layer.checkpoint_sinks()[f"{prefix}.weight"](weight)
        layer.checkpoint_sinks()[f"{prefix}.weight_scale"](grid.scale)
        if not activation.dynamic:
            layer.checkpoint_sinks()[f"{prefix}.input_scale"](torch.tensor(0.125))
    assert layer.ready
    return layer


def fp8_exact_inputs(num_tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """bf16 inputs that quantize without rounding (FP8 values, the absmax of each token and of each 128 features
    448 / 8, so every scale is 1/8): the layer's plumbing is then checked free of the interpreter's FP8 emulation."""
    x = random(num_tokens, in_features, seed=seed).mul(100).to(torch.float8_e4m3fn).float()
    x[:, ::128] = 448
    return (x / 8).to(torch.bfloat16)


@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("activation", [PER_TOKEN, ActivationScheme(dynamic=False)], ids=["per-token", "static"])
def test_the_scaled_mm_path_matches_the_layer_reference(num_tokens, activation):
    layer = per_channel_layer(activation, torch.bfloat16)
    layer.use_gemm(SCALED_MM, decode_max_tokens=0, small_batch_tokens=0)  # test_quant_fp8_decode.py: small batches
    x = fp8_exact_inputs(num_tokens, 256, seed=4)
    out = layer.apply_gpu(x)
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, 128)
    torch.testing.assert_close(out.float(), layer.apply_reference(x), rtol=2e-2, atol=2e-2)


def test_scaled_mm_takes_the_weight_as_stored_and_its_scales_as_one_row():
    x = fp8_exact_inputs(3, 64, seed=5)
    weight, grid = quantize_weight(random(48, 64, seed=6))
    out = fp8_scaled_mm(x, weight, grid.scale.reshape(1, -1), None, None)
    x_q, x_scale = quantize_activation(x, PER_TOKEN)
    reference = dequantize_activation(x_q, x_scale, PER_TOKEN) @ dequantize_weight(weight, grid).T
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)


def test_the_triton_path_quantizes_grouped_activations_in_one_launch():
    fmt = Fp8Format(ActivationScheme(group_size=128), weight_block=(128, 128), scale_leaves=("weight_scale",))
    layer = Fp8Linear(256, [128], ["o"], False, torch.float32, torch.device("cpu"), fmt)
    weight, grid = quantize_weight(random(128, 256, seed=7), block=(128, 128))
    layer.checkpoint_sinks()["o.weight"](weight)
    layer.checkpoint_sinks()["o.weight_scale"](grid.scale)
    layer.use_gemm(TRITON)
    x = fp8_exact_inputs(6, 256, seed=8).float()
    torch.testing.assert_close(layer.apply_gpu(x), layer.apply_reference(x), rtol=1e-4, atol=1e-3)
