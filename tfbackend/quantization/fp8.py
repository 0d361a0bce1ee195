"""FP8 (E4M3) arithmetic shared by every FP8 path: weight and activation quantization, scale grids, dequantization.

Every weight scale, whatever the checkpoint's strategy, is held as one *scale grid*: a float32 tensor
``[ceil(N / block_n), ceil(K / block_k)]`` whose entry (i, j) scales the weight block of rows
``i * block_n ...`` and columns ``j * block_k ...``. Per-tensor is a 1x1 grid with blocks of (N, K), per-channel
an N x 1 grid with blocks of (1, K), DeepSeek-style blocks a grid of 128x128 blocks. One kernel and one
reference then serve all three, and fused projections (q/k/v) whose shards carry their own scales merge into
a single grid (``merge_scale_grids``) without requantizing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Smallest scale: an all-zero row or block must not divide by zero.
_MIN_SCALE = 1e-12


@dataclass
class ScaleGrid:
    """A weight's dequantization multipliers: ``w[n, k] = q[n, k] * scale[n // block_n, k // block_k]``."""

    scale: torch.Tensor  # float32 [ceil(N / block_n), ceil(K / block_k)]
    block_n: int
    block_k: int

    def expand(self, out_features: int, in_features: int) -> torch.Tensor:
        """The multiplier of every weight element, ``[N, K]`` float32."""
        rows = self.scale.repeat_interleave(self.block_n, dim=0)[:out_features]
        return rows.repeat_interleave(self.block_k, dim=1)[:, :in_features]

    @property
    def is_per_row(self) -> bool:
        """One multiplier per output row (per-tensor or per-channel): what ``torch._scaled_mm`` can apply."""
        return self.scale.shape[1] == 1 and (self.block_n == 1 or self.scale.shape[0] == 1)

    def row_scales(self, out_features: int) -> torch.Tensor:
        """``[N]`` float32 multipliers of a per-row grid."""
        return self.scale[:, 0].repeat_interleave(self.block_n)[:out_features]


