"""GEMM over GGUF-quantized weights (Q8_0, Q4_1, Q4_K) in Triton, dequantizing each weight tile in registers.

Weights are in the planar layout of ``tfbackend.quantization.gguf.PlanarGGUF`` (the GGUF blocks' fields split
into aligned arrays, rows = output features), so a tile's codes and scales are plain strided loads:

- Q8_0: ``w = qs[n, k] * d[n, k // 32]`` with int8 ``qs``.
- Q4_1: ``w = q * d[n, k // 32] + m[n, k // 32]``; a 32-element block's 16 bytes hold element i in the low
  nibble of byte i and element i + 16 in the high nibble.
- Q4_K: ``w = q * (d[n, k // 256] * sc[n, k // 32]) - dmin[n, k // 256] * mn[n, k // 32]``; each 64 elements'
  32 bytes hold element i low and i + 32 high.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tfbackend.kernels.grid import grouped_tile
from tfbackend.kernels.launch import launch
from tfbackend.quantization.kernels.tiles import tiles_for

Q8_0: tl.constexpr = tl.constexpr(0)
Q4_1: tl.constexpr = tl.constexpr(1)
Q4_K: tl.constexpr = tl.constexpr(2)
KERNEL_TYPES = {"Q8_0": 0, "Q4_1": 1, "Q4_K": 2}
_GROUP_M = 8


@triton.jit
def _gguf_gemm_kernel(
    x_ptr,
    qs_ptr,
    d_ptr,
    m_ptr,
    sc_ptr,
    mn_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qs,
    stride_d,
    stride_sc,
    stride_om,
    QTYPE: tl.constexpr,
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
    rows = offs_n[None, :].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        k = offs_k[:, None]
        mask = k_mask[:, None] & n_mask[None, :]
        block32 = rows * stride_d + k // 32  # one scale per 32 elements (Q8_0, Q4_1)
        if QTYPE == Q8_0:
            q = tl.load(qs_ptr + rows * stride_qs + k, mask=mask, other=0).to(tl.float32)
            w = q * tl.load(d_ptr + block32, mask=mask, other=0.0).to(tl.float32)
        elif QTYPE == Q4_1:
            byte = tl.load(qs_ptr + rows * stride_qs + (k // 32) * 16 + k % 16, mask=mask, other=0)
            q = ((byte >> ((k % 32) // 16 * 4)) & 0xF).to(tl.float32)
            d = tl.load(d_ptr + block32, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + block32, mask=mask, other=0.0).to(tl.float32)
            w = q * d + m
        else:  # Q4_K
            byte = tl.load(qs_ptr + rows * stride_qs + (k // 64) * 32 + k % 32, mask=mask, other=0)
            q = ((byte >> ((k % 64) // 32 * 4)) & 0xF).to(tl.float32)
            super_block = rows * stride_d + k // 256
            sub_block = rows * stride_sc + k // 32
            d = tl.load(d_ptr + super_block, mask=mask, other=0.0).to(tl.float32)
            dmin = tl.load(m_ptr + super_block, mask=mask, other=0.0).to(tl.float32)
            sc = tl.load(sc_ptr + sub_block, mask=mask, other=0).to(tl.float32)
            mn = tl.load(mn_ptr + sub_block, mask=mask, other=0).to(tl.float32)
            w = q * (d * sc) - dmin * mn
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@torch.library.custom_op("tfbackend::gguf_gemm", mutates_args=())
def gguf_gemm(
    x: torch.Tensor,
    qtype: int,
    qs: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
    sc: torch.Tensor | None,
    mn: torch.Tensor | None,
) -> torch.Tensor:
    """``x[M, K]`` times a planar GGUF weight of ``qtype`` (a ``KERNEL_TYPES`` value): ``[M, N]`` in ``x.dtype``."""
    num_tokens, in_features = x.shape
    out_features = qs.shape[0]
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    tiles = tiles_for(num_tokens, 64)
    grid = (triton.cdiv(num_tokens, tiles.block_m) * triton.cdiv(out_features, tiles.block_n),)
    launch(_gguf_gemm_kernel, grid,
        x,
        qs,
        d,
        m if m is not None else d,
        sc if sc is not None else qs,
        mn if mn is not None else qs,
        out,
        num_tokens,
        out_features,
        in_features,
        x.stride(0),
        qs.stride(0),
        d.stride(0),
        sc.stride(0) if sc is not None else 0,
        out.stride(0),
        QTYPE=qtype,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=_GROUP_M,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out


@gguf_gemm.register_fake
def _(x, qtype, qs, d, m, sc, mn):
    return x.new_empty(x.shape[0], qs.shape[0])
