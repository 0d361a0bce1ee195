"""Quantized GEMM kernels against their references, and the quantization arithmetic they rely on.

The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py), at small sizes chosen to hit
the edges: token counts of one and beyond a tile, output sizes that are not multiples of a tile, K not a
multiple of the FP8 block. References: the exactly dequantized weight times the input (for FP8, the input
rounded through FP8 as the kernel's caller does), and for GGUF the ``gguf`` package's own dequantize.
"""

from __future__ import annotations

import os

# The interpreter is chosen when a kernel is defined, so this must come before the kernels are imported.
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize, quantize  # noqa: E402
from tests.quant_checkpoints import _awq_pack  # noqa: E402
from tests.triton_interpreter import interpreter_bf16_dot  # noqa: E402, F401

from tfbackend.quantization.fp8 import (  # noqa: E402
    FP8_MAX,
    ActivationScheme,
    ScaleGrid,
    dequantize_activation,
    dequantize_weight,
    merge_scale_grids,
    quantize_activation,
    quantize_weight,
)
from tfbackend.quantization.fp8_linear import TRITON, Fp8Format, Fp8Linear  # noqa: E402
from tfbackend.quantization.gguf import GGUFLinear, PlanarGGUF  # noqa: E402
from tfbackend.quantization.int4 import (  # noqa: E402
    AWQ_ORDER,
    Int4Format,
    Int4Linear,
    pack_rows,
    round_to_nearest,
    unpack_columns,
    unpack_rows,
)
from tfbackend.quantization.kernels.fp8_gemm import fp8_gemm  # noqa: E402
from tfbackend.quantization.kernels.gguf_gemm import KERNEL_TYPES, gguf_gemm  # noqa: E402
from tfbackend.quantization.kernels.w4a16_gemm import w4a16_gemm  # noqa: E402

