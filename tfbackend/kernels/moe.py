"""The experts of a mixture-of-experts layer as one call: ``fused_experts(hidden, topk_ids, topk_weights, ...)``.

Each token goes through its ``K`` routed experts, and the experts' outputs are summed with the routing weights:

    out[t] = sum_k topk_weights[t, k] * down[e] @ act(gate_up[e] @ hidden[t]),  e = topk_ids[t, k]

where ``act`` turns the first projection's ``2I`` outputs into ``I`` (``GatedActivation``). Weights are
stacked per expert in the (out, in) orientation of ``nn.Linear``: ``gate_up[E, 2I, H]``, ``down[E, H, I]``;
transposed views of checkpoints stored (in, out) are fine, the kernels follow strides.

On CUDA this runs the Triton grouped GEMM of ``fused_moe.py`` (no host sync, shapes fixed by the inputs' shapes,
so it can be captured in CUDA graphs); elsewhere the torch reference of ``fused_moe_reference.py``. It is one
custom op, so ``torch.compile`` keeps it as a single opaque call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "gpt_oss_swiglu")


@dataclass(frozen=True)
class GatedActivation:
    """How the first projection's ``2I`` outputs become the ``I`` inputs of the down projection.

    ``kind`` is ``act`` in ``act(gate) * up`` (``silu``, ``gelu`` (erf), ``gelu_tanh``, ``relu``), or
    ``gpt_oss_swiglu``: ``(up + 1) * gate * sigmoid(alpha * gate)``. A finite ``limit`` first clamps
    ``gate <= limit`` and ``-limit <= up <= limit`` (gpt-oss, DeepSeek-V4). ``interleaved``: the outputs
    alternate gate, up, gate, up... instead of all gates then all ups.
    """

    kind: str = "silu"
    interleaved: bool = False
    alpha: float = 1.0
    limit: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"unknown gated activation {self.kind!r}; expected one of {', '.join(ACTIVATIONS)}")


def fused_experts(
    hidden: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, K] integer expert ids, distinct per token
    topk_weights: torch.Tensor,  # [T, K] routing weights
    gate_up: torch.Tensor,  # [E, 2I, H]
    down: torch.Tensor,  # [E, H, I]
    activation: GatedActivation = GatedActivation(),
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, H]
) -> torch.Tensor:  # [T, H], in hidden's dtype
    """The routed experts' weighted sum for every token (see the module docstring)."""
    num_experts, two_inter, hidden_size = gate_up.shape
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise ValueError(f"hidden must be [T, {hidden_size}], got {tuple(hidden.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be [T, K] "
            f"with T = {hidden.shape[0]}"
        )
    if two_inter % 2 or tuple(down.shape) != (num_experts, hidden_size, two_inter // 2):
        raise ValueError(
            f"gate_up {tuple(gate_up.shape)} must be [E, 2I, H] and down {tuple(down.shape)} [E, H, I]"
        )
    return torch.ops.tfbackend.fused_experts(
        hidden,
        topk_ids,
        topk_weights,
        gate_up,
        down,
        gate_up_bias,
        down_bias,
        activation.kind,
        activation.interleaved,
        activation.alpha,
        activation.limit,
    )


def _use_triton(device: torch.device) -> bool:
    """The Triton kernels on CUDA, the torch reference elsewhere (tests run the kernels through the interpreter)."""
    return device.type == "cuda"


@torch.library.custom_op("tfbackend::fused_experts", mutates_args=())
def _fused_experts_op(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: Optional[torch.Tensor],
    down_bias: Optional[torch.Tensor],
    kind: str,
    interleaved: bool,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    activation = GatedActivation(kind, interleaved, alpha, limit)
    if _use_triton(hidden.device):
        from tfbackend.kernels.fused_moe import fused_experts_triton  # triton is only needed here

        implementation = fused_experts_triton
    else:
        from tfbackend.kernels.fused_moe_reference import fused_experts_reference

        implementation = fused_experts_reference
    return implementation(hidden, topk_ids, topk_weights, gate_up, down, activation, gate_up_bias, down_bias)


@_fused_experts_op.register_fake
def _(hidden, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, kind, interleaved, alpha, limit):
    return torch.empty_like(hidden)
