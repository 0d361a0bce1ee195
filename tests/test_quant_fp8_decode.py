"""The FP8 decode GEMM (``kernels/fp8_decode_gemm.py``): one launch that quantizes each token as
``fp8.quantize_activation`` does and multiplies by the FP8 weight, split along K, for batches of up to 16 tokens.

Run under ``TRITON_INTERPRET=1``, with the interpreter's float32 -> E4M3 conversion replaced by torch's
(``interpreter_fp8_casts``), so in-kernel codes can be compared with ``quantize_activation``'s bit for bit. Shapes
hit the edges: K not a multiple of the 128-wide K step, N not a multiple of the column tile, 1 / 3 / 16 tokens.
Its speed is ``benchmarks/gpu_quant_check.py``'s (the fp8-ch/dec and fp8-blk/dec columns).
"""

from __future__ import annotations

import dataclasses
import os

# The interpreter is chosen when a kernel is defined, so this must come before the kernels are imported.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from tests.triton_interpreter import interpreter_fp8_casts  # noqa: E402, F401

from tfbackend.quantization.fp8 import (  # noqa: E402
    ActivationScheme,
    ScaleGrid,
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)
from tfbackend.quantization.fp8_linear import (  # noqa: E402
    DECODE,
    DECODE_MAX_TOKENS,
    SCALED_MM,
    SMALL_BATCH_TOKENS,
    TRITON,
    Fp8Format,
    Fp8Linear,
    fp8_decode_applies,
    fp8_gemm_for_tokens,
)
from tfbackend.quantization.kernels.fp8_decode_gemm import decode_counters, fp8_decode_gemm  # noqa: E402
from tfbackend.quantization.kernels.tiles import DECODE_BLOCK_K, DecodeTiles, decode_tiles  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpreter_fp8_casts")

CPU = torch.device("cpu")
PER_TOKEN = ActivationScheme()
CAPPED = ActivationScheme(scale_ub=2.0)
GRIDS = {"per-tensor": (200, 320), "per-channel": None, "blocks": (128, 128)}


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def activations(num_tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """bf16 tokens of different magnitudes, one all zeros (the smallest scale, not a division by zero) and one
    with an outlier far above the capped schemes' ``scale_ub`` (its codes saturate at +-448)."""
    x = random(num_tokens, in_features, seed=seed) * torch.logspace(-2, 1, num_tokens)[:, None]
    x[0] = 0
    if num_tokens > 1:
        x[-1, 5] = 300.0
    return x.to(torch.bfloat16)


def reference(x: torch.Tensor, weight: torch.Tensor, grid: ScaleGrid, scheme: ActivationScheme) -> torch.Tensor:
    return dequantize_activation(*quantize_activation(x, scheme), scheme) @ dequantize_weight(weight, grid).T


# ---- the kernel ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize("grid_kind", GRIDS)
@pytest.mark.parametrize("scheme", [PER_TOKEN, CAPPED], ids=["per-token", "capped"])
@pytest.mark.parametrize("splits", [1, 3], ids=["whole-K", "split-K"])
def test_decode_gemm_matches_the_quantized_reference(num_tokens, grid_kind, scheme, splits):
    x = activations(num_tokens, 320, seed=num_tokens)
    weight, grid = quantize_weight(random(200, 320, seed=1), GRIDS[grid_kind])
    counters = decode_counters(200, CPU)
    out = fp8_decode_gemm(x.float(), weight, grid.scale, grid.block_n, grid.block_k, scheme.scale_ub, counters,
                          64, splits)
    torch.testing.assert_close(out, reference(x, weight, grid, scheme), rtol=1e-5, atol=1e-4)
    assert not counters.any()  # left as found: the next launch (or CUDA-graph replay) starts from zero


@pytest.mark.parametrize("block", [(200, 700), None, (128, 256)], ids=["per-tensor", "per-channel", "blocks"])
@pytest.mark.parametrize("splits", [1, 2], ids=["whole-K", "split-K"])
@pytest.mark.parametrize("block_k", [128, 256])
def test_one_token_gemv_form_matches_the_quantized_reference(block, splits, block_k):
    """The GEMV form (one token, no padded tl.dot rows) and wider K steps compute the same product."""
    x = activations(1, 700, seed=7)
    weight, grid = quantize_weight(random(200, 700, seed=8), block)
    counters = decode_counters(200, CPU)
    out = fp8_decode_gemm(x.float(), weight, grid.scale, grid.block_n, grid.block_k, None, counters,
                          32, splits, block_k, 4, 3, True)
    torch.testing.assert_close(out, reference(x, weight, grid, PER_TOKEN), rtol=1e-5, atol=1e-4)
    assert not counters.any()


@pytest.mark.parametrize("num_tokens, gemv", [(1, False), (1, True), (3, False), (16, False)])
@pytest.mark.parametrize("scheme", [PER_TOKEN, CAPPED], ids=["per-token", "capped"])
def test_in_kernel_codes_are_quantize_activations_bit_for_bit(num_tokens, gemv, scheme):
    """Through an identity weight each output is one code times its token's scale, exactly: the in-kernel
    quantization (absmax, scale, division, rounding; in the GEMV form, inside its loop) must reproduce
    ``quantize_activation`` with no slack."""
    x = activations(num_tokens, 200, seed=10 + num_tokens).float()
    if num_tokens == 1:  # activations() zeroes its first token: here the one token is a real row, with an outlier
        x = random(1, 200, seed=11) * 3
        x[0, 7] = 300.0
    identity = torch.eye(200).to(torch.float8_e4m3fn)
    ones = ScaleGrid(torch.ones(1, 1), 200, 200)
    out = fp8_decode_gemm(x, identity, ones.scale, ones.block_n, ones.block_k, scheme.scale_ub,
                          decode_counters(200, CPU), 64, 2, 128, 4, 4, gemv)
    assert torch.equal(out, dequantize_activation(*quantize_activation(x, scheme), scheme))


def test_decode_gemm_writes_the_input_dtype():
    x = activations(2, 256, seed=3)
    weight, grid = quantize_weight(random(64, 256, seed=4))
    out = fp8_decode_gemm(x, weight, grid.scale, grid.block_n, grid.block_k, None, decode_counters(64, CPU), 64, 1)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64)
    torch.testing.assert_close(out.float(), reference(x, weight, grid, PER_TOKEN), rtol=1e-2, atol=1e-2)


