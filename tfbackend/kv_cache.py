"""The paged KV cache: one allocation, viewed per layer as key and value caches of fixed-size blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one layer's cache entries; the same for every layer of the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    block_size: int

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block costs across all layers (keys and values)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_layer = self.block_size * self.num_kv_heads * (self.head_dim + self.v_head_dim) * elem
        return per_layer * self.num_layers

    @classmethod
    def from_hf_config(cls, hf_config, dtype: torch.dtype, block_size: int) -> KVCacheSpec:
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        return cls(
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            v_head_dim=getattr(text, "v_head_dim", None) or head_dim,
            dtype=dtype,
            block_size=block_size,
        )


def num_blocks_for_budget(spec: KVCacheSpec, budget_bytes: int, max_model_len: int) -> int:
    """How many blocks fit in ``budget_bytes``; raises if not even one max-length sequence fits."""
    num_blocks = budget_bytes // spec.bytes_per_block
    needed = -(-max_model_len // spec.block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV cache budget of {budget_bytes / 2**20:.1f} MiB holds {num_blocks} blocks "
            f"({num_blocks * spec.block_size} tokens), but one sequence of max_model_len={max_model_len} "
            f"needs {needed} blocks ({needed * spec.bytes_per_block / 2**20:.1f} MiB): raise the KV cache "
            f"memory or lower max_model_len"
        )
    return num_blocks


class KVCache:
    """All layers' keys and values in one tensor; ``layers[i]`` is ``(key_cache, value_cache)`` of layer i,
    each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device):
        self.spec = spec
        self.num_blocks = num_blocks
        k_shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        v_shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.v_head_dim)
        k_numel, v_numel = _numel(k_shape), _numel(v_shape)
        self.storage = torch.zeros(spec.num_layers * (k_numel + v_numel), dtype=spec.dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in range(spec.num_layers):
            base = layer * (k_numel + v_numel)
            key = self.storage[base : base + k_numel].view(k_shape)
            value = self.storage[base + k_numel : base + k_numel + v_numel].view(v_shape)
            self.layers.append((key, value))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
