"""The forward context: how per-step metadata reaches attention layers without threading it through models.

The runner wraps each model call in ``forward_context(...)``; attention layers (native or the HF bridge)
call ``paged_attention(layer_idx, q, k, v, options)``, which finds the layer's cache and this step's
metadata here. Calling attention outside a context is a bug and raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tfbackend.attention.backend import AttentionBackend, AttentionMetadata, LayerAttentionOptions


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key_cache, value_cache)
    backend: AttentionBackend


_current: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    previous, _current = _current, context
    try:
        yield context
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError(
            "paged attention was called outside a forward context: models must run inside "
            "`with forward_context(...)` (the model runner sets it for every step)"
        )
    return _current


def paged_attention(
    layer_idx: int,
    query: torch.Tensor,  # [T, H_q, D_k]
    key: torch.Tensor,  # [T, H_kv, D_k]
    value: torch.Tensor,  # [T, H_kv, D_v]
    options: LayerAttentionOptions,
) -> torch.Tensor:  # [T, H_q, D_v]
    """Store this step's K/V for one layer, then attend over each sequence's cached tokens."""
    ctx = get_forward_context()
    key_cache, value_cache = ctx.kv_caches[layer_idx]
    ctx.backend.write_kv(key, value, key_cache, value_cache, ctx.metadata.slot_mapping)
    return ctx.backend.attend(query, key_cache, value_cache, ctx.metadata, options)