def test_decode_gemm_refuses_what_it_cannot_run():
    weight, grid = quantize_weight(random(64, 256, seed=5), block=(64, 64))
    with pytest.raises(ValueError, match="not multiples of 128"):
        fp8_decode_gemm(random(1, 256), weight, grid.scale, 64, 64, None, decode_counters(64, CPU), 64, 1)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_decode_gemm(random(1, 256), weight, grid.scale, 64, 256, None, decode_counters(64, CPU), 64, 1, 192)
    with pytest.raises(ValueError, match="at most 64 tokens"):
        fp8_decode_gemm(random(65, 256), weight, grid.scale, 64, 256, None, decode_counters(64, CPU), 64, 1)


# ---- tiles --------------------------------------------------------------------------------------------------------

H100_SMS = 132
LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@pytest.mark.parametrize("name", LLAMA_8B)
def test_decode_tiles_keep_the_sms_busy_and_each_split_several_steps(name):
    out_features, in_features = LLAMA_8B[name]
    tiles = decode_tiles(out_features, in_features, H100_SMS)
    programs = -(-out_features // tiles.block_n) * tiles.splits
    assert H100_SMS // 2 <= programs <= 3 * H100_SMS
    assert -(-in_features // tiles.block_k) // tiles.splits >= 4
    assert tiles.block_k % DECODE_BLOCK_K == 0


def test_decode_tiles_follow_the_h100_measurements():
    """benchmarks/fp8_decode_probe.py's winners for Llama-3.1-8B on an H100 (132 SMs)."""
    assert decode_tiles(28672, 4096, H100_SMS) == DecodeTiles(128, 1, 256, 8, 4, gemv=True)  # wide: GEMV
    assert decode_tiles(6144, 4096, H100_SMS) == DecodeTiles(64, 4, 256, 4, 4, gemv=True)  # 96 tiles x 4 splits
    assert decode_tiles(4096, 4096, H100_SMS) == DecodeTiles(32, 1, 512, 8, 4, gemv=True)  # narrow: GEMV
    assert decode_tiles(4096, 14336, H100_SMS) == DecodeTiles(64, 2, 256, 8, 4)  # long K: 64 tiles x 2 splits
    assert decode_tiles(4096, 256, H100_SMS).splits == 1  # 2 K steps: nothing to split
    assert decode_tiles(4096, 256, H100_SMS).block_k == DECODE_BLOCK_K


def test_a_k_step_never_straddles_two_scale_blocks():
    """Block-scaled weights (DeepSeek's 128 x 128) keep 128-wide K steps; wider blocks allow wider steps."""
    for out_features, in_features in LLAMA_8B.values():
        assert decode_tiles(out_features, in_features, H100_SMS, scale_block_k=128).block_k == DECODE_BLOCK_K
    assert decode_tiles(4096, 4096, H100_SMS, scale_block_k=256).block_k == 256  # o: 512 unscaled
    assert decode_tiles(4096, 4096, H100_SMS, scale_block_k=1024).block_k == 512


# ---- which layers and batches take it -----------------------------------------------------------------------------

PER_CHANNEL = ScaleGrid(torch.ones(4096, 1), 1, 4096)
BLOCKS = ScaleGrid(torch.ones(32, 32), 128, 128)


@pytest.mark.parametrize("grid, activation, applies", [
    (PER_CHANNEL, PER_TOKEN, True),
    (ScaleGrid(torch.ones(1, 1), 4096, 4096), CAPPED, True),  # per tensor, capped scales
    (BLOCKS, PER_TOKEN, True),  # one scale per 128-wide K step
    (ScaleGrid(torch.ones(64, 64), 64, 64), PER_TOKEN, False),  # scales change within a K step
    (BLOCKS, ActivationScheme(group_size=128), False),  # grouped activations keep the Triton GEMM
    (PER_CHANNEL, ActivationScheme(dynamic=False), False),  # a static input scale keeps its GEMM
], ids=["per-channel", "per-tensor-capped", "blocks", "narrow-blocks", "grouped", "static"])
def test_which_layers_can_take_the_decode_gemm(grid, activation, applies):
    assert fp8_decode_applies(grid, activation, 4096) == applies


def fp8_layer(activation: ActivationScheme, block: tuple[int, int] | None, dtype: torch.dtype) -> Fp8Linear:
    layer = Fp8Linear(256, [96, 104], ["q", "k"], False, dtype, CPU, Fp8Format(activation, block))
    for prefix, rows, seed in (("q", 96, 20), ("k", 104, 21)):
        weight, grid = quantize_weight(random(rows, 256, seed=seed), block)
        layer.checkpoint_sinks()[f"{prefix}.weight"](weight)
        layer.checkpoint_sinks()[f"{prefix}.weight_scale"](grid.scale)
    assert layer.ready
    return layer


def test_by_default_a_single_token_takes_the_decode_gemm():
    """What the H100 measured (fp8_linear.SMALL_BATCH_TOKENS): one token, any projection shape."""
    assert DECODE_MAX_TOKENS == 1
    layer = fp8_layer(PER_TOKEN, None, torch.bfloat16)
    layer.use_gemm(SCALED_MM)
    assert [layer.gemm_for_tokens(n) for n in (1, 2)] == [DECODE, TRITON]


@pytest.mark.parametrize("path", [SCALED_MM, TRITON])
def test_small_batches_take_the_decode_then_the_triton_gemm_and_larger_ones_the_layers_gemm(path):
    small = [fp8_gemm_for_tokens(n, path, 4, SMALL_BATCH_TOKENS) for n in (1, 4, 5, SMALL_BATCH_TOKENS)]
    assert small == [DECODE, DECODE, TRITON, TRITON]
    assert fp8_gemm_for_tokens(SMALL_BATCH_TOKENS + 1, path, 4, SMALL_BATCH_TOKENS) == path
    assert fp8_gemm_for_tokens(1, path, 0, 0) == path


@pytest.mark.parametrize("path", [SCALED_MM, TRITON])
def test_a_layer_follows_the_small_batch_rule_its_shape_and_scales_allow(path):
    layer = fp8_layer(PER_TOKEN, None, torch.bfloat16)
    layer.use_gemm(path)
    assert [layer.gemm_for_tokens(n) for n in (1, 2, SMALL_BATCH_TOKENS + 1)] == [DECODE, TRITON, path]
    layer.use_gemm(path, decode_max_tokens=3)
    assert [layer.gemm_for_tokens(n) for n in (3, 4)] == [DECODE, TRITON]
    layer.use_gemm(path, decode_max_tokens=0, small_batch_tokens=0)
    assert layer.gemm_for_tokens(1) == path


def test_grouped_activations_never_take_the_decode_gemm():
    layer = fp8_layer(ActivationScheme(group_size=128), (128, 128), torch.float32)
    layer.use_gemm(TRITON)
    assert layer.gemm_for_tokens(1) == TRITON


@pytest.mark.parametrize("block", [None, (128, 128)], ids=["per-channel", "blocks"])
@pytest.mark.parametrize("num_tokens, gemv", [(1, False), (1, True), (5, True)])
def test_a_layers_decode_batch_matches_its_reference(block, num_tokens, gemv):
    layer = fp8_layer(CAPPED, block, torch.float32)
    layer.use_gemm(TRITON, decode_max_tokens=16)
    layer.decode_tiles = dataclasses.replace(layer.decode_tiles, gemv=gemv)  # GEMV: one token only, else tl.dot
    x = activations(num_tokens, 256, seed=22).float()
    assert layer.gemm_for_tokens(num_tokens) == DECODE
    torch.testing.assert_close(layer.apply_gpu(x), layer.apply_reference(x), rtol=1e-5, atol=1e-4)


def test_one_compiled_graph_serves_every_batch_size_whichever_gemm_each_takes():
    """The GEMM is picked inside one opaque op (``kernels/fp8_linear_op.py``), so dynamo does not guard on the
    token count: batches taking the decode GEMM, the Triton GEMM and ``_scaled_mm`` share one compiled graph (each
    such guard cost a full Inductor compile of the model at startup)."""
    layer = fp8_layer(PER_TOKEN, None, torch.bfloat16)
    layer.use_gemm(SCALED_MM, decode_max_tokens=4)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer.apply_gpu, backend=record, dynamic=True)
    for num_tokens, path in ((2, DECODE), (8, TRITON), (40, SCALED_MM)):
        assert layer.gemm_for_tokens(num_tokens) == path
        x = activations(num_tokens, 256, seed=30 + num_tokens)
        torch.testing.assert_close(compiled(x), layer.apply_gpu(x), rtol=0, atol=0)
    assert len(graphs) == 1
