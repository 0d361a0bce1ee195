"""Pure PyTorch attention over the paged cache: the ground truth for faster backends, and the CPU path."""

from __future__ import annotations

import torch

from tfbackend.attention.backend import AttentionBackend, AttentionMetadata, LayerAttentionOptions


def attention_scores_mask(
    query_positions: torch.Tensor, num_keys: int, sliding_window: int | None, chunk_size: int | None = None
) -> torch.Tensor:
    """Boolean [q, k] mask: key j is visible to a query at position i iff j <= i, i - j < window, and both
    fall in the same chunk."""
    key_positions = torch.arange(num_keys, device=query_positions.device)
    distance = query_positions[:, None] - key_positions[None, :]
    visible = distance >= 0
    if sliding_window is not None:
        visible &= distance < sliding_window
    if chunk_size is not None:
        visible &= (query_positions[:, None] // chunk_size) == (key_positions[None, :] // chunk_size)
    return visible


def reference_attention(
    query: torch.Tensor,  # [q, H_q, D_k]
    key: torch.Tensor,  # [k, H_kv, D_k]
    value: torch.Tensor,  # [k, H_kv, D_v]
    query_positions: torch.Tensor,  # [q]
    options: LayerAttentionOptions,
) -> torch.Tensor:  # [q, H_q, D_v]
    """Attention of one sequence's queries over its keys, computed in float32."""
    num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_q_heads // num_kv_heads
    q = query.float().transpose(0, 1)  # [H_q, q, D]
    k = key.float().transpose(0, 1).repeat_interleave(group, dim=0)  # [H_q, k, D]
    v = value.float().transpose(0, 1).repeat_interleave(group, dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) * options.scale
    if options.softcap is not None:
        scores = torch.tanh(scores / options.softcap) * options.softcap
    visible = attention_scores_mask(query_positions, key.shape[0], options.sliding_window, options.chunk_size)
    scores = scores.masked_fill(~visible, float("-inf"))
    if options.sinks is not None:
        sink = options.sinks.float().reshape(num_q_heads, 1, 1).expand(-1, scores.shape[1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(0, 1).to(query.dtype)


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``x`` as a cache entry: divided by its scale and saturated to E4M3's range for an FP8 cache."""
    if cache_dtype != torch.float8_e4m3fn:
        return x.to(cache_dtype)
    limit = torch.finfo(cache_dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(cache_dtype)


def from_cache(entries: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache entries as values: FP8 ones widened to float32 and multiplied back by their scale."""
    return entries.float() * scale if entries.dtype == torch.float8_e4m3fn else entries


class TorchAttentionBackend(AttentionBackend):
    """Loops over the step's sequences (not tokens or layers' internals) and gathers each one's blocks."""

    name = "torch"

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        block_size = key_cache.shape[1]
        blocks, offsets = slots // block_size, slots % block_size
        key_cache[blocks, offsets] = to_cache(key[keep], key_cache.dtype, k_scale)
        value_cache[blocks, offsets] = to_cache(value[keep], value_cache.dtype, v_scale)

    def attend(self, query, key_cache, value_cache, metadata: AttentionMetadata, options, k_scale=1.0, v_scale=1.0):
        starts = metadata.query_start_loc_host or metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens_host or metadata.seq_lens.tolist()
        block_size = key_cache.shape[1]
        out = query.new_empty(query.shape[0], query.shape[1], value_cache.shape[-1])
        for b, seq_len in enumerate(seq_lens):
            start, end = starts[b], starts[b + 1]
            if end == start:
                continue
            num_blocks = -(-seq_len // block_size)
            blocks = metadata.block_tables[b, :num_blocks].long()
            keys = from_cache(key_cache[blocks].flatten(0, 1)[:seq_len], k_scale)
            values = from_cache(value_cache[blocks].flatten(0, 1)[:seq_len], v_scale)
            positions = torch.arange(seq_len - (end - start), seq_len, device=query.device)
            out[start:end] = reference_attention(query[start:end], keys, values, positions, options)
        return out
