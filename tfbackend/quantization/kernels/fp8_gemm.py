"""FP8 x FP8 GEMM in Triton for any weight scale grid, with per-token(-group) activation scales.

``c[m, n] = sum_k a[m, k] * a_scale[m, k // a_group] * b[n, k] * b_scale[n // b_block_n, k // b_block_k]``.

When a scale changes along K (128x128 weight blocks, or 128-wide activation groups) each K step's partial
product is scaled before it is accumulated, so the K step must divide those group widths; otherwise the scales
are constant along K and the finished accumulator is scaled once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tfbackend.kernels.grid import grouped_tile
from tfbackend.kernels.launch import launch
from tfbackend.quantization.kernels.tiles import tiles_for

_GROUP_M = 8  # programs sharing weight columns run together, for L2 reuse


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cm,
    a_group_k,
    b_block_n,
    b_block_k,
    PER_STEP_SCALES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    a_scale_rows = a_scale_ptr + offs_m * stride_asm
    b_scale_rows = b_scale_ptr + (offs_n // b_block_n) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        if PER_STEP_SCALES:
            a_s = tl.load(a_scale_rows + k0 // a_group_k, mask=m_mask, other=0.0)
            b_s = tl.load(b_scale_rows + k0 // b_block_k, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if not PER_STEP_SCALES:
        a_s = tl.load(a_scale_rows, mask=m_mask, other=0.0)
        b_s = tl.load(b_scale_rows, mask=n_mask, other=0.0)
        acc = acc * a_s[:, None] * b_s[None, :]

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _k_step(in_features: int, groups: list[int]) -> int:
    """The largest K step (<= 128, >= 16 for tl.dot) dividing every scale group narrower than K."""
    narrow = [group for group in groups if group < in_features]
    for step in (128, 64, 32, 16):
        if all(group % step == 0 for group in narrow):
            return step
    raise ValueError(f"FP8 scale groups {narrow} along K are not multiples of 16")


def fp8_gemm_launch(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    a_group_k: int,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    b_block_n: int,
    b_block_k: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``a[M, K]`` FP8 with ``a_scale[M, ceil(K / a_group_k)]`` times ``b[N, K]`` FP8 with its scale grid."""
    num_tokens, in_features = a.shape
    out_features = b.shape[0]
    out = torch.empty(num_tokens, out_features, dtype=out_dtype, device=a.device)
    if num_tokens == 0:
        return out
    groups = [a_group_k, b_block_k]
    tiles = tiles_for(num_tokens, _k_step(in_features, groups))
    grid = (triton.cdiv(num_tokens, tiles.block_m) * triton.cdiv(out_features, tiles.block_n),)
    launch(_fp8_gemm_kernel, grid,
        a,
        a_scale,
        b,
        b_scale,
        out,
        num_tokens,
        out_features,
        in_features,
        a.stride(0),
        a_scale.stride(0),
        b.stride(0),
        b_scale.stride(0),
        out.stride(0),
        a_group_k,
        b_block_n,
        b_block_k,
        PER_STEP_SCALES=any(group < in_features for group in groups),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=_GROUP_M,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out


# As an op (opaque to torch.compile); code already inside an op calls fp8_gemm_launch, skipping the dispatcher.
fp8_gemm = torch.library.custom_op("tfbackend::fp8_gemm", fp8_gemm_launch, mutates_args=())


@fp8_gemm.register_fake
def _(a, a_scale, a_group_k, b, b_scale, b_block_n, b_block_k, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)
