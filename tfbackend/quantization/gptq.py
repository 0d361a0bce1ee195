"""GPTQ (Frantar et al., 2022): weights rounded column by column, the not-yet-rounded columns absorbing each error.

Rounding column k of a linear layer's weight perturbs its outputs by ``error_k * x_k``; given the second
moments ``H = E[x x^T]`` of the layer's inputs on calibration text, updating the remaining columns by
``-error_k * H^-1[k, k:] / H^-1[k, k]`` cancels as much of that as a linear model of the inputs can. Columns go
in order (or, with ``act_order``, largest ``H[k, k]`` first), in blocks of 128 whose updates to later columns are
applied at once.

The algorithm does not care what grid a column is rounded to, so the grid is a ``Rounding``: 4-bit integers with
zero points per group of input columns (``Int4Rounding``: GPTQ's own format) or E4M3 with one scale per output
channel (``Fp8Rounding``: what llm-compressor's GPTQ does for FP8 schemes). Each result is stored as the
format's checkpoint tensors (GPTQ's ``qweight``/``qzeros``/``scales``/``g_idx``, or an FP8 checkpoint's
``weight``/``weight_scale``), so it loads through the same layers and kernels as a checkpoint from the Hub.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from tfbackend.quantization.fp8 import FP8_DTYPE, FP8_MAX, quantize_weight
from tfbackend.quantization.int4 import pack_columns, pack_rows, round_to_nearest

BLOCK = 128  # columns whose mutual updates are applied column by column; later columns get them per block
DAMPING = 0.01  # of H's mean diagonal: keeps H invertible with fewer calibration tokens than inputs, dead inputs


class Rounding(ABC):
    """A format's rounding grid as GPTQ drives it: each group of ``group_size`` consecutive columns (in the
    order GPTQ rounds them) gets its grid from its weights as they stand when its first column comes up."""

    def __init__(self, out_features: int, in_features: int, group_size: int, device: torch.device):
        self.group_size = group_size
        self.codes = torch.empty(out_features, in_features, device=device)  # filled by round_column

    @abstractmethod
    def begin_group(self, group: int, weights: torch.Tensor) -> None:
        """Choose group ``group``'s grid from its current weights ``[N, group_size]`` (fewer for a last group)."""

    @abstractmethod
    def round_column(self, column: int, values: torch.Tensor) -> torch.Tensor:
        """Round ``values[N]`` of ``column`` (its position in rounding order) on its group's grid, keep the codes,
        return the dequantized values."""