CPU = torch.device("cpu")


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- FP8 arithmetic ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, (128, 128), (64, 32)])
def test_fp8_weight_quantization_scales_each_block_to_the_fp8_range(block):
    weight = random(200, 320)
    quantized, grid = quantize_weight(weight, block)
    expected_grid = (200, 1) if block is None else (-(-200 // block[0]), -(-320 // block[1]))
    assert tuple(grid.scale.shape) == expected_grid
    # Each block's largest element lands on ±448, and dequantizing is within E4M3's relative rounding (2^-4).
    assert quantized.float().abs().amax() == FP8_MAX
    error = (dequantize_weight(quantized, grid) - weight).abs()
    assert (error <= weight.abs() * 2**-4 + grid.expand(200, 320) * 2**-9).all()


@pytest.mark.parametrize("block", [None, (128, 128)])
def test_clip_search_picks_each_blocks_closest_rounding(block):
    weight = random(256, 384, seed=3)
    weight[0, 0] = 12.0  # an outlier: clipping it lets row 0's other weights round more finely
    plain_q, plain = quantize_weight(weight, block)
    searched_q, searched = quantize_weight(weight, block, clip_search=True)
    ratios = searched.scale / plain.scale
    assert ((ratios >= 0.5 - 1e-6) & (ratios <= 1 + 1e-6)).all()
    assert ratios.flatten()[0] < 1  # the outlier's block is clipped

    def block_errors(q, grid):
        error = (dequantize_weight(q, grid) - weight).square()
        rows = error.view(plain.scale.shape[0], -1, error.shape[1]).sum(1)  # per row-block
        return rows.view(rows.shape[0], plain.scale.shape[1], -1).sum(-1)
    assert (block_errors(searched_q, searched) <= block_errors(plain_q, plain) + 1e-9).all()


def test_merged_scale_grids_keep_every_shard_exact():
    shards = [random(128, 256, seed=1), random(64, 256, seed=2), random(64, 256, seed=3)]
    for block in [(128, 128), None]:
        parts = [quantize_weight(w, block) for w in shards]
        merged = merge_scale_grids([grid for _, grid in parts], [128, 64, 64], 256)
        stacked = dequantize_weight(torch.cat([q for q, _ in parts]), merged)
        separate = torch.cat([dequantize_weight(q, grid) for q, grid in parts])
        assert torch.equal(stacked, separate)
    per_tensor = [ScaleGrid(torch.tensor([[0.5]]), 128, 256), ScaleGrid(torch.tensor([[2.0]]), 64, 256)]
    merged = merge_scale_grids(per_tensor, [128, 64], 256)
    assert merged.block_n == 1 and merged.scale[:128].eq(0.5).all() and merged.scale[128:].eq(2.0).all()


@pytest.mark.parametrize("scheme", [ActivationScheme(), ActivationScheme(group_size=128),
                                    ActivationScheme(scale_ub=1.0)])
def test_dynamic_activation_scales_are_absmax_over_448(scheme):
    x = random(5, 320) * 3
    quantized, scale = quantize_activation(x, scheme)
    group = scheme.group_size or 320
    padded = torch.nn.functional.pad(x, (0, -320 % group)).view(5, -1, group)
    amax = padded.abs().amax(-1)
    if scheme.scale_ub is not None:
        amax = amax.clamp(max=scheme.scale_ub)
    assert torch.equal(scale, amax / FP8_MAX)
    restored = dequantize_activation(quantized, scale, scheme)
    if scheme.scale_ub is None:
        assert ((restored - x).abs() <= x.abs() * 2**-4 + 1e-6).all()
    else:  # capped: the largest inputs saturate at ub
        assert restored.abs().max() <= scheme.scale_ub + 1e-6


def test_static_activation_scale_is_used_as_given():
    x = random(3, 64)
    quantized, scale = quantize_activation(x, ActivationScheme(dynamic=False), torch.tensor(0.01))
    assert torch.equal(scale, torch.full((3, 1), 0.01))
    assert torch.equal(quantized, (x / 0.01).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))


# ---- FP8 GEMM ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [1, 37])
@pytest.mark.parametrize("block, group", [(None, None), ((128, 128), 128), ((128, 128), None), (None, 128)])
def test_fp8_gemm_matches_dequantized_reference(num_tokens, block, group):
    x, weight = random(num_tokens, 320, seed=4), random(200, 320, seed=5)
    w_q, grid = quantize_weight(weight, block)
    scheme = ActivationScheme(group_size=group)
    x_q, x_scale = quantize_activation(x, scheme)
    out = fp8_gemm(x_q, x_scale, group or 320, w_q, grid.scale, grid.block_n, grid.block_k, torch.float32)
    reference = dequantize_activation(x_q, x_scale, scheme) @ dequantize_weight(w_q, grid).T
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)


def test_fp8_linear_kernel_path_matches_its_reference():
    """The layer's GPU dispatch (here the Triton GEMM, interpreted) against its CPU reference, on fused shards
    with per-tensor scales and a static input scale."""
    fmt = Fp8Format(ActivationScheme(dynamic=False), scale_leaves=("weight_scale",))
    layer = Fp8Linear(256, [128, 64], ["q", "k"], True, torch.float32, CPU, fmt)
    for prefix, rows, seed in (("q", 128, 6), ("k", 64, 7)):
        quantized, grid = quantize_weight(random(rows, 256, seed=seed), block=(rows, 256))
        sinks = layer.checkpoint_sinks()
        sinks[f"{prefix}.weight"](quantized)
        sinks[f"{prefix}.weight_scale"](grid.scale.reshape(()))
        sinks[f"{prefix}.input_scale"](torch.tensor(0.02 if prefix == "q" else 0.03))
        sinks[f"{prefix}.bias"](random(rows, seed=seed + 10))
    assert layer.ready and layer.missing() == []
    assert layer.input_scale.item() == pytest.approx(0.03)  # fused shards share the larger input scale
    layer.use_gemm(TRITON)
    x = random(9, 256, seed=8)
    torch.testing.assert_close(layer.apply_gpu(x) + layer.bias, layer(x), rtol=1e-5, atol=1e-4)


