"""The "tfbackend" attention implementation for Hugging Face models.

Registered in transformers' ``AttentionInterface``, it replaces the model's attention with our paged
attention: HF hands us Q/K/V of the whole flattened step as one batch row (``[1, H, T, D]``, RoPE already
applied); we find the layer by ``module.layer_idx``, store K/V in the paged cache and attend per sequence
using the step metadata of the forward context. Because "tfbackend" is not a registered mask type,
transformers builds no attention mask: causality and sequence boundaries come from our metadata.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from tfbackend.attention import LayerAttentionOptions, paged_attention

ATTN_IMPLEMENTATION = "tfbackend"


def tfbackend_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H_q, T, D_k]
    key: torch.Tensor,  # [1, H_kv, T, D_k]
    value: torch.Tensor,  # [1, H_kv, T, D_v]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; paged attention cannot find its cache")
    if query.shape[0] != 1:
        raise RuntimeError("the tfbackend attention expects the whole step flattened into one batch row")
    options = LayerAttentionOptions(
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window=sliding_window,
        softcap=softcap,
        sinks=s_aux,
    )
    out = paged_attention(
        layer_idx,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        options,
    )
    return out.unsqueeze(0), None  # [1, T, H_q, D_v], as HF's attention functions return


AttentionInterface.register(ATTN_IMPLEMENTATION, tfbackend_attention)
