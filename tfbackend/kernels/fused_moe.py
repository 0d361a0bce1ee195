"""The experts of a mixture-of-experts layer as a Triton grouped GEMM: all experts in one launch per projection.

A step's ``T`` tokens each pick ``K`` experts: ``P = T * K`` (token, expert) pairs, pair ``p`` being token
``p // K``. Two small kernels sort the pairs by expert on the device: ``_count_kernel`` counts each expert's
pairs, ``_place_kernel`` gives each expert a segment of ``sorted_pairs`` padded to a multiple of BLOCK_M
(padding holds the sentinel ``P``) and records which expert owns each BLOCK_M-row block. Then

- ``_gate_up_kernel``: per (row block, column block) it gathers the block's token rows of ``hidden``, multiplies
  them by the gate and the up rows of its expert's ``gate_up`` weight (two accumulators, one pass over ``H``),
  adds biases, applies the gated activation and stores ``inter[P, I]``;
- ``_down_kernel``: ``inter`` rows times the expert's ``down`` weight, plus bias, times each pair's routing
  weight: ``out[P, H]``, summed over ``K`` per token afterwards.

Grids are upper bounds computed from shapes alone (every expert might be hit: at most
``P + min(P, E) * (BLOCK_M - 1)`` sorted rows); blocks past the last expert's segment exit at once. No value
is read on the host, so the whole thing can be captured in a CUDA graph. A single token's pairs have distinct
experts, so one-token steps (batch-1 decode) skip the sort: block ``p`` is pair ``p`` alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tfbackend.kernels.grid import grouped_tile
from tfbackend.kernels.launch import launch
from tfbackend.kernels.moe import GatedActivation

_SCAN_BLOCK = 1024  # pairs per iteration of the sorting kernels


# Counts that change with every step's token count are not specialized in any kernel here (Triton would compile
# a variant per value class: 1, multiples of 16, others), so the engine's warm-up compiles every variant.
@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(topk_ids_ptr, counts_ptr, num_pairs, SCAN_BLOCK: tl.constexpr):
    """One program per expert: how many pairs chose it."""
    expert = tl.program_id(0)
    hits = tl.zeros([SCAN_BLOCK], tl.int32)
    for start in range(0, num_pairs, SCAN_BLOCK):
        offsets = start + tl.arange(0, SCAN_BLOCK)
        ids = tl.load(topk_ids_ptr + offsets, mask=offsets < num_pairs, other=-1)
        hits += (ids == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.sum(hits, 0))


@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _place_kernel(
    topk_ids_ptr,
    counts_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    """One program per expert: write its pairs (in pair order) and padding to its segment, and own its blocks."""
    expert = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(experts < expert, padded, 0), 0)
    count = tl.sum(tl.where(experts == expert, counts, 0), 0)
    segment = tl.sum(tl.where(experts == expert, padded, 0), 0)

    placed = count * 0
    for scan in range(0, num_pairs, SCAN_BLOCK):
        pairs = scan + tl.arange(0, SCAN_BLOCK)
        ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        match = ids == expert
        rank = placed + tl.cumsum(match.to(tl.int32), 0) - 1
        tl.store(sorted_pairs_ptr + start + rank, pairs, mask=match)
        placed += tl.sum(match.to(tl.int32), 0)
    padding = count + tl.arange(0, BLOCK_M)  # fewer than BLOCK_M slots
    tl.store(sorted_pairs_ptr + start + padding, num_pairs, mask=padding < segment)

    first_block = start // BLOCK_M
    for block in range(0, segment // BLOCK_M, SCAN_BLOCK):
        blocks = block + tl.arange(0, SCAN_BLOCK)
        tl.store(block_expert_ptr + first_block + blocks, expert, mask=blocks < segment // BLOCK_M)
    if expert == num_experts - 1:  # blocks past every segment belong to no expert
        for block in range(first_block + segment // BLOCK_M, max_blocks, SCAN_BLOCK):
            blocks = block + tl.arange(0, SCAN_BLOCK)
            tl.store(block_expert_ptr + blocks, num_experts, mask=blocks < max_blocks)


@triton.jit
def _block_rows(sorted_pairs_ptr, block_expert_ptr, row_block, num_pairs, BLOCK_M: tl.constexpr, SORTED: tl.constexpr):
    """(expert, pair of each row) of a row block; unsorted, block p is pair p alone and the rest is padding."""
    rows = tl.arange(0, BLOCK_M)
    if SORTED:
        expert = tl.load(block_expert_ptr + row_block)
        pairs = tl.load(sorted_pairs_ptr + row_block * BLOCK_M + rows)
    else:
        expert = tl.load(block_expert_ptr + row_block)  # topk_ids itself
        pairs = tl.where(rows == 0, row_block, num_pairs)
    return expert.to(tl.int64), pairs


@triton.jit
def _gated(gate, up, ACTIVATION: tl.constexpr, alpha, limit):
    gate = tl.minimum(gate, limit)  # limit is +inf unless the model clamps
    up = tl.minimum(tl.maximum(up, -limit), limit)
    if ACTIVATION == "gpt_oss_swiglu":
        return (up + 1.0) * gate * tl.sigmoid(gate * alpha)
    if ACTIVATION == "silu":
        return gate * tl.sigmoid(gate) * up
    if ACTIVATION == "gelu":
        return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    if ACTIVATION == "gelu_tanh":  # 0.5 * (1 + tanh(z)) = sigmoid(2z)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return gate * tl.sigmoid(2.0 * inner) * up
    return tl.maximum(gate, 0.0) * up  # relu


@triton.jit(do_not_specialize=["num_pairs", "num_row_blocks"])
def _gate_up_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    inter_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    num_experts,
    top_k,
    hidden_size,
    inter_size,
    num_row_blocks,
    alpha,
    limit,
    stride_hidden,
    stride_w_expert,
    stride_w_out,
    stride_w_in,
    stride_b_expert,
    stride_b_out,
    stride_inter,
    SORTED: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    row_block, col_block = grouped_tile(tl.program_id(0), num_row_blocks, tl.cdiv(inter_size, BLOCK_N), GROUP_M)
    expert, pairs = _block_rows(sorted_pairs_ptr, block_expert_ptr, row_block, num_pairs, BLOCK_M, SORTED)
    if expert >= num_experts:  # a spare block of the upper-bound grid
        return
    row_valid = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < inter_size
    if INTERLEAVED:  # weight rows g0, u0, g1, u1, ...
        gate_rows = 2 * cols
        up_rows = gate_rows + 1
    else:  # all gates, then all ups
        gate_rows = cols
        up_rows = cols + inter_size
    k = tl.arange(0, BLOCK_K)
    x_ptrs = hidden_ptr + tokens[:, None] * stride_hidden + k[None, :]
    expert_weight = weight_ptr + expert * stride_w_expert
    gate_ptrs = expert_weight + gate_rows[None, :] * stride_w_out + k[:, None] * stride_w_in
    up_ptrs = expert_weight + up_rows[None, :] * stride_w_out + k[:, None] * stride_w_in

    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, hidden_size, BLOCK_K):
        k_valid = k < hidden_size - k_start
        x = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w_mask = k_valid[:, None] & col_valid[None, :]
        gate = tl.dot(x, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate, input_precision=DOT_PRECISION)
        up = tl.dot(x, tl.load(up_ptrs, mask=w_mask, other=0.0), up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K * stride_w_in
        up_ptrs += BLOCK_K * stride_w_in
    if HAS_BIAS:
        expert_bias = bias_ptr + expert * stride_b_expert
        gate += tl.load(expert_bias + gate_rows * stride_b_out, mask=col_valid, other=0.0).to(tl.float32)[None, :]
        up += tl.load(expert_bias + up_rows * stride_b_out, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    out = _gated(gate, up, ACTIVATION, alpha, limit)
    out_ptrs = inter_ptr + pairs.to(tl.int64)[:, None] * stride_inter + cols[None, :]
    tl.store(out_ptrs, out.to(inter_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


@triton.jit(do_not_specialize=["num_pairs", "num_row_blocks"])
def _down_kernel(
    inter_ptr,
    weight_ptr,
    bias_ptr,
    topk_weights_ptr,
    out_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    num_experts,
    hidden_size,
    inter_size,
    num_row_blocks,
    stride_inter,
    stride_w_expert,
    stride_w_out,
    stride_w_in,
    stride_b_expert,
    stride_b_out,
    stride_out,
    SORTED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    row_block, col_block = grouped_tile(tl.program_id(0), num_row_blocks, tl.cdiv(hidden_size, BLOCK_N), GROUP_M)
    expert, pairs = _block_rows(sorted_pairs_ptr, block_expert_ptr, row_block, num_pairs, BLOCK_M, SORTED)
    if expert >= num_experts:
        return
    row_valid = pairs < num_pairs
    safe_pairs = tl.where(row_valid, pairs, 0).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < hidden_size
    k = tl.arange(0, BLOCK_K)
    x_ptrs = inter_ptr + safe_pairs[:, None] * stride_inter + k[None, :]
    w_ptrs = weight_ptr + expert * stride_w_expert + cols[None, :] * stride_w_out + k[:, None] * stride_w_in

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, inter_size, BLOCK_K):
        k_valid = k < inter_size - k_start
        x = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w_in
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_b_expert + cols * stride_b_out, mask=col_valid, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    routing = tl.load(topk_weights_ptr + safe_pairs, mask=row_valid, other=0.0).to(tl.float32)
    acc = acc * routing[:, None]
    out_ptrs = out_ptr + safe_pairs[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


class MoETiles(NamedTuple):
    """Launch configuration of the two GEMM kernels; block_m also pads the sorted segments."""

    block_m: int
    block_n_gate_up: int  # columns of each of the gate and up accumulators
    block_n_down: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def moe_tiles(num_pairs: int, num_experts: int, dtype: torch.dtype) -> MoETiles:
    """Tiles for Hopper-class GPUs, by the rows an active expert gets on average.

    Below some 300 rows per expert (an H100's FLOP/byte ratio) the experts stream their weights from HBM, so
    BLOCK_M should hold all of an expert's rows (its weights are then read once) with room for the spread of
    the routing; long K blocks and deep pipelines keep enough bytes in flight. The MMA rows this wastes cost
    little next to the weight traffic.
    """
    rows_per_expert = num_pairs / min(num_pairs, num_experts)
    if rows_per_expert <= 10:
        tiles = MoETiles(16, 64, 64, 128, 1, 4, 4)
    elif rows_per_expert <= 24:
        tiles = MoETiles(32, 64, 64, 128, 4, 4, 4)
    elif rows_per_expert <= 48:
        tiles = MoETiles(64, 64, 64, 128, 4, 4, 3)
    else:
        tiles = MoETiles(128, 64, 128, 64, 8, 8, 4)
    if dtype == torch.float32:  # twice the bytes per element: keep shared memory in budget
        tiles = tiles._replace(block_k=tiles.block_k // 2, num_stages=2)
    return tiles


def sort_pairs_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_pairs, block_expert)``: pair ids grouped by expert in BLOCK_M-padded segments, and the expert
    of each block (``num_experts`` past the last segment). Sizes depend only on shapes."""
    flat_ids = topk_ids.reshape(-1)
    num_pairs = flat_ids.numel()
    max_rows = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    max_blocks = triton.cdiv(max_rows, block_m)
    device = topk_ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    launch(_count_kernel, (num_experts,), flat_ids, counts, num_pairs, SCAN_BLOCK=_SCAN_BLOCK)
    launch(_place_kernel, (num_experts,),
        flat_ids,
        counts,
        sorted_pairs,
        block_expert,
        num_pairs,
        num_experts,
        max_blocks,
        BLOCK_M=block_m,
        EXPERTS_PAD=triton.next_power_of_2(num_experts),
        SCAN_BLOCK=_SCAN_BLOCK,
    )
    return sorted_pairs, block_expert


def fused_experts_triton(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: GatedActivation,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """As ``moe.fused_experts``, through the Triton kernels."""
    num_tokens, top_k = topk_ids.shape
    num_experts, _, hidden_size = gate_up.shape
    inter_size = down.shape[2]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(hidden)
    hidden, topk_ids, topk_weights = hidden.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
    tiles = moe_tiles(num_pairs, num_experts, hidden.dtype)
    sorted_by_expert = num_tokens > 1  # one token's pairs have distinct experts: no sorting needed
    if sorted_by_expert:
        sorted_pairs, block_expert = sort_pairs_by_expert(topk_ids, num_experts, tiles.block_m)
        num_row_blocks = block_expert.numel()
    else:
        sorted_pairs, block_expert, num_row_blocks = topk_ids, topk_ids, num_pairs  # sorted_pairs unused
    dot_precision = "ieee" if hidden.dtype == torch.float32 else "tf32"

    inter = hidden.new_empty(num_pairs, inter_size)
    gate_up_bias_ = gate_up_bias if gate_up_bias is not None else gate_up  # any tensor fills an unused pointer
    grid = (num_row_blocks * triton.cdiv(inter_size, tiles.block_n_gate_up),)
    launch(_gate_up_kernel, grid,
        hidden,
        gate_up,
        gate_up_bias_,
        inter,
        sorted_pairs,
        block_expert,
        num_pairs,
        num_experts,
        top_k,
        hidden_size,
        inter_size,
        num_row_blocks,
        activation.alpha,
        activation.limit,
        hidden.stride(0),
        *gate_up.stride(),
        *(gate_up_bias_.stride()[:2] if gate_up_bias is not None else (0, 0)),
        inter.stride(0),
        SORTED=sorted_by_expert,
        INTERLEAVED=activation.interleaved,
        ACTIVATION=activation.kind,
        HAS_BIAS=gate_up_bias is not None,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n_gate_up,
        BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m,
        DOT_PRECISION=dot_precision,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )

    out = hidden.new_empty(num_pairs, hidden_size)
    down_bias_ = down_bias if down_bias is not None else down
    grid = (num_row_blocks * triton.cdiv(hidden_size, tiles.block_n_down),)
    launch(_down_kernel, grid,
        inter,
        down,
        down_bias_,
        topk_weights,
        out,
        sorted_pairs,
        block_expert,
        num_pairs,
        num_experts,
        hidden_size,
        inter_size,
        num_row_blocks,
        inter.stride(0),
        *down.stride(),
        *(down_bias_.stride()[:2] if down_bias is not None else (0, 0)),
        out.stride(0),
        SORTED=sorted_by_expert,
        HAS_BIAS=down_bias is not None,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n_down,
        BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m,
        DOT_PRECISION=dot_precision,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out.view(num_tokens, top_k, hidden_size).sum(dim=1)