# ---- int4 -------------------------------------------------------------------------------------------------------


def test_awq_and_gptq_packings_unpack_to_their_codes():
    codes = torch.randint(0, 16, (16, 24), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(unpack_columns(_awq_pack(codes), AWQ_ORDER), codes.to(torch.uint8))
    assert torch.equal(unpack_rows(pack_rows(codes)), codes.to(torch.uint8))
    # GPTQ rows: word j of column n holds rows 8j..8j+7 in bits 0-3 .. 28-31.
    assert pack_rows(codes)[1, 3] == sum(int(codes[8 + i, 3]) << (4 * i) for i in range(8)) - (
        1 << 32 if codes[15, 3] >= 8 else 0
    )


def int4_layer(group_size: int, act_order: bool, out_features: int = 72, in_features: int = 256) -> Int4Linear:
    gen = torch.Generator().manual_seed(group_size)
    width = in_features if group_size == -1 else group_size
    groups = -(-in_features // width)  # a last, narrower group when the width does not divide K (AutoGPTQ's way)
    layer = Int4Linear(in_features, [out_features], ["w"], False, torch.float32, CPU,
                       Int4Format("gptq", group_size, zero_minus_one=False, has_g_idx=True))
    codes = torch.randint(0, 16, (in_features, out_features), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (groups, out_features), generator=gen, dtype=torch.int32)
    g_idx = (torch.arange(in_features) // width).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    sinks = layer.checkpoint_sinks()
    sinks["w.qweight"](pack_rows(codes))
    sinks["w.qzeros"](_pack_columns(zeros))
    sinks["w.scales"](torch.rand(groups, out_features, generator=gen) * 0.1)
    sinks["w.g_idx"](g_idx)
    return layer


def _pack_columns(values: torch.Tensor) -> torch.Tensor:
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int32)
    for col in range(values.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + i] << (4 * i)
    return packed


@pytest.mark.parametrize("num_tokens", [1, 19])
@pytest.mark.parametrize("group_size, act_order, in_features", [
    (128, False, 256), (128, True, 256), (-1, False, 256), (32, False, 256),
    (128, False, 320),  # groups of 128, 128 and 64
])
def test_w4a16_gemm_matches_dequantized_reference(num_tokens, group_size, act_order, in_features):
    layer = int4_layer(group_size, act_order, in_features=in_features)
    assert (layer.g_idx is not None) == act_order  # a trivial g_idx is dropped for the faster kernel path
    x = random(num_tokens, in_features, seed=9)
    torch.testing.assert_close(layer.apply_gpu(x), x @ layer.dequantize().T, rtol=1e-5, atol=1e-4)


def test_round_to_nearest_int4_stays_within_half_a_step():
    weight = random(24, 320, seed=14)  # 320 input features: groups of 128, 128 and 64
    codes, zeros, scales = round_to_nearest(weight, 128)
    assert codes.shape == (320, 24) and zeros.shape == scales.shape == (3, 24) and codes.max() <= 15
    groups = torch.arange(320) // 128
    restored = ((codes.float() - zeros[groups].float()) * scales[groups]).T
    assert ((restored - weight).abs() <= scales[groups].T / 2 + 1e-6).all()


def test_int4_rounded_at_load_runs_through_the_kernel():
    """Fused shards rounded to 4 bits at load (``tfbackend perplexity``'s int4) take the same kernel path."""
    layer = Int4Linear(320, [64, 32], ["a", "b"], False, torch.float32, CPU, Int4Format("gptq", 128, online=True))
    weight = random(96, 320, seed=15) * 0.02
    layer.checkpoint_sinks()["a.weight"](weight[:64])
    layer.checkpoint_sinks()["b.weight"](weight[64:])
    assert layer.ready and layer.g_idx is None
    # Its clipping is searched per group: never further from the weight than plain round-to-nearest.
    codes, zeros, scales = round_to_nearest(weight, 128)
    groups = torch.arange(320) // 128
    plain = ((codes.float() - zeros[groups].float()) * scales[groups]).T
    assert (layer.dequantize() - weight).square().sum() <= (plain - weight).square().sum()
    x = random(5, 320, seed=16)
    torch.testing.assert_close(layer.apply_gpu(x), x @ layer.dequantize().T, rtol=1e-5, atol=1e-4)


def test_w4a16_gemm_in_bfloat16(interpreter_bf16_dot):
    layer = int4_layer(128, False)
    x = random(5, 256, seed=10).to(torch.bfloat16)
    out = w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, None, 128)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x.float() @ layer.dequantize().T, rtol=2e-2, atol=2e-1)


