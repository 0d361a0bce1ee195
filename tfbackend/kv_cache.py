"""The paged KV cache: one allocation, viewed per attention call site as key and value caches of blocks.

Its layout comes from what the model declares (``CausalLM.attention_layers()``), never from config guesses:
each call site has its own number of KV heads and its own key and value widths, and a site that shares
another's KV gets that site's views instead of memory of its own. All sites use the same block ids, so one
block table per sequence addresses every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tfbackend.model_interface import AttentionLayerSpec

# Each view starts at a multiple of this many elements, so kernels may assume aligned base pointers.
_VIEW_ALIGNMENT = 64


@dataclass(frozen=True)
class KVCacheSpec:
    """The cache layout of a model: its attention call sites, the cache dtype and the block size."""

    layers: tuple[AttentionLayerSpec, ...]
    dtype: torch.dtype
    block_size: int

    def __post_init__(self) -> None:
        for index, layer in enumerate(self.layers):
            owner = layer.shares_kv_with
            if owner is not None and not (0 <= owner < index and self.layers[owner].owns_cache):
                raise ValueError(f"attention layer {index} shares the KV of {owner}, which is not an earlier owner")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block costs across all layers that own a cache (keys and values)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_token = sum(
            layer.num_kv_heads * (layer.head_dim + layer.v_head_dim) for layer in self.layers if layer.owns_cache
        )
        return self.block_size * per_token * elem


def num_blocks_for_budget(spec: KVCacheSpec, budget_bytes: int, max_model_len: int) -> int:
    """How many blocks fit in ``budget_bytes``; raises if not even one max-length sequence fits."""
    if spec.bytes_per_block == 0:
        raise ValueError("the model declares no attention layer that keeps KV; it has no use for a paged KV cache")
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
    """All call sites' keys and values in one tensor.

    ``layers[i]`` is ``(key_cache, value_cache)`` of call site i, shaped ``[num_blocks, block_size,
    num_kv_heads, head_dim]`` and ``[..., v_head_dim]``; a site that shares KV holds its owner's tensors.
    ``writes[i]`` says whether site i stores its step's keys and values (owners do, sharers do not).
    ``scales[i]`` is site i's ``(k_scale, v_scale)``: entries are stored as ``x / scale`` (1.0 unless an FP8
    cache got the checkpoint's scales; a sharer reads with its owner's).
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device):
        self.spec = spec
        self.num_blocks = num_blocks
        shapes = []
        offset = 0
        for layer in spec.layers:
            if not layer.owns_cache:
                continue
            k_shape = (num_blocks, spec.block_size, layer.num_kv_heads, layer.head_dim)
            v_shape = (num_blocks, spec.block_size, layer.num_kv_heads, layer.v_head_dim)
            k_offset = offset
            v_offset = _aligned(k_offset + _numel(k_shape))
            offset = _aligned(v_offset + _numel(v_shape))
            shapes.append((k_offset, k_shape, v_offset, v_shape))
        self.storage = _zeros(offset, spec.dtype, torch.device(device))
        owned = iter(shapes)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in spec.layers:
            if layer.owns_cache:
                k_offset, k_shape, v_offset, v_shape = next(owned)
                key = self.storage[k_offset : k_offset + _numel(k_shape)].view(k_shape)
                value = self.storage[v_offset : v_offset + _numel(v_shape)].view(v_shape)
                self.layers.append((key, value))
            else:
                self.layers.append(self.layers[layer.shares_kv_with])
        self.writes = [layer.owns_cache for layer in spec.layers]
        self.scales: list[tuple[float, float]] = [(1.0, 1.0)] * spec.num_layers

    def set_scales(self, scales: list[tuple[float, float]]) -> None:
        """Per call site ``(k_scale, v_scale)``; a site that shares KV takes its owner's."""
        if len(scales) != self.spec.num_layers:
            raise ValueError(f"{len(scales)} KV scales for {self.spec.num_layers} attention call sites")
        self.scales = [
            scales[i if layer.owns_cache else layer.shares_kv_with] for i, layer in enumerate(self.spec.layers)
        ]


def _aligned(offset: int) -> int:
    return -(-offset // _VIEW_ALIGNMENT) * _VIEW_ALIGNMENT


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU through calloc (numpy's zeros), whose pages the OS maps zeroed when first
    touched: the default 1 GiB cache then costs nothing at startup instead of a second of memset."""
    if device.type != "cpu" or numel == 0:  # (numpy's empty array has no stride to view another dtype through)
        return torch.zeros(numel, dtype=dtype, device=device)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype)
