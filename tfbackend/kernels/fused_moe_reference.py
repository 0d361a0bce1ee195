"""The experts of a mixture-of-experts layer in plain torch: the CPU path and the reference for the Triton kernel.

Pairs (token, k) are grouped by expert and each expert runs two matmuls over its pairs, as the kernel does; the
loop over experts reads the per-expert counts on the host, which is free on CPU (and why CUDA uses the kernel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tfbackend.kernels.moe import GatedActivation


def gated_activation(gate_up: torch.Tensor, activation: GatedActivation) -> torch.Tensor:
    """``[..., 2I] -> [..., I]``: split gate and up as the layout says and combine them."""
    if activation.interleaved:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if activation.limit != math.inf:
        gate = gate.clamp(max=activation.limit)
        up = up.clamp(min=-activation.limit, max=activation.limit)
    kind = activation.kind
    if kind == "gpt_oss_swiglu":
        return (up + 1) * gate * torch.sigmoid(gate * activation.alpha)
    if kind == "silu":
        return F.silu(gate) * up
    if kind == "gelu":
        return F.gelu(gate) * up
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.relu(gate) * up


def fused_experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: GatedActivation,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """As ``moe.fused_experts``. Each pair's output is rounded to hidden's dtype before the sum over k."""
    num_tokens, top_k = topk_ids.shape
    num_experts = gate_up.shape[0]
    expert_of_pair = topk_ids.reshape(-1)
    pairs_by_expert = torch.argsort(expert_of_pair, stable=True)
    counts = torch.bincount(expert_of_pair, minlength=num_experts).tolist()
    weight_of_pair = topk_weights.reshape(-1)
    out = hidden.new_zeros(num_tokens * top_k, hidden.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = pairs_by_expert[start : start + count]
        start += count
        x = F.linear(hidden[pairs // top_k], gate_up[expert], None if gate_up_bias is None else gate_up_bias[expert])
        x = gated_activation(x, activation)
        x = F.linear(x, down[expert], None if down_bias is None else down_bias[expert])
        out[pairs] = (x * weight_of_pair[pairs, None]).to(out.dtype)
    return out.view(num_tokens, top_k, -1).sum(dim=1)