# ---- GGUF -------------------------------------------------------------------------------------------------------


def gguf_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """GGUF rows of ``qtype``: quantized by the ``gguf`` package where it can, else random valid blocks (Q4_K,
    Q6_K: random codes and small positive fp16 super-block scales)."""
    weights = random(rows, cols, seed=seed).numpy()
    if qtype in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1):
        return quantize(weights, qtype)
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    scales = np.abs(rng.normal(0, 0.01, (blocks.shape[0], 2))).astype(np.float16).view(np.uint8)
    if qtype == GGMLQuantizationType.Q4_K:  # d and dmin lead each block
        blocks[:, 0:4] = scales
    else:  # Q6_K: d trails the block
        blocks[:, -2:] = scales[:, :2]
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K])
def test_planar_gguf_dequantizes_exactly_like_the_gguf_package(qtype):
    blocks = gguf_blocks(qtype, 40, 512)
    planar = PlanarGGUF.from_blocks(torch.from_numpy(blocks), qtype)
    assert planar.shape == (40, 512)
    assert torch.equal(planar.dequantize(), torch.from_numpy(dequantize(blocks, qtype)))


@pytest.mark.parametrize("num_tokens", [1, 21])
@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K])
def test_gguf_gemm_matches_gguf_dequantize(num_tokens, qtype):
    blocks = gguf_blocks(qtype, 72, 512, seed=11)
    planar = PlanarGGUF.from_blocks(torch.from_numpy(blocks), qtype)
    x = random(num_tokens, 512, seed=12)
    out = gguf_gemm(x, KERNEL_TYPES[qtype.name], planar.qs, planar.d, planar.m, planar.sc, planar.mn)
    torch.testing.assert_close(out, x @ torch.from_numpy(dequantize(blocks, qtype)).T, rtol=1e-5, atol=1e-4)


def test_gguf_linear_runs_mixed_shard_types_as_parts():
    """llama.cpp mixes types inside one fused projection (here Q4_K q/k and a Q6_K v, which has no kernel)."""
    types = [GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K]
    layer = GGUFLinear(256, [64, 32, 32], ["q", "k", "v"], False, torch.float32, CPU)
    expected = []
    for prefix, rows, qtype, seed in zip("qkv", (64, 32, 32), types, range(3)):
        blocks = gguf_blocks(qtype, rows, 256, seed=seed)
        layer.checkpoint_sinks()[f"{prefix}.qweight"](torch.from_numpy(blocks))
        layer.checkpoint_sinks()[f"{prefix}.qweight_type"](torch.tensor(int(qtype)))
        expected.append(torch.from_numpy(dequantize(blocks, qtype)))
    assert [(start, rows) for start, rows, _ in layer.parts] == [(0, 96), (96, 32)]  # q and k share one GEMM
    assert torch.equal(layer.dequantize(), torch.cat(expected))
    x = random(3, 256, seed=13)
    torch.testing.assert_close(layer.apply_gpu(x), x @ torch.cat(expected).T, rtol=1e-5, atol=1e-4)
