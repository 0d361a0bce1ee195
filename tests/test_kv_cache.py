"""The KV cache is laid out from what the model declares: per-site heads and widths, K != V, shared sites."""

from __future__ import annotations

import pytest
import torch

from tfbackend.kv_cache import KVCache, KVCacheSpec, num_blocks_for_budget
from tfbackend.model_interface import AttentionLayerSpec

MIXED = (
    AttentionLayerSpec(num_kv_heads=2, head_dim=16, v_head_dim=16),
    AttentionLayerSpec(num_kv_heads=8, head_dim=16, v_head_dim=16, sliding_window=4),  # more heads when sliding
    AttentionLayerSpec(num_kv_heads=1, head_dim=24, v_head_dim=16),  # MLA-like: keys wider than values
    AttentionLayerSpec(num_kv_heads=2, head_dim=16, v_head_dim=16, shares_kv_with=0),
)


def test_each_site_gets_its_own_shape_and_shared_sites_their_owners_tensors():
    cache = KVCache(KVCacheSpec(MIXED, torch.float32, block_size=4), num_blocks=3, device=torch.device("cpu"))
    shapes = [(key.shape, value.shape) for key, value in cache.layers]
    assert shapes[0] == ((3, 4, 2, 16), (3, 4, 2, 16))
    assert shapes[1] == ((3, 4, 8, 16), (3, 4, 8, 16))
    assert shapes[2] == ((3, 4, 1, 24), (3, 4, 1, 16))
    assert cache.layers[3][0] is cache.layers[0][0] and cache.layers[3][1] is cache.layers[0][1]
    assert cache.writes == [True, True, True, False]


def test_owned_views_never_overlap():
    cache = KVCache(KVCacheSpec(MIXED, torch.float32, block_size=4), num_blocks=3, device=torch.device("cpu"))
    for index, (key, value) in enumerate(cache.layers[:3]):
        key.fill_(2 * index + 1)
        value.fill_(2 * index + 2)
    for index, (key, value) in enumerate(cache.layers[:3]):
        assert torch.all(key == 2 * index + 1) and torch.all(value == 2 * index + 2)


def test_block_cost_counts_only_sites_that_own_a_cache():
    spec = KVCacheSpec(MIXED, torch.float16, block_size=4)
    per_token = 2 * 32 + 8 * 32 + 1 * 40  # heads x (key + value widths) of the three owners
    assert spec.bytes_per_block == 4 * per_token * 2


def test_sharing_must_point_at_an_earlier_owner():
    with pytest.raises(ValueError, match="not an earlier owner"):
        KVCacheSpec((AttentionLayerSpec(2, 16, 16, shares_kv_with=1), AttentionLayerSpec(2, 16, 16)), torch.float32, 4)
    with pytest.raises(ValueError, match="positive"):
        AttentionLayerSpec(0, 16, 16)


def test_a_model_without_kv_cannot_size_a_paged_cache():
    with pytest.raises(ValueError, match="no attention layer that keeps KV"):
        num_blocks_for_budget(KVCacheSpec((), torch.float32, 4), 1 << 20, 128)
