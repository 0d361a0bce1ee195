"""Paged attention: backends, the per-step forward context, and the one entry point models call."""

from tfbackend.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    LayerAttentionOptions,
    metadata_for_chunks,
)
from tfbackend.attention.context import (
    ForwardContext,
    forward_context,
    get_forward_context,
    paged_attention,
)
from tfbackend.attention.selector import get_attention_backend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "ForwardContext",
    "LayerAttentionOptions",
    "forward_context",
    "get_attention_backend",
    "get_forward_context",
    "metadata_for_chunks",
    "paged_attention",
]
