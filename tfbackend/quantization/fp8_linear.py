"""FP8 (E4M3) linear layers: checkpoint FP8 weights with their scales, or bf16/fp32 weights quantized at load.

The input is quantized to FP8 on every call (per token, per token and 128-wide group, or with the checkpoint's
static scale) and multiplied in FP8: through ``torch._scaled_mm`` when both sides' scales are one per row (per
token x per channel, bf16 output, dimensions multiples of 16), else through the Triton GEMM of
``kernels/fp8_gemm.py``, which takes any scale grid. The CPU reference quantizes the input the same way and
multiplies the dequantized operands in float32.
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
from tfbackend.quantization.linear import QuantizedLinear

# Compute capability from which GPUs multiply FP8 natively (Ada, Hopper and later).
_FP8_CAPABILITY = (8, 9)


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
        self.use_scaled_mm = False

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
        if torch.cuda.get_device_capability(self.target_device) < _FP8_CAPABILITY:
            raise ValueError(
                f"FP8 weights need a GPU of compute capability {_FP8_CAPABILITY[0]}.{_FP8_CAPABILITY[1]} or newer "
                f"(Ada, Hopper); this one is {torch.cuda.get_device_capability(self.target_device)}"
            )
        activation = self.format.activation
        self.use_scaled_mm = (
            self.grid.is_per_row
            and activation.group_size is None
            and self.dtype == torch.bfloat16  # torch's row-wise scaled GEMM writes bf16 only
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
        )
        if self.use_scaled_mm:
            self.row_scale = self.grid.row_scales(self.out_features).reshape(1, -1).contiguous()
        else:
            import tfbackend.quantization.kernels.fp8_gemm  # noqa: F401  (registers torch.ops.tfbackend.fp8_gemm)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_activation(x, self.format.activation, self.input_scale)

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.weight, self.grid)

    def apply_reference(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_activation(*self._quantize_input(x), self.format.activation) @ self.reference_weight().T

    def apply_gpu(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = self._quantize_input(x)
        if self.use_scaled_mm:
            return torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale, scale_b=self.row_scale, out_dtype=x.dtype)
        group = self.format.activation.group_size or self.in_features
        return torch.ops.tfbackend.fp8_gemm(
            x_q, x_scale, group, self.weight, self.grid.scale, self.grid.block_n, self.grid.block_k, x.dtype
        )
