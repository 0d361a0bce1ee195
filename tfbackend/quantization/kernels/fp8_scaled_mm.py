"""FP8 linear through ``torch._scaled_mm`` with row-wise scales (cuBLASLt on Hopper, CUTLASS on Ada).

``_scaled_mm`` multiplies ``a[M, K]`` (row-major) by ``b[K, N]`` (column-major: our ``[N, K]`` weight transposed,
a free view) with ``scale_a[M, 1]`` and ``scale_b[1, N]`` float32 and writes bf16. It needs K and N multiples of
16; any M, 1 included. Quantizing the input (one Triton launch) and the GEMM are one custom op, so
``torch.compile`` sees a single opaque call per linear (nothing to trace or autotune) and CUDA graphs capture it.
"""

from __future__ import annotations

import torch

from tfbackend.quantization.kernels.fp8_quant import quantize_input


def fp8_scaled_mm_launch(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, scale_ub: float | None,
    input_scale: torch.Tensor | None,
) -> torch.Tensor:
    """``x[M, K]`` (bf16) times ``weight[N, K]`` (E4M3) scaled by ``weight_scale[1, N]``: the input quantized per
    token (capped at ``scale_ub``), or with the static ``input_scale`` when given."""
    x_q, x_scale = quantize_input(x, x.shape[1], scale_ub, input_scale)
    return torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=x.dtype)


# As an op (opaque to torch.compile); code already inside an op calls fp8_scaled_mm_launch, skipping the dispatcher.
fp8_scaled_mm = torch.library.custom_op("tfbackend::fp8_scaled_mm", fp8_scaled_mm_launch, mutates_args=())


@fp8_scaled_mm.register_fake
def _(x, weight, weight_scale, scale_ub, input_scale):
    return x.new_empty(x.shape[0], weight.shape[0])