def scale_grid_from_checkpoint(
    scale: torch.Tensor, out_features: int, in_features: int, block: tuple[int, int] | None, where: str
) -> ScaleGrid:
    """Interpret a checkpoint's weight scale by its shape: a scalar (per tensor), ``[N]``/``[N, 1]`` (per channel)
    or, when the format has ``block`` = (block_n, block_k), the ``[ceil(N / bn), ceil(K / bk)]`` block grid."""
    scale = scale.detach().to(torch.float32)
    if block is not None:
        block_n, block_k = block
        expected = (-(-out_features // block_n), -(-in_features // block_k))
        if tuple(scale.shape) != expected:
            raise ValueError(
                f"{where}: weight scale has shape {tuple(scale.shape)}, but {block_n}x{block_k} blocks of a "
                f"{out_features}x{in_features} weight need {expected}"
            )
        grid = ScaleGrid(scale.reshape(expected), block_n, block_k)
    elif scale.numel() == 1:
        grid = ScaleGrid(scale.reshape(1, 1), out_features, in_features)
    elif scale.numel() == out_features and scale.dim() <= 2 and scale.shape[0] == out_features:
        grid = ScaleGrid(scale.reshape(out_features, 1), 1, in_features)
    else:
        raise ValueError(
            f"{where}: weight scale has shape {tuple(scale.shape)}; expected a scalar (per tensor) or "
            f"[{out_features}, 1] (per channel) for a {out_features}x{in_features} weight"
        )
    if not torch.isfinite(grid.scale).all() or (grid.scale <= 0).any():
        raise ValueError(f"{where}: weight scales must be finite and positive")
    return grid


def merge_scale_grids(grids: list[ScaleGrid], sizes: list[int], in_features: int) -> ScaleGrid:
    """One grid for shards stacked along the output dim (q/k/v), each with its own scales.

    Shards whose scales are per row or whose sizes are multiples of a shared block height concatenate as
    they are; otherwise (e.g. per-tensor scales, or 128-row blocks over a 192-row shard) every row gets its
    own copy of its block's scales (block_n = 1), which is exact and still one grid.
    """
    if len(grids) == 1:
        return grids[0]
    block_ks = {grid.block_k for grid in grids}
    if len(block_ks) != 1:
        raise ValueError(f"fused shards have different scale block widths {sorted(block_ks)}")
    block_k = block_ks.pop()
    block_ns = {grid.block_n for grid in grids}
    if len(block_ns) == 1 and all(size % grid.block_n == 0 for grid, size in zip(grids, sizes)):
        return ScaleGrid(torch.cat([grid.scale for grid in grids]), grids[0].block_n, block_k)
    rows = [grid.scale.repeat_interleave(grid.block_n, dim=0)[:size] for grid, size in zip(grids, sizes)]
    return ScaleGrid(torch.cat(rows), 1, min(block_k, in_features))


# Clipping ratios tried by ``quantize_weight(clip_search=True)``: 1, 127/128, ... 1/2 of each block's absmax.
CLIP_RATIOS = tuple(1 - i / 128 for i in range(65))


def quantize_weight(
    weight: torch.Tensor, block: tuple[int, int] | None = None, clip_search: bool = False
) -> tuple[torch.Tensor, ScaleGrid]:
    """FP8 weight and its scale grid: per output channel, or per ``block`` = (block_n, block_k) when given.

    Scales map each block's absmax to the top of E4M3's range (448). With ``clip_search`` each block instead
    takes, of the ``CLIP_RATIOS`` of that scale, the one whose rounded block is closest to the original in
    squared error (the "MSE observer" of quantization toolkits): clipping a few outliers lets the bulk of
    the weights fall on a finer part of the FP8 grid, which a model's outputs notice more than the outliers.
    """
    w = weight.detach().to(torch.float32)
    out_features, in_features = w.shape
    block_n, block_k = block if block is not None else (1, in_features)
    grid_n, grid_k = -(-out_features // block_n), -(-in_features // block_k)
    padded = w.new_zeros(grid_n * block_n, grid_k * block_k)
    padded[:out_features, :in_features] = w
    blocks = padded.view(grid_n, block_n, grid_k, block_k)
    absmax_scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)
    scale = absmax_scale
    if clip_search:
        best_error = torch.full_like(scale, float("inf"))
        for ratio in CLIP_RATIOS:
            candidate = absmax_scale * ratio
            expanded = candidate[:, None, :, None]
            rounded = (blocks / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float32) * expanded
            error = (rounded - blocks).square().sum(dim=(1, 3))
            better = error < best_error
            scale = torch.where(better, candidate, scale)
            best_error = torch.where(better, error, best_error)
    grid = ScaleGrid(scale, block_n, block_k)
    quantized = (w / grid.expand(out_features, in_features)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, grid


def dequantize_weight(weight: torch.Tensor, grid: ScaleGrid) -> torch.Tensor:
    """``[N, K]`` float32 weight."""
    return weight.to(torch.float32) * grid.expand(*weight.shape).to(weight.device)


@dataclass(frozen=True)
class ActivationScheme:
    """How a layer's input is quantized to FP8 for the matmul.

    Dynamic schemes compute scales from each call's input: one per token (``group_size`` None) or one per
    token and ``group_size`` consecutive input features (DeepSeek-style, to pair with block-scaled weights).
    A static scheme uses the checkpoint's per-tensor ``input_scale``. ``scale_ub`` caps a token's absmax
    (FBGEMM's ``activation_scale_ub``) so one outlier token cannot flatten the rest of its row.
    """

    dynamic: bool = True
    group_size: int | None = None
    scale_ub: float | None = None


def quantize_activation(
    x: torch.Tensor, scheme: ActivationScheme, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` -> (FP8 ``[M, K]``, float32 scales ``[M, ceil(K / group)]``; one column per token if ungrouped).

    The single implementation both the reference and the GPU kernels use, so they quantize identically.
    """
    num_tokens, in_features = x.shape
    if not scheme.dynamic:
        if static_scale is None:
            raise RuntimeError("a static FP8 activation scheme needs the checkpoint's input_scale")
        scale = static_scale.to(torch.float32).reshape(1, 1).expand(num_tokens, 1)
        quantized = (x.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return quantized, scale.contiguous()
    group = scheme.group_size or in_features
    num_groups = -(-in_features // group)
    xf = x.to(torch.float32)
    if num_groups * group != in_features:
        xf = torch.nn.functional.pad(xf, (0, num_groups * group - in_features))
    grouped = xf.view(num_tokens, num_groups, group)
    amax = grouped.abs().amax(dim=-1)
    if scheme.scale_ub is not None:
        amax = amax.clamp(max=scheme.scale_ub)
    # A tensor divisor: CUDA divides by a Python scalar as a multiplication by its reciprocal, which can differ
    # in the last bit from the correctly rounded quotient the CPU (and the Triton quantizer) compute.
    scale = (amax / amax.new_full((), FP8_MAX)).clamp(min=_MIN_SCALE)
    quantized = (grouped / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized.view(num_tokens, -1)[:, :in_features].contiguous(), scale


def dequantize_activation(quantized: torch.Tensor, scale: torch.Tensor, scheme: ActivationScheme) -> torch.Tensor:
    """Inverse of ``quantize_activation``: ``[M, K]`` float32."""
    group = scheme.group_size or quantized.shape[1]
    return quantized.to(torch.float32) * scale.repeat_interleave(group, dim=1)[:, : quantized.shape[1]]
