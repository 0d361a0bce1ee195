"""Paged attention in Triton: a cache-write kernel, one attention kernel for mixed prefill/decode steps, and a
reduce kernel for its split-KV mode.

The attention kernel works on tiles of BLOCK_M rows = BLOCK_Q query tokens x the GROUP query heads that share
one KV head, so every K/V tile is loaded once per KV head and fed to ``tl.dot`` for all of them. Grid axis 0
enumerates query tiles of all sequences without reading query lengths on the host: sequence b owns tiles
``[query_start_loc[b] // BLOCK_Q + b, query_start_loc[b+1] // BLOCK_Q + b + 1)`` (at least as many as it needs)
and a program finds its sequence by binary search, so the grid is ``T // BLOCK_Q + B`` tiles and spare tiles
exit at once. Axis 1 is the KV head; axis 2 splits each sequence's keys into up to num_splits partitions whose
partial softmax states a second kernel merges, which fills the GPU when few sequences decode long contexts.
num_splits is an upper bound sized from the step's longest possible sequence; each sequence uses only as many
partitions as its own keys fill (at least MIN_TILES_PER_SPLIT key tiles each), decided on the device from its
length, and the spare partitions exit at once. Every grid size comes from tensor shapes and the metadata's python
ints, so decode steps can be CUDA-graphed, and a graph captured for ``max_model_len`` still splits a short
context only as finely as its length calls for.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tfbackend.attention.backend import AttentionBackend, AttentionMetadata, LayerAttentionOptions
from tfbackend.kernels.launch import launch

_LOG2E = tl.constexpr(1.4426950408889634)
# Grid sizing under the CPU interpreter, where there is no device to ask: an H100's SM count.
_CPU_SM_COUNT = 132
# The split-KV mode aims for this many programs per SM, by default never gives a partition fewer keys than
# this, and never uses more partitions than this.
_SPLIT_PROGRAMS_PER_SM = 2
_MIN_KEYS_PER_SPLIT = 64
_MAX_SPLITS = 64
# Compiled kernels on a GPU may use PTX's tanh.approx; Triton's CPU interpreter cannot run inline assembly.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    num_kv_heads,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    k_scale,
    v_scale,
    PAGE_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    D_K: tl.constexpr,
    D_K_PAD: tl.constexpr,
    D_V: tl.constexpr,
    D_V_PAD: tl.constexpr,
    FP8_CACHE: tl.constexpr,
):
    """One program per token: copy all its KV heads to the cache slot ``slot_mapping[token]`` (an FP8 cache
    stores them divided by the layer's scale, saturated to E4M3's ±448)."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding tokens (e.g. of a CUDA-graph batch) are not stored
        return
    block = slot // PAGE_SIZE
    in_page = slot % PAGE_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]

    d_k = tl.arange(0, D_K_PAD)[None, :]
    k_mask = (heads < num_kv_heads) & (d_k < D_K)
    k = tl.load(key_ptr + token * stride_k_tok + heads * stride_k_head + d_k, mask=k_mask)
    if FP8_CACHE:
        k = tl.clamp(k.to(tl.float32) / k_scale, -448.0, 448.0)
    k_dst = key_cache_ptr + block * stride_kc_block + in_page * stride_kc_slot + heads * stride_kc_head + d_k
    tl.store(k_dst, k.to(key_cache_ptr.dtype.element_ty), mask=k_mask)

    d_v = tl.arange(0, D_V_PAD)[None, :]
    v_mask = (heads < num_kv_heads) & (d_v < D_V)
    v = tl.load(value_ptr + token * stride_v_tok + heads * stride_v_head + d_v, mask=v_mask)
    if FP8_CACHE:
        v = tl.clamp(v.to(tl.float32) / v_scale, -448.0, 448.0)
    v_dst = value_cache_ptr + block * stride_vc_block + in_page * stride_vc_slot + heads * stride_vc_head + d_v
    tl.store(v_dst, v.to(value_cache_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first tile ``query_start_loc[b] // BLOCK_Q + b`` is <= ``tile``."""
    lo: tl.int32 = 0  # sequence 0 starts at tile 0, so the answer is always >= 0
    hi: tl.int32 = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:  # one SFU instruction; relative error ~2^-11, below the rounding of 16-bit inputs
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    # Through sigmoid: tl has no tanh outside backend-specific libdevice modules.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


# Per-step ints are not specialized (Triton would compile a variant per value class: 1, multiples of 16,
# others), so every kernel variant a server needs is compiled by the engine's warm-up, never inside a request.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt_seq", "num_splits"])
def _paged_attention_kernel(
    out_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    sinks_ptr,
    num_seqs,
    num_q_heads,
    scale,
    softcap,
    sliding_window,
    chunk_size,
    v_scale,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_bt_seq,
    num_splits,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    D_K: tl.constexpr,
    D_K_PAD: tl.constexpr,
    D_V: tl.constexpr,
    D_V_PAD: tl.constexpr,
    SPLIT_KV: tl.constexpr,
    MIN_TILES_PER_SPLIT: tl.constexpr,
    ONE_TILE_PER_SEQ: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if ONE_TILE_PER_SEQ:  # every sequence fits one tile (decode): grid axis 0 is the sequence
        seq = tile
        local_tile = 0
    else:
        seq = _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
        local_tile = tile - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if local_tile * BLOCK_Q >= q_len:  # a spare tile of the upper-bound grid
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row m of the tile is query token m // GROUP of this tile and query head m % GROUP of this KV group.
    rows = tl.arange(0, BLOCK_M)
    row_tok = local_tile * BLOCK_Q + rows // GROUP
    row_head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (row_tok < q_len)
    row_pos = context_len + row_tok

    # Keys any row of the tile can see: from the first row's window start to the last row's position.
    # Tiles wholly before the window are never visited, so sliding-window layers read only their window.
    first_pos = context_len + local_tile * BLOCK_Q
    kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)
    if HAS_WINDOW:
        kv_begin = tl.maximum(first_pos - sliding_window + 1, 0)
    else:
        kv_begin = first_pos * 0
    if HAS_CHUNK:  # nothing before the first row's chunk either
        kv_begin = tl.maximum(kv_begin, (first_pos // chunk_size) * chunk_size)
    tile_begin = kv_begin // TILE_N
    tile_end = tl.cdiv(kv_end, TILE_N)
    if SPLIT_KV:
        # This program takes one contiguous share of the sequence's key tiles. Shares are at least
        # MIN_TILES_PER_SPLIT tiles, so a short sequence uses fewer partitions than the grid has.
        per_split = tl.maximum(tl.cdiv(tile_end - tile_begin, num_splits), MIN_TILES_PER_SPLIT)
        tile_begin = tile_begin + split * per_split
        tile_end = tl.minimum(tile_begin + per_split, tile_end)
        if tile_begin >= tile_end:  # a spare partition: mark it empty for the reduce, which reads nothing else
            part = ((q_start + row_tok).to(tl.int64) * num_q_heads + row_head) * num_splits + split
            tl.store(part_max_ptr + part, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_valid)
            return

    d_k = tl.arange(0, D_K_PAD)
    d_v = tl.arange(0, D_V_PAD)
    q_rows = (q_start + row_tok).to(tl.int64) * stride_q_tok + row_head * stride_q_head
    q = tl.load(
        query_ptr + q_rows[:, None] + d_k[None, :],
        mask=row_valid[:, None] & (d_k[None, :] < D_K),
        other=0.0,
    )

    # Online softmax in base 2. A sink is a logit with no value: with one pass it seeds the running max and
    # sum (exp2(sink - sink) = 1); with splits the reduce kernel adds it once instead.
    if HAS_SINKS and not SPLIT_KV:
        m_i = tl.load(sinks_ptr + row_head, mask=row_valid, other=0.0).to(tl.float32) * _LOG2E
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_V_PAD], tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq

    for t in range(tile_begin, tile_end):
        # A tile may span several pages (or part of one): resolve every key's physical slot.
        keys = t * TILE_N + tl.arange(0, TILE_N)
        key_valid = keys < kv_end
        blocks = tl.load(block_table_row + keys // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
        in_page = keys % PAGE_SIZE
        k_cols = blocks * stride_kc_block + in_page * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(
            key_cache_ptr + k_cols[None, :] + d_k[:, None],
            mask=key_valid[None, :] & (d_k[:, None] < D_K),
            other=0.0,
        )
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            s = _tanh(s * (scale / softcap), FAST_TANH) * (softcap * _LOG2E)
        else:
            s = s * (scale * _LOG2E)
        visible = key_valid[None, :] & (keys[None, :] <= row_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (row_pos[:, None] - keys[None, :] < sliding_window)
        if HAS_CHUNK:
            visible = visible & (keys[None, :] >= (row_pos[:, None] // chunk_size) * chunk_size)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)

        v_rows = blocks * stride_vc_block + in_page * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(
            value_cache_ptr + v_rows[:, None] + d_v[None, :],
            mask=key_valid[:, None] & (d_v[None, :] < D_V),
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc * v_scale  # an FP8 cache's values come back scaled (1.0 otherwise); keys' scale is in ``scale``
    out_mask = row_valid[:, None] & (d_v[None, :] < D_V)
    if not SPLIT_KV:
        out_rows = (q_start + row_tok).to(tl.int64) * stride_o_tok + row_head * stride_o_head
        out = acc / l_i[:, None]
        tl.store(out_ptr + out_rows[:, None] + d_v[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partial state of (token, head, split); a row that saw no key here stores m = -inf, l = 0, acc = 0.
        part = ((q_start + row_tok).to(tl.int64) * num_q_heads + row_head) * num_splits + split
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * D_V + d_v[None, :], acc, mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(
    out_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    sinks_ptr,
    num_q_heads,
    stride_o_tok,
    stride_o_head,
    num_splits,
    SPLITS_PAD: tl.constexpr,
    D_V: tl.constexpr,
    D_V_PAD: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """One program per (token, query head): merge the partitions' (max, sum, acc) into the output row."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < num_splits
    part = (token * num_q_heads + head) * num_splits + splits
    m = tl.load(part_max_ptr + part, mask=split_valid, other=float("-inf"))
    # Empty partitions stored only their max (-inf); their sum and acc are never read.
    seen = split_valid & (m > float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=seen, other=0.0)
    # Finite: the partition holding the query's own position always sees that key.
    m_max = tl.max(m, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * _LOG2E
        m_max = tl.maximum(m_max, sink)
    weight = tl.exp2(m - m_max)
    total = tl.sum(weight * l, 0)
    if HAS_SINKS:
        total += tl.exp2(sink - m_max)

    d_v = tl.arange(0, D_V_PAD)
    acc = tl.load(
        part_acc_ptr + part[:, None] * D_V + d_v[None, :],
        mask=seen[:, None] & (d_v[None, :] < D_V),
        other=0.0,
    )
    out = tl.sum(acc * weight[:, None], 0) / total
    out_offsets = token * stride_o_tok + head * stride_o_head + d_v
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=d_v < D_V)


class AttentionPlan(NamedTuple):
    """How ``attend`` launches for one step; a function of shapes and the metadata's ints only."""

    block_m: int  # tile rows: block_q query tokens x the GQA group
    block_q: int
    tile_n: int  # keys per inner-loop iteration
    num_warps: int
    num_stages: int
    one_tile_per_seq: bool  # every sequence's queries fit one tile: no sequence search
    num_q_tiles: int  # grid axis 0 (an upper bound; spare tiles exit at once)
    num_splits: int  # grid axis 2, an upper bound; > 1 runs the split-KV reduce
    min_tiles_per_split: int  # a sequence uses at most cdiv(its key tiles, this) of the num_splits partitions


def _tile_config(group: int, max_query_len: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, TILE_N, num_warps, num_stages) for Hopper-class GPUs.

    BLOCK_M covers the step's longest query times the GQA group, between 16 (the smallest ``tl.dot``) and 128
    rows, so decodes waste few rows and long prefills get big MMA tiles. Heads wider than 128 (Gemma's 256)
    cap BLOCK_M at 64, since a 128 x 256 fp32 accumulator alone would fill the registers; their decode tiles
    (16 rows) stream 64 keys per iteration in two stages, prefill tiles 32.
    """
    rows = min(max(triton.next_power_of_2(max_query_len * group), 16), 128)
    block_m = max(rows, triton.next_power_of_2(group))
    wide_heads = head_dim > 128
    if wide_heads:
        block_m = min(block_m, max(64, triton.next_power_of_2(group)))
        tile_n = 64 if block_m <= 16 else 32
    else:
        tile_n = 64
    if dtype == torch.float32:  # twice the bytes per element: keep registers and shared memory in budget
        block_m, tile_n = min(block_m, max(64, triton.next_power_of_2(group))), tile_n // 2
    if block_m >= 128:
        return block_m, tile_n, 8, 2
    if wide_heads:
        return block_m, tile_n, 8 if block_m >= 64 else 4, 2
    if block_m == 64:
        return block_m, tile_n, 4, 2
    return block_m, tile_n, 4, 3


class TritonAttentionBackend(AttentionBackend):
    """Paged attention on GPU through Triton kernels; see the module docstring for the kernel design.

    ``split_kv`` forces the split-KV mode on (True) or off (False); None picks it when the step's query
    tiles times KV heads would leave the GPU's SMs idle and the longest sequence is long enough to split.
    ``min_keys_per_split``: the fewest keys a partition is given (rounded up to whole key tiles).
    """

    name = "triton"

    def __init__(self, split_kv: bool | None = None, min_keys_per_split: int = _MIN_KEYS_PER_SPLIT) -> None:
        if min_keys_per_split < 1:
            raise ValueError(f"min_keys_per_split must be at least 1, got {min_keys_per_split}")
        self.split_kv = split_kv
        self.min_keys_per_split = min_keys_per_split
        self._sm_counts: dict[torch.device, int] = {}
        # Split-KV scratch by (device, rows, heads, splits, D_v). Never freed: a captured CUDA graph keeps
        # pointing at the buffer it was captured with. Rows are rounded up to a power of two to bound the count.
        self._scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
        num_tokens, num_kv_heads, d_k = key.shape
        d_v = value.shape[-1]
        if num_tokens == 0:
            return
        key, value = _unit_last_stride(key), _unit_last_stride(value)
        heads_pad = triton.next_power_of_2(num_kv_heads)
        d_k_pad, d_v_pad = triton.next_power_of_2(d_k), triton.next_power_of_2(d_v)
        launch(_write_kv_kernel, (num_tokens,),
            key,
            value,
            key_cache,
            value_cache,
            slot_mapping,
            num_kv_heads,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            *key_cache.stride()[:3],
            *value_cache.stride()[:3],
            k_scale,
            v_scale,
            PAGE_SIZE=key_cache.shape[1],
            HEADS_PAD=heads_pad,
            D_K=d_k,
            D_K_PAD=d_k_pad,
            D_V=d_v,
            D_V_PAD=d_v_pad,
            FP8_CACHE=key_cache.dtype == torch.float8_e4m3fn,
            num_warps=4 if heads_pad * max(d_k_pad, d_v_pad) >= 1024 else 1,
        )

    def attend(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        options: LayerAttentionOptions,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As the interface; ``out`` ([T, H_q, D_v]) may be given to write into a preallocated tensor."""
        num_tokens, num_q_heads, d_k = query.shape
        num_kv_heads, d_v = key_cache.shape[2], value_cache.shape[3]
        num_seqs = metadata.num_seqs
        if out is None:
            out = query.new_empty(num_tokens, num_q_heads, d_v)
        if num_tokens == 0:
            return out
        query = _unit_last_stride(query)
        group = num_q_heads // num_kv_heads
        plan = self.plan(query, key_cache, value_cache, metadata)
        num_splits = plan.num_splits
        # tl.dot needs every dimension >= 16; the padding is masked off.
        d_k_pad, d_v_pad = max(16, triton.next_power_of_2(d_k)), max(16, triton.next_power_of_2(d_v))
        if num_splits > 1:
            part_max, part_sum, part_acc = self._split_scratch(
                query.device, num_tokens, num_q_heads, num_splits, d_v
            )
        else:  # unused by the single-pass kernel; any tensor fills the pointer arguments
            part_max = part_sum = part_acc = out
        sinks = options.sinks if options.sinks is not None else out

        launch(_paged_attention_kernel, (plan.num_q_tiles, num_kv_heads, num_splits),
            out,
            part_max,
            part_sum,
            part_acc,
            query,
            key_cache,
            value_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            sinks,
            num_seqs,
            num_q_heads,
            options.scale * k_scale,  # an FP8 cache's keys come back scaled: fold that into the scores' scale
            options.softcap or 1.0,
            options.sliding_window or 0,
            options.chunk_size or 1,
            v_scale,
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            *key_cache.stride()[:3],
            *value_cache.stride()[:3],
            metadata.block_tables.stride(0),
            num_splits,
            GROUP=group,
            BLOCK_M=plan.block_m,
            BLOCK_Q=plan.block_q,
            TILE_N=plan.tile_n,
            PAGE_SIZE=key_cache.shape[1],
            D_K=d_k,
            D_K_PAD=d_k_pad,
            D_V=d_v,
            D_V_PAD=d_v_pad,
            SPLIT_KV=num_splits > 1,
            MIN_TILES_PER_SPLIT=plan.min_tiles_per_split,
            ONE_TILE_PER_SEQ=plan.one_tile_per_seq,
            HAS_WINDOW=options.sliding_window is not None,
            HAS_CHUNK=options.chunk_size is not None,
            HAS_SOFTCAP=options.softcap is not None,
            FAST_TANH=query.is_cuda and not _INTERPRETED and query.dtype != torch.float32,
            HAS_SINKS=options.sinks is not None,
            # fp32 callers want fp32 accuracy, not TF32; 16-bit inputs ignore this.
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
        if num_splits > 1:
            launch(_reduce_splits_kernel, (num_tokens, num_q_heads),
                out,
                part_max,
                part_sum,
                part_acc,
                sinks,
                num_q_heads,
                out.stride(0),
                out.stride(1),
                num_splits,
                # One variant for every split count (padding lanes are masked and load nothing), so a step
                # never waits for a compilation that the warm-up's split counts did not happen to hit.
                SPLITS_PAD=triton.next_power_of_2(_MAX_SPLITS),
                D_V=d_v,
                D_V_PAD=d_v_pad,
                HAS_SINKS=options.sinks is not None,
                num_warps=4 if d_v_pad <= 128 else 8,
            )
        return out

    def plan(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> AttentionPlan:
        """Tile sizes and grid of ``attend`` for this step."""
        num_tokens, num_q_heads, d_k = query.shape
        num_kv_heads, d_v = key_cache.shape[2], value_cache.shape[3]
        group = num_q_heads // num_kv_heads
        block_m, tile_n, num_warps, num_stages = _tile_config(
            group, metadata.max_query_len, max(d_k, d_v), query.dtype
        )
        block_q = block_m // group
        one_tile_per_seq = metadata.max_query_len <= block_q
        num_seqs = metadata.num_seqs
        num_q_tiles = num_seqs if one_tile_per_seq else num_tokens // block_q + num_seqs
        min_tiles_per_split = triton.cdiv(self.min_keys_per_split, tile_n)
        num_splits = self._num_splits(
            num_q_tiles * num_kv_heads, triton.cdiv(metadata.max_seq_len, tile_n * min_tiles_per_split), query.device
        )
        return AttentionPlan(
            block_m, block_q, tile_n, num_warps, num_stages, one_tile_per_seq, num_q_tiles, num_splits,
            min_tiles_per_split,
        )

    def _num_splits(self, num_programs: int, max_useful_splits: int, device: torch.device) -> int:
        """How many partitions the grid splits sequences' keys into (1: no split).

        ``max_useful_splits``: as many as the longest sequence the step may hold can fill. Depends only on
        grid size and the metadata's max_seq_len, never on tensor values, so a CUDA graph's choice is stable;
        the kernel then uses fewer for shorter sequences.
        """
        if self.split_kv is False:
            return 1
        if self.split_kv:
            return min(max(2, max_useful_splits), _MAX_SPLITS)
        target = _SPLIT_PROGRAMS_PER_SM * self._sm_count(device)
        if num_programs >= target:
            return 1
        return max(1, min(triton.cdiv(target, num_programs), max_useful_splits, _MAX_SPLITS))

    def _sm_count(self, device: torch.device) -> int:
        if device.type != "cuda":
            return _CPU_SM_COUNT
        if device not in self._sm_counts:
            self._sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self._sm_counts[device]

    def _split_scratch(
        self, device: torch.device, num_tokens: int, num_q_heads: int, num_splits: int, d_v: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 (max, sum, acc) partials for at least ``num_tokens`` rows, reused across calls."""
        rows = triton.next_power_of_2(num_tokens)
        key = (device, rows, num_q_heads, num_splits, d_v)
        if key not in self._scratch:
            shape = (rows, num_q_heads, num_splits)
            self._scratch[key] = (
                torch.empty(shape, dtype=torch.float32, device=device),
                torch.empty(shape, dtype=torch.float32, device=device),
                torch.empty(*shape, d_v, dtype=torch.float32, device=device),
            )
        return self._scratch[key]


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim as contiguous; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()
