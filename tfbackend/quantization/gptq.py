"""GPTQ (Frantar et al., 2022): 4-bit weights whose rounding errors the not-yet-quantized input columns absorb.

Quantizing column k of a linear layer's weight perturbs its outputs by ``error_k * x_k``; given the second
moments ``H = E[x x^T]`` of the layer's inputs on calibration text, updating the remaining columns by
``-error_k * H^-1[k, k:] / H^-1[k, k]`` cancels as much of that as a linear model of the inputs can. Columns go
in order, in blocks of 128 whose updates to later columns are applied at once; each group of 128 input columns
gets its asymmetric grid from its weights as they stand when the group starts. The result is stored like a GPTQ
checkpoint (codes, zero points, scales), so it runs through the same int4 layers and kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tfbackend.quantization.int4 import asymmetric_grid, pack_columns, pack_rows

BLOCK = 128  # columns whose mutual updates are applied column by column; later columns get them per block


def gptq(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damping: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight[N, K]`` and its inputs' ``hessian[K, K]`` -> codes ``[K, N]`` and zero points ``[G, N]`` (uint8)
    and scales ``[G, N]`` (float32), as ``int4.round_to_nearest`` returns them. ``damping`` (a fraction of the
    mean diagonal) keeps H invertible when the calibration text has fewer tokens than K or dead inputs."""
    if group_size % BLOCK and BLOCK % group_size:
        raise ValueError(f"GPTQ here needs groups that divide or are divided by {BLOCK}, got {group_size}")
    w = weight.detach().to(torch.float32).clone()
    out_features, in_features = w.shape
    h = hessian.detach().to(w.device, torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damping * torch.diag(h).mean() * torch.eye(in_features, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H^-1: row k holds the updates that column k's error makes to columns k..K.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    num_groups = -(-in_features // group_size)
    codes = torch.empty(in_features, out_features, dtype=torch.uint8, device=w.device)
    zeros = torch.empty(num_groups, out_features, device=w.device)
    scales = torch.empty(num_groups, out_features, device=w.device)
    for start in range(0, in_features, BLOCK):
        end = min(start + BLOCK, in_features)
        block, block_inv = w[:, start:end].clone(), h_inv[start:end, start:end]
        errors = torch.zeros(out_features, end - start, device=w.device)
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:  # the group's grid, from its weights with every update so far
                group = column // group_size
                current = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, : group_size]
                scales[group], zeros[group] = asymmetric_grid(current.amin(dim=1), current.amax(dim=1))
            s, z = scales[column // group_size], zeros[column // group_size]
            q = torch.clamp(torch.round(block[:, i] / s) + z, 0, 15)
            codes[column] = q.to(torch.uint8)
            error = (block[:, i] - (q - z) * s) / block_inv[i, i]
            block[:, i:] -= error[:, None] * block_inv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return codes, zeros.to(torch.uint8), scales


@torch.no_grad()
def input_second_moments(layers: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` of each named layer's inputs while ``run()`` feeds calibration text through their model."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, inputs: tuple) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
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
    return {name: (sums[name] / counts[name]).to(torch.float32) for name in layers}


def gptq_shards(
    weight: torch.Tensor, hessian: torch.Tensor, sizes: list[int], group_size: int
) -> list[dict[str, torch.Tensor]]:
    """GPTQ of a (fused) weight, as each shard's GPTQ checkpoint tensors (``qweight``, ``qzeros``, ``scales``)."""
    codes, zeros, scales = gptq(weight, hessian, group_size)
    shards, start = [], 0
    for size in sizes:
        columns = slice(start, start + size)
        shards.append({"qweight": pack_rows(codes[:, columns]), "qzeros": pack_columns(zeros[:, columns]),
                       "scales": scales[:, columns]})
        start += size
    return shards
