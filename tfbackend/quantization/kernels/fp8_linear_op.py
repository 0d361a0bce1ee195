"""One opaque op per FP8 linear call, which picks the GEMM for the batch's size when it runs.

Picking it in the traced forward (``if num_tokens <= SMALL_BATCH_TOKENS``) made dynamo guard on the token count, so
each range of step sizes compiled a graph of its own: one more full Inductor compile of the model at startup per
range (FP8 models compiled three graphs where bf16 ones compile two). Made inside this op, the choice costs no
guard: the compiled forward serves every step size, and each CUDA graph captures the GEMM of its batch size.
"""

from __future__ import annotations

import torch

from tfbackend.quantization.fp8_linear import DECODE, SCALED_MM, fp8_gemm_for_tokens
from tfbackend.quantization.kernels.fp8_decode_gemm import fp8_decode_gemm_launch
from tfbackend.quantization.kernels.fp8_gemm import fp8_gemm_launch
from tfbackend.quantization.kernels.fp8_quant import quantize_input
from tfbackend.quantization.kernels.fp8_scaled_mm import fp8_scaled_mm_launch


@torch.library.custom_op("tfbackend::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_block_n: int,
    weight_block_k: int,
    row_scale: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    activation_group: int,
    scale_ub: float | None,
    gemm_path: str,
    decode_max_tokens: int,
    small_batch_tokens: int,
    decode_counters: torch.Tensor | None,
    decode_block_n: int,
    decode_splits: int,
    decode_block_k: int,
    decode_warps: int,
    decode_stages: int,
    decode_gemv: bool,
) -> torch.Tensor:
    """``x[M, K] @ weight.T`` for an ``Fp8Linear`` (its fields, flattened): the input quantized per token (or
    token and ``activation_group`` features), or with the static ``input_scale`` when there is one, then the GEMM
    ``fp8_gemm_for_tokens`` picks for M. It calls the kernels' launch functions, not their ops: one trip through
    the dispatcher per linear, which matters in eager (prefill) steps."""
    path = fp8_gemm_for_tokens(x.shape[0], gemm_path, decode_max_tokens, small_batch_tokens)
    if path == DECODE:
        return fp8_decode_gemm_launch(x, weight, weight_scale, weight_block_n, weight_block_k, scale_ub,
                                      decode_counters, decode_block_n, decode_splits, decode_block_k,
                                      decode_warps, decode_stages, decode_gemv)
    if path == SCALED_MM:
        return fp8_scaled_mm_launch(x, weight, row_scale, scale_ub, input_scale)
    x_q, x_scale = quantize_input(x, activation_group, scale_ub, input_scale)
    return fp8_gemm_launch(x_q, x_scale, activation_group, weight, weight_scale, weight_block_n, weight_block_k,
                           x.dtype)


@fp8_linear.register_fake
def _(x, weight, *args):
    return x.new_empty(x.shape[0], weight.shape[0])
