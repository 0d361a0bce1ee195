"""The torch reference backend: the ground truth the faster backends are checked against."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tfbackend.attention import AttentionMetadata, LayerAttentionOptions, paged_attention
from tfbackend.attention.context import ForwardContext, forward_context
from tfbackend.attention.torch_backend import TorchAttentionBackend
from tfbackend.kv_cache import KVCache, KVCacheSpec
from tfbackend.model_interface import AttentionLayerSpec


def one_layer_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> KVCache:
    spec = KVCacheSpec((AttentionLayerSpec(num_kv_heads, head_dim, head_dim),), torch.float32, block_size)
    return KVCache(spec, num_blocks, torch.device("cpu"))


def dense_attention(q, k, v, options: LayerAttentionOptions):
    """One sequence, every query attending causally from position 0: SDPA with an explicit mask."""
    t = q.shape[0]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    if options.sliding_window is not None:
        mask &= ~torch.ones(t, t, dtype=torch.bool).tril(-options.sliding_window)
    if options.chunk_size is not None:
        chunk = torch.arange(t) // options.chunk_size
        mask &= chunk[:, None] == chunk[None, :]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=options.scale
    )
    return out.transpose(0, 1)


def single_sequence_metadata(num_tokens: int, block_size: int, blocks: list[int]) -> AttentionMetadata:
    slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size for i in range(num_tokens)])
    return AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        block_tables=torch.tensor([blocks], dtype=torch.int32),
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
    )


@pytest.mark.parametrize("window,chunk", [(None, None), (5, None), (None, 6)])
def test_prefill_through_scattered_blocks_equals_dense_sdpa(window, chunk):
    torch.manual_seed(0)
    t, h_q, h_kv, d, block_size = 19, 4, 2, 8, 4
    q, k, v = torch.randn(t, h_q, d), torch.randn(t, h_kv, d), torch.randn(t, h_kv, d)
    caches = one_layer_cache(12, block_size, h_kv, d)
    options = LayerAttentionOptions(scale=d**-0.5, sliding_window=window, chunk_size=chunk)
    metadata = single_sequence_metadata(t, block_size, blocks=[7, 2, 11, 0, 5])
    with forward_context(ForwardContext(metadata, caches, TorchAttentionBackend())):
        out = paged_attention(0, q, k, v, options)
    torch.testing.assert_close(out, dense_attention(q, k, v, options), rtol=1e-5, atol=1e-5)


def test_decode_after_prefill_equals_the_last_row_of_a_full_prefill():
    torch.manual_seed(1)
    t, h, d, block_size = 10, 2, 8, 4
    q, k, v = torch.randn(t, h, d), torch.randn(t, h, d), torch.randn(t, h, d)
    options = LayerAttentionOptions(scale=0.3, softcap=2.0)
    backend = TorchAttentionBackend()
    full_caches = one_layer_cache(4, block_size, h, d)
    with forward_context(ForwardContext(single_sequence_metadata(t, block_size, [0, 1, 2]), full_caches, backend)):
        full = paged_attention(0, q, k, v, options)
    caches = one_layer_cache(4, block_size, h, d)
    prefill = single_sequence_metadata(t - 1, block_size, [0, 1, 2])
    with forward_context(ForwardContext(prefill, caches, backend)):
        paged_attention(0, q[:-1], k[:-1], v[:-1], options)
    decode = AttentionMetadata(
        slot_mapping=torch.tensor([2 * block_size + (t - 1) % block_size]),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([t], dtype=torch.int32),
        block_tables=torch.tensor([[0, 1, 2]], dtype=torch.int32),
        max_query_len=1,
        max_seq_len=t,
    )
    with forward_context(ForwardContext(decode, caches, backend)):
        last = paged_attention(0, q[-1:], k[-1:], v[-1:], options)
    torch.testing.assert_close(last, full[-1:], rtol=1e-5, atol=1e-5)


def test_sinks_take_probability_mass_but_add_no_value():
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    caches = one_layer_cache(1, 4, 2, 4)
    metadata = single_sequence_metadata(3, 4, [0])
    sinks = torch.tensor([0.5, -1.0])
    with forward_context(ForwardContext(metadata, caches, TorchAttentionBackend())):
        with_sinks = paged_attention(0, q, k, v, LayerAttentionOptions(scale=0.5, sinks=sinks))
        without = paged_attention(0, q, k, v, LayerAttentionOptions(scale=0.5))
    # Row 0 sees only key 0: softmax weight 1/(1 + exp(sink - score)) on v[0].
    score = (q[0] * k[0]).sum(-1) * 0.5
    weight = 1 / (1 + torch.exp(sinks - score))
    torch.testing.assert_close(with_sinks[0], weight[:, None] * without[0], rtol=1e-5, atol=1e-6)


def test_attention_outside_a_forward_context_raises():
    x = torch.randn(1, 1, 4)
    with pytest.raises(RuntimeError, match="outside a forward context"):
        paged_attention(0, x, x, x, LayerAttentionOptions(scale=1.0))


def test_a_site_that_shares_kv_reads_its_owners_cache_and_writes_nothing():
    torch.manual_seed(3)
    t, h, d, block_size = 6, 2, 4, 4
    spec = KVCacheSpec(
        (AttentionLayerSpec(h, d, d), AttentionLayerSpec(h, d, d, shares_kv_with=0)), torch.float32, block_size
    )
    cache = KVCache(spec, 2, torch.device("cpu"))
    assert cache.writes == [True, False] and cache.layers[1][0] is cache.layers[0][0]
    q, k, v = torch.randn(t, h, d), torch.randn(t, h, d), torch.randn(t, h, d)
    options = LayerAttentionOptions(scale=0.5)
    with forward_context(ForwardContext(single_sequence_metadata(t, block_size, [0, 1]), cache, TorchAttentionBackend())):
        owner = paged_attention(0, q, k, v, options)
        stored = cache.storage.clone()
        sharer = paged_attention(1, q, torch.zeros_like(k), torch.zeros_like(v), options)  # ignored: not stored
    assert torch.equal(cache.storage, stored)
    torch.testing.assert_close(sharer, owner)
