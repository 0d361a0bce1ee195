"""The forward context: how per-step metadata reaches attention layers without threading it through models.

The runner wraps each model call in ``forward_context(...)``; attention layers (native or the HF bridge)
call ``paged_attention(layer_idx, q, k, v, options)``, which finds the layer's cache and this step's
metadata here. Calling attention outside a context is a bug and raises.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

from tfbackend.attention.backend import AttentionBackend, AttentionMetadata, LayerAttentionOptions
from tfbackend.kv_cache import KVCache


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    kv_cache: KVCache  # per attention call site: its (key_cache, value_cache) and whether it writes them
    backend: AttentionBackend
    # Calls so far of modules that attend more than once per forward pass (each call is its own site).
    call_counts: dict[int, int] = field(default_factory=dict)

    def call_number(self, module: torch.nn.Module, calls_per_forward: int) -> int:
        """Which of its ``calls_per_forward`` calls ``module`` is making now (0-based)."""
        count = self.call_counts.get(id(module), 0)
        self.call_counts[id(module)] = count + 1
        return count % calls_per_forward


# Per thread (and per asyncio task): two engines in one process, each stepped by its own thread, never see
# each other's step.
_current: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("tfbackend_forward", default=None)


@contextlib.contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def get_forward_context() -> ForwardContext:
    current = _current.get()
    if current is None:
        raise RuntimeError(
            "paged attention was called outside a forward context: models must run inside "
            "`with forward_context(...)` (the model runner sets it for every step)"
        )
    return current


def paged_attention(
    layer_idx: int,
    query: torch.Tensor,  # [T, H_q, D_k]
    key: torch.Tensor,  # [T, H_kv, D_k]
    value: torch.Tensor,  # [T, H_kv, D_v]
    options: LayerAttentionOptions,
) -> torch.Tensor:  # [T, H_q, D_v]
    """Store this step's K/V for one attention call site, then attend over each sequence's cached tokens.

    ``layer_idx`` is the call site's index in the model's ``attention_layers()``. A site that shares another's
    KV stores nothing: its ``key`` and ``value`` are the owner's, already in the cache.
    """
    if torch.compiler.is_compiling():  # traced: one opaque op in the graph
        return torch.ops.tfbackend.paged_attention(
            layer_idx, query, key, value, options.scale, options.sliding_window, options.softcap, options.sinks,
            options.chunk_size,
        )
    # Eager: the op's body, without the op's dispatch, whose first call imports dynamo (and with it Triton): a
    # second that an eager CPU engine's first request would otherwise wait for.
    return _attend_in_context(layer_idx, query, key, value, options)


def _attend_in_context(
    layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: LayerAttentionOptions
) -> torch.Tensor:
    ctx = get_forward_context()
    key_cache, value_cache = ctx.kv_cache.layers[layer_idx]
    k_scale, v_scale = ctx.kv_cache.scales[layer_idx]
    if ctx.kv_cache.writes[layer_idx]:
        ctx.backend.write_kv(key, value, key_cache, value_cache, ctx.metadata.slot_mapping, k_scale, v_scale)
    return ctx.backend.attend(query, key_cache, value_cache, ctx.metadata, options, k_scale, v_scale)


# A custom op, so that torch.compile traces a whole model as one graph with attention as an opaque call (it
# reads the forward context and writes the KV cache, which no other op of the graph touches), instead of
# breaking the graph at every layer.
@torch.library.custom_op("tfbackend::paged_attention", mutates_args=())
def _paged_attention_op(
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    sliding_window: Optional[int],
    softcap: Optional[float],
    sinks: Optional[torch.Tensor],
    chunk_size: Optional[int],
) -> torch.Tensor:
    options = LayerAttentionOptions(scale, sliding_window, softcap, sinks, chunk_size)
    return _attend_in_context(layer_idx, query, key, value, options)


@_paged_attention_op.register_fake
def _(layer_idx, query, key, value, scale, sliding_window, softcap, sinks, chunk_size):
    return query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
