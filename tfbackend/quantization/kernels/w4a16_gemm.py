"""W4A16 GEMM in Triton: 16-bit activations times 4-bit weights, dequantized tile by tile in registers.

The weight is in the canonical layout ``tfbackend.quantization.int4`` converts AWQ and GPTQ checkpoints to:
``qweight[K // 8, N]`` int32 holding input rows ``8j ... 8j + 7`` of column n in bits ``0-3 ... 28-31``,
``scales[G, N]`` float32 and ``zeros[G, N]`` uint8, with ``w[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n]``
for ``g = g_idx[k]`` (GPTQ act-order) or ``k // group_size``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tfbackend.kernels.grid import grouped_tile
from tfbackend.kernels.launch import launch
from tfbackend.quantization.kernels.tiles import tiles_for

_GROUP_M = 8


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    out_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    HAS_G_IDX: tl.constexpr,
    ONE_GROUP_PER_STEP: tl.constexpr,  # BLOCK_K divides group_size: one scale row per K step
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        # Each int32 word holds 8 consecutive input rows: load it once per row and shift that row's nibble out.
        packed = tl.load(
            qweight_ptr + (offs_k[:, None] // 8).to(tl.int64) * stride_qk + offs_n[None, :],
            mask=k_mask[:, None] & n_mask[None, :],
            other=0,
        )
        q = (packed >> ((offs_k[:, None] % 8) * 4)) & 0xF
        if HAS_G_IDX:
            groups = tl.load(g_idx_ptr + offs_k, mask=k_mask, other=0)
            scale = tl.load(scales_ptr + groups[:, None] * stride_sg + offs_n[None, :], mask=n_mask[None, :], other=0.0)
            zero = tl.load(zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :], mask=n_mask[None, :], other=0)
        elif ONE_GROUP_PER_STEP:
            group = k0 // group_size
            scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0)[None, :]
            zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=n_mask, other=0)[None, :]
        else:
            groups = offs_k // group_size
            scale = tl.load(scales_ptr + groups[:, None] * stride_sg + offs_n[None, :], mask=n_mask[None, :], other=0.0)
            zero = tl.load(zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :], mask=n_mask[None, :], other=0)
        w = (q - zero.to(tl.int32)).to(tl.float32) * scale
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@torch.library.custom_op("tfbackend::w4a16_gemm", mutates_args=())
def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``x[M, K]`` (16- or 32-bit float) times the canonical int4 weight: ``[M, N]`` in ``x.dtype``."""
    num_tokens, in_features = x.shape
    out_features = qweight.shape[1]
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block_k = 64 if group_size % 64 == 0 else 32
    tiles = tiles_for(num_tokens, block_k)
    grid = (triton.cdiv(num_tokens, tiles.block_m) * triton.cdiv(out_features, tiles.block_n),)
    launch(_w4a16_gemm_kernel, grid,
        x,
        qweight,
        scales,
        zeros,
        g_idx if g_idx is not None else zeros,
        out,
        num_tokens,
        out_features,
        in_features,
        group_size,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
        zeros.stride(0),
        out.stride(0),
        HAS_G_IDX=g_idx is not None,
        ONE_GROUP_PER_STEP=group_size % tiles.block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=_GROUP_M,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out


@w4a16_gemm.register_fake
def _(x, qweight, scales, zeros, g_idx, group_size):
    return x.new_empty(x.shape[0], qweight.shape[1])
