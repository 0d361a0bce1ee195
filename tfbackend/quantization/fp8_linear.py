"""FP8 (E4M3) linear layers: checkpoint FP8 weights with their scales, or bf16/fp32 weights quantized at load.

The input is quantized to FP8 on every call (per token, per token and 128-wide group, or with the checkpoint's
static scale) and multiplied in FP8 by the path ``fp8_gemm_path`` picks: ``torch._scaled_mm`` when both sides'
scales are one per row (``kernels/fp8_scaled_mm.py``), else the Triton GEMM of ``kernels/fp8_gemm.py``, which
takes any scale grid. Dynamic input scales come from one Triton launch (``kernels/fp8_quant.py``). Small batches
take the GEMM measured fastest for them (``fp8_gemm_for_tokens``): the Triton GEMM instead of ``_scaled_mm``, and
for a single token with dynamic per-token input scales one launch that quantizes as it multiplies
(``kernels/fp8_decode_gemm.py``, tiled per shape by ``tiles.decode_tiles``). On the GPU every call is one opaque
op that makes that choice when it runs (``kernels/fp8_linear_op.py``), so a compiled model does not guard on the
token count. The CPU reference quantizes the input the same way (``fp8.quantize_activation``) and multiplies the
dequantized operands in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tfbackend.quantization.fp8 import (
    FP8_DTYPE,
    ActivationScheme,
    ScaleGrid,
    dequantize_activation,
    dequantize_weight,
    merge_scale_grids,
    quantize_activation,
    quantize_weight,
    scale_grid_from_checkpoint,
)
from tfbackend.quantization.kernels.tiles import DECODE_BLOCK_K, DECODE_TOKEN_LIMIT, DecodeTiles, decode_tiles
from tfbackend.quantization.linear import QuantizedLinear

# Compute capability from which GPUs multiply FP8 natively (Ada, Hopper and later).
_FP8_CAPABILITY = (8, 9)
# The GEMMs an FP8 linear runs on a GPU.
SCALED_MM, TRITON, DECODE = "scaled_mm", "triton", "decode"
# Small batches, as measured on an H100 (benchmarks/gpu_quant_check.py, 2026-11-28, Llama-3.1-8B projections, time
# / bf16 F.linear at 1-16 tokens): the Triton GEMM, with its separate quantizer launch, beats torch._scaled_mm on
# every projection (q/k/v 0.63-0.65x against 0.98-1.03x, o 1.22-1.37x against 1.61-1.79x, gate/up 0.56-0.58x
# against 0.59-0.65x, down 0.98-1.00x against 1.12-1.19x; at 32 tokens they are level), so layers that take
# _scaled_mm hand batches of up to SMALL_BATCH_TOKENS tokens to it. A single token takes the one-launch decode GEMM
# on every projection, tiled per shape (tiles.decode_tiles): with the weights streamed from HBM, as in a decode
# step, it took 12.9 / 12.4 / 45.5 / 31.0 us for q/k/v, o, gate/up and down against the Triton GEMM's (down: the
# untuned decode GEMM's) 17.0 / 15.3 / 54.1 / 35.6 (benchmarks/fp8_decode_probe.py, 2026-11-28). From 4 tokens
# on, each of its programs repeating the tokens' absmax and quantization costs more than the launch it saves.
SMALL_BATCH_TOKENS = 16
DECODE_MAX_TOKENS = 1
# What a layer without the decode GEMM passes for its tiling (never used).
_NO_DECODE_TILES = DecodeTiles(0, 0)


def fp8_gemm_for_tokens(num_tokens: int, gemm_path: str, decode_max_tokens: int, small_batch_tokens: int) -> str:
    """The GEMM a batch of ``num_tokens`` tokens runs on (see SMALL_BATCH_TOKENS)."""
    if num_tokens <= decode_max_tokens:
        return DECODE
    if gemm_path == SCALED_MM and num_tokens <= small_batch_tokens:
        return TRITON
    return gemm_path


def fp8_gemm_path(
    capability: tuple[int, int], grid: ScaleGrid, activation: ActivationScheme, dtype: torch.dtype,
    in_features: int, out_features: int,
) -> str:
    """The GEMM an FP8 linear runs on a CUDA GPU of compute ``capability``.

    ``SCALED_MM`` (``torch._scaled_mm``, row-wise scaling) where it applies: one weight scale per output row
    (per tensor or per channel), one activation scale per token (dynamic, or static per tensor), a bf16 model
    (torch's row-wise FP8 GEMMs write bf16), K and N multiples of 16 (any number of tokens, one included).
    Everything else, block scales and 128-wide activation groups first, takes the Triton GEMM (``TRITON``).
    """
    if capability < _FP8_CAPABILITY:
        raise ValueError(
            f"FP8 weights need a GPU of compute capability {_FP8_CAPABILITY[0]}.{_FP8_CAPABILITY[1]} or newer "
            f"(Ada, Hopper); this one is {capability[0]}.{capability[1]}"
        )
    row_wise = (
        grid.is_per_row
        and activation.group_size is None
        and dtype == torch.bfloat16
        and in_features % 16 == 0
        and out_features % 16 == 0
    )
    return SCALED_MM if row_wise else TRITON


def fp8_decode_applies(grid: ScaleGrid, activation: ActivationScheme, in_features: int) -> bool:
    """Whether small batches of this layer can take the decode GEMM: dynamic per-token activation scales (static
    and 128-wide grouped ones keep their GEMM) and weight scales constant over each of its K steps."""
    return (
        activation.dynamic
        and activation.group_size is None
        and (grid.block_k >= in_features or grid.block_k % DECODE_BLOCK_K == 0)
    )


@dataclass(frozen=True)
class Fp8Format:
    """How a checkpoint stores FP8 linears (or, ``online``, that dense weights are quantized at load).

    ``weight_block`` (block_n, block_k) means block scales; None lets each scale's shape say per tensor or per
    channel. ``scale_leaves`` are the checkpoint's spellings of the weight scale, ``input_scale_leaves`` those of
    a static activation scale (only read when the activation scheme is static).
    """

    activation: ActivationScheme
    weight_block: tuple[int, int] | None = None
    scale_leaves: tuple[str, ...] = ("weight_scale",)
    input_scale_leaves: tuple[str, ...] = ("input_scale",)
    online: bool = False


class Fp8Linear(QuantizedLinear):
    def __init__(self, in_features, output_sizes, prefixes, bias, dtype, device, fmt: Fp8Format):
        super().__init__(in_features, output_sizes, prefixes, bias, dtype, device)
        self.format = fmt
        self.grid: ScaleGrid | None = None
        self.input_scale: torch.Tensor | None = None
        self.gemm_path: str | None = None  # on CUDA: SCALED_MM or TRITON, chosen once the scales are known
        self.decode_max_tokens = 0  # batches up to this size take the DECODE GEMM instead
        self.small_batch_tokens = 0  # batches up to this size take TRITON instead of SCALED_MM
        self.row_scale: torch.Tensor | None = None  # SCALED_MM's weight scales, one per output row
        self.decode_tiles: DecodeTiles | None = None
        self.decode_counters: torch.Tensor | None = None

    def checkpoint_leaves(self) -> dict[str, str]:
        leaves = {"weight": "weight"}
        if self.format.online:
            return leaves
        leaves |= {leaf: "weight_scale" for leaf in self.format.scale_leaves}
        if not self.format.activation.dynamic:
            leaves |= {leaf: "input_scale" for leaf in self.format.input_scale_leaves}
        return leaves

    def build(self, shards: list[dict[str, torch.Tensor]]) -> None:
        for shard, fields in enumerate(shards):
            self._check_shape(shard, "weight", fields["weight"], (self.output_sizes[shard], self.in_features))
        device = self.target_device
        if self.format.online:
            dense = torch.cat([fields["weight"].to(device) for fields in shards])
            # Per channel, so fused shards need nothing special; clipping chosen per channel by squared error.
            weight, grid = quantize_weight(dense, clip_search=True)
        else:
            grids = []
            for shard, fields in enumerate(shards):
                if fields["weight"].dtype != FP8_DTYPE:
                    raise ValueError(
                        f"{self.prefixes[shard]}.weight is {fields['weight'].dtype}, but an FP8 checkpoint stores "
                        f"{FP8_DTYPE} weights (float8_e5m2 and others are not supported)"
                    )
                grids.append(scale_grid_from_checkpoint(
                    fields["weight_scale"], self.output_sizes[shard], self.in_features, self.format.weight_block,
                    where=f"{self.prefixes[shard]}",
                ))
            weight = torch.cat([fields["weight"] for fields in shards]).to(device)
            grid = merge_scale_grids(grids, self.output_sizes, self.in_features)
            if not self.format.activation.dynamic:
                self.input_scale = self._static_input_scale(shards).to(device)
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.grid = ScaleGrid(grid.scale.to(device).contiguous(), grid.block_n, grid.block_k)
        if device.type == "cuda":
            self._prepare_gpu()

    def _static_input_scale(self, shards: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Fused shards see the same input: the largest of their calibrated scales clips none of them."""
        scales = []
        for prefix, fields in zip(self.prefixes, shards):
            scale = fields["input_scale"].to(torch.float32)
            if scale.numel() != 1 or not torch.isfinite(scale).all() or scale.item() <= 0:
                raise ValueError(f"{prefix}.input_scale must be one finite positive number, got {scale.tolist()}")
            scales.append(scale.reshape(()))
        return torch.stack(scales).max()

    def _prepare_gpu(self) -> None:
        self.gemm_path = fp8_gemm_path(
            torch.cuda.get_device_capability(self.target_device), self.grid, self.format.activation, self.dtype,
            self.in_features, self.out_features,
        )
        self.use_gemm(self.gemm_path)

    def use_gemm(self, path: str, decode_max_tokens: int | None = None,
                 small_batch_tokens: int = SMALL_BATCH_TOKENS) -> None:
        """Run the GPU GEMM ``path`` (``fp8_gemm_path``'s choice at load; benchmarks also force ``TRITON``); the
        decode GEMM for batches of up to ``decode_max_tokens`` tokens where it applies (None: the measured
        default, ``DECODE_MAX_TOKENS``; 0: never); and, on a ``SCALED_MM`` layer, the Triton GEMM for
        batches of up to ``small_batch_tokens`` (0: never)."""
        # The kernels' modules register their torch.ops (and import Triton) only where a GPU runs them.
        import tfbackend.quantization.kernels.fp8_linear_op  # noqa: F401
        if path == SCALED_MM:
            self.row_scale = self.grid.row_scales(self.out_features).reshape(1, -1).contiguous()
        self.gemm_path = path
        self.small_batch_tokens = small_batch_tokens
        if decode_max_tokens is None:
            decode_max_tokens = DECODE_MAX_TOKENS
        applies = fp8_decode_applies(self.grid, self.format.activation, self.in_features)
        self.decode_max_tokens = min(decode_max_tokens, DECODE_TOKEN_LIMIT) if applies else 0
        if self.decode_max_tokens:
            from tfbackend.quantization.kernels.fp8_decode_gemm import decode_counters

            device = self.weight.device
            # On CPU (the Triton interpreter, in tests) programs run one by one; 4 "SMs" give split-K work to test.
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
            scale_block_k = self.grid.block_k if self.grid.block_k < self.in_features else None
            self.decode_tiles = decode_tiles(self.out_features, self.in_features, num_sms, scale_block_k)
            self.decode_counters = decode_counters(self.out_features, device)

    def gemm_for_tokens(self, num_tokens: int) -> str:
        """The GEMM a batch of ``num_tokens`` tokens runs on (``fp8_gemm_for_tokens``)."""
        return fp8_gemm_for_tokens(num_tokens, self.gemm_path, self.decode_max_tokens, self.small_batch_tokens)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_activation(x, self.format.activation, self.input_scale)

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.weight, self.grid)

    def apply_reference(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_activation(*self._quantize_input(x), self.format.activation) @ self.reference_weight().T

    def apply_gpu(self, x: torch.Tensor) -> torch.Tensor:
        activation = self.format.activation
        tiles = self.decode_tiles or _NO_DECODE_TILES
        return torch.ops.tfbackend.fp8_linear(
            x, self.weight, self.grid.scale, self.grid.block_n, self.grid.block_k, self.row_scale,
            None if activation.dynamic else self.input_scale, activation.group_size or self.in_features,
            activation.scale_ub, self.gemm_path, self.decode_max_tokens, self.small_batch_tokens,
            self.decode_counters, tiles.block_n, tiles.splits, tiles.block_k, tiles.num_warps, tiles.num_stages,
            tiles.gemv,
        )