class Int4Rounding(Rounding):
    """Asymmetric 4 bits with integer zero points per group, as GPTQ and AWQ checkpoints store them; each group's
    clipping searched by squared error (GPTQ's ``mse`` option)."""

    def __init__(self, out_features: int, in_features: int, group_size: int, device: torch.device):
        super().__init__(out_features, in_features, group_size, device)
        num_groups = -(-in_features // group_size)
        self.zeros = torch.empty(num_groups, out_features, device=device)
        self.scales = torch.empty(num_groups, out_features, device=device)

    def begin_group(self, group: int, weights: torch.Tensor) -> None:
        _, zeros, scales = round_to_nearest(weights, weights.shape[1], clip_search=True)
        self.zeros[group], self.scales[group] = zeros[0].float(), scales[0]

    def round_column(self, column: int, values: torch.Tensor) -> torch.Tensor:
        group = column // self.group_size
        scale, zero = self.scales[group], self.zeros[group]
        codes = torch.clamp(torch.round(values / scale) + zero, 0, 15)
        self.codes[:, column] = codes
        return (codes - zero) * scale


class Fp8Rounding(Rounding):
    """E4M3 with one scale per output channel, clipping searched by squared error on the weight before GPTQ
    changes it (as ``--quantization fp8`` chooses it); one group spans every column."""

    def __init__(self, out_features: int, in_features: int, device: torch.device):
        super().__init__(out_features, in_features, in_features, device)
        self.scale = torch.empty(out_features, 1, device=device)

    def begin_group(self, group: int, weights: torch.Tensor) -> None:
        self.scale = quantize_weight(weights, clip_search=True)[1].scale

    def round_column(self, column: int, values: torch.Tensor) -> torch.Tensor:
        rounded = (values / self.scale[:, 0]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float32)
        self.codes[:, column] = rounded
        return rounded * self.scale[:, 0]


def gptq(
    weight: torch.Tensor, hessian: torch.Tensor, rounding: Rounding, damping: float = DAMPING,
    act_order: bool = False,
) -> torch.Tensor:
    """Round ``weight[N, K]`` onto ``rounding``'s grid given its inputs' ``hessian[K, K]``; the codes are left in
    ``rounding`` (in rounding order). Returns the rounding order of the columns (``arange(K)`` unless
    ``act_order``): column ``order[j]`` of the weight is column ``j`` of the codes."""
    if rounding.group_size < rounding.codes.shape[1] and rounding.group_size % BLOCK and BLOCK % rounding.group_size:
        raise ValueError(f"GPTQ here needs groups that divide or are divided by {BLOCK}, got {rounding.group_size}")
    w = weight.detach().to(torch.float32).clone()
    out_features, in_features = w.shape
    h = hessian.detach().to(w.device, torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features, device=h.device)
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diag(h).mean() * torch.eye(in_features, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H^-1: row k holds the updates that column k's error makes to columns k..K.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    group_size = rounding.group_size
    for start in range(0, in_features, BLOCK):
        end = min(start + BLOCK, in_features)
        block, block_inv = w[:, start:end].clone(), h_inv[start:end, start:end]
        errors = torch.zeros(out_features, end - start, device=w.device)
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:  # the group's grid, from its weights with every update so far
                current = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :group_size]
                rounding.begin_group(column // group_size, current)
            error = (block[:, i] - rounding.round_column(column, block[:, i])) / block_inv[i, i]
            block[:, i:] -= error[:, None] * block_inv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return order


def _codes_in_weight_order(rounding: Rounding, order: torch.Tensor) -> torch.Tensor:
    """``rounding``'s codes (in rounding order) back in the weight's column order, on the CPU, where checkpoint
    tensors arrive."""
    codes = torch.empty_like(rounding.codes, device="cpu")
    codes[:, order] = rounding.codes.cpu()
    return codes


def gptq_int4_shards(
    weight: torch.Tensor, hessian: torch.Tensor, sizes: list[int], group_size: int, act_order: bool = False
) -> list[dict[str, torch.Tensor]]:
    """GPTQ to 4 bits of a (fused) weight, as each shard's GPTQ checkpoint tensors (``qweight``, ``qzeros``,
    ``scales``, ``g_idx``; the zero points stored as they are, as ``checkpoint_format: gptq_v2`` does)."""
    rounding = Int4Rounding(*weight.shape, group_size, weight.device)
    order = gptq(weight, hessian, rounding, act_order=act_order).cpu()
    codes = _codes_in_weight_order(rounding, order)
    g_idx = torch.empty(weight.shape[1], dtype=torch.int32)
    g_idx[order] = torch.arange(weight.shape[1], dtype=torch.int32) // group_size
    zeros, scales = rounding.zeros.to(torch.uint8).cpu(), rounding.scales.cpu()
    shards, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        shards.append({"qweight": pack_rows(codes[rows].T.to(torch.uint8)), "qzeros": pack_columns(zeros[:, rows]),
                       "scales": scales[:, rows], "g_idx": g_idx})
        start += size
    return shards


def gptq_fp8_shards(
    weight: torch.Tensor, hessian: torch.Tensor, sizes: list[int], act_order: bool = False
) -> list[dict[str, torch.Tensor]]:
    """GPTQ to E4M3 per output channel of a (fused) weight, as each shard's FP8 checkpoint tensors (``weight``,
    ``weight_scale`` ``[n, 1]``: compressed-tensors' channel strategy)."""
    rounding = Fp8Rounding(*weight.shape, weight.device)
    order = gptq(weight, hessian, rounding, act_order=act_order).cpu()
    codes = _codes_in_weight_order(rounding, order).to(FP8_DTYPE)
    return [{"weight": rows, "weight_scale": scale}
            for rows, scale in zip(codes.split(sizes), rounding.scale.cpu().split(sizes))]


@torch.no_grad()
def input_second_moments(layers: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` of each named layer's inputs while ``run()`` feeds calibration text through their model."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, inputs: tuple) -> None:
        # float32, as GPTQ's reference code accumulates (float64 matmuls run at half the rate or less)
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float32)
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    hooks = [layer.register_forward_pre_hook(lambda _, inputs, name=name: record(name, inputs))
             for name, layer in layers.items()]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    missing = sorted(set(layers) - set(sums))
    if missing:
        raise ValueError(f"the calibration run never reached {missing}")
    return {name: sums[name] / counts[name] for name in layers}


def decoder_block(name: str) -> str:
    """The repeated block a layer belongs to: its module name up to the first numeric part
    (``model.layers.3.mlp.down_proj`` -> ``model.layers.3``); a layer outside any block is its own."""
    match = re.match(r"(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name


class _BlockDone(Exception):
    """Raised once the block being calibrated has run: the rest of the model has nothing to tell it."""


class Calibration:
    """The second moments GPTQ needs. ``sequential`` (GPTQ's reference order): block by block, each block's layers
    seeing the outputs of the blocks before it *as already quantized*, so a block's rounding can absorb what the
    earlier blocks' rounding changed; one model pass per block. Else all layers from one pass of the unquantized
    model. ``hessian(name)`` runs ``run()`` (the model over the calibration text *in one forward*: each pass stops
    once the last block it needs has run) the first time a layer of a new block is asked for; ask in model order,
    quantizing each block before the next."""

    def __init__(self, model: nn.Module, names: list[str], run: Callable[[], object], sequential: bool = True):
        self.model, self.names, self.run, self.sequential = model, names, run, sequential
        self._group: str | None = None
        self._hessians: dict[str, torch.Tensor] = {}

    def _group_of(self, name: str) -> str:
        return decoder_block(name) if self.sequential else ""

    def hessian(self, name: str) -> torch.Tensor:
        group = self._group_of(name)
        if group != self._group:
            members = [other for other in self.names if self._group_of(other) == group]
            layers = {other: self.model.get_submodule(other) for other in members}
            self._hessians = input_second_moments(layers, lambda: self._run_through(decoder_block(members[-1])))
            self._group = group
        return self._hessians[name]

    def _run_through(self, block: str) -> None:
        def stop(*_) -> None:
            raise _BlockDone

        hook = self.model.get_submodule(block).register_forward_hook(stop)
        try:
            self.run()
        except _BlockDone:
            pass
        finally:
            hook.remove()
