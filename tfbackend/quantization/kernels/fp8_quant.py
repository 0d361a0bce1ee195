"""Dynamic FP8 quantization of activations in one Triton launch: per token, or per token and group of features.

``fp8.quantize_activation`` is the definition (and the CPU path); as torch operations it is half a dozen kernel
launches, which at decode sizes cost more than the FP8 GEMM saves. This kernel does the same arithmetic (scale =
max(min(absmax, scale_ub) / 448, 1e-12); code = clamp(x / scale, +-448) rounded to E4M3, divisions rounded
correctly as torch's are) with one program per (token, group), as an opaque custom op that CUDA graphs capture
and ``torch.compile`` does not retrace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tfbackend.kernels.launch import launch
from tfbackend.quantization.fp8 import _MIN_SCALE, FP8_DTYPE, FP8_MAX, ActivationScheme, quantize_activation

_STATIC = ActivationScheme(dynamic=False)


@triton.jit
def _quantize_tokens_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, stride_sm, group, scale_ub,
    HAS_UB: tl.constexpr, FP8_MAX_VALUE: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    index = tl.program_id(1)
    offs = index * group + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < group) & (offs < K)
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    if HAS_UB:
        amax = tl.minimum(amax, scale_ub)
    scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX_VALUE), MIN_SCALE)
    codes = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX_VALUE, FP8_MAX_VALUE)
    tl.store(q_ptr + row * stride_qm + offs, codes.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * stride_sm + index, scale)


def fp8_quantize_tokens_launch(
    x: torch.Tensor, group_size: int, scale_ub: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` -> (E4M3 ``[M, K]``, float32 scales ``[M, ceil(K / group_size)]``), as
    ``fp8.quantize_activation`` with a dynamic scheme computes them."""
    x = x if x.stride(1) == 1 else x.contiguous()
    num_tokens, in_features = x.shape
    num_groups = triton.cdiv(in_features, group_size)
    codes = torch.empty(num_tokens, in_features, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(num_tokens, num_groups, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return codes, scales
    block = triton.next_power_of_2(group_size)
    launch(_quantize_tokens_kernel, (num_tokens, num_groups),
        x, codes, scales, in_features, x.stride(0), codes.stride(0), scales.stride(0), group_size,
        scale_ub if scale_ub is not None else 0.0,
        HAS_UB=scale_ub is not None, FP8_MAX_VALUE=FP8_MAX, MIN_SCALE=_MIN_SCALE, BLOCK=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return codes, scales


# As an op (opaque to torch.compile); code already inside an op calls the launch function, skipping the dispatcher.
fp8_quantize_tokens = torch.library.custom_op(
    "tfbackend::fp8_quantize_tokens", fp8_quantize_tokens_launch, mutates_args=()
)


@fp8_quantize_tokens.register_fake
def _(x, group_size, scale_ub):
    num_groups = -(-x.shape[1] // group_size)
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty(x.shape[0], num_groups, dtype=torch.float32)


def quantize_input(
    x: torch.Tensor, group_size: int, scale_ub: float | None, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's input as FP8 codes and float32 scales: per token (and ``group_size`` features) in one launch,
    or with the checkpoint's static per-tensor ``input_scale`` when there is one."""
    if input_scale is None:
        return fp8_quantize_tokens_launch(x, group_size, scale_ub)
    return quantize_activation(x, _STATIC, input_scale)
