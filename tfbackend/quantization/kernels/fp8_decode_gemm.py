"""FP8 linear for decode-sized batches: per-token activation quantization fused into a split-K Triton GEMM.

At a handful of tokens an FP8 linear is a stream of the weight (N x K bytes) and nothing else matters, so this
kernel is built to keep every SM streaming and to launch once:

- One launch. Every program first reads its tokens' whole rows of ``x`` (bf16, a few KB per token, served from
  L2) for each token's absmax, then quantizes the K range it multiplies with ``fp8.quantize_activation``'s
  arithmetic (scale = max(min(absmax, scale_ub) / 448, 1e-12); code = clamp(x / scale, +-448) rounded to E4M3;
  both divisions correctly rounded) into a small codes buffer (M x K bytes, in L2), which its GEMM loop reads.
  Quantizing before the loop rather than inside it keeps the divisions in the loads' layout, one per element:
  inside, the compiler divides in ``tl.dot``'s operand layout, where every thread of a column slice holds (and
  computes) the same codes, 4 to 32 times over.
- Parallelism at small N. Programs are (column tile, K split) pairs, about two per SM (``tiles.decode_tiles``):
  a 4096-wide output has 64 column tiles of 64, each split 4 ways along K. Splitting K rather than narrowing the
  column tiles matters: every column tile quantizes its tokens' K range, so fewer, wider tiles redo less of it.
- Split-K without a zeroing launch. Each split writes its fp32 partial tile to a scratch buffer (allocated per
  call, never initialized) and counts itself in on a per-tile counter; the split that arrives last sums the
  partials in split order (so results do not depend on arrival order), applies the scales, writes the output
  and puts the counter back to zero. The counters (``tile_counters``) are owned by the layer, allocated zeroed
  once; every launch leaves them zero, so CUDA graphs replay the kernel as captured. Launches that share counters
  must not run concurrently (one stream per layer, as the engine runs).
- ``tl.dot`` needs 16 rows: fewer tokens are padded with zero codes (masked loads, no work). A single token may
  instead take the GEMV form (``gemv``): the weight tile converted to float32, multiplied by the codes and summed
  over K on the CUDA cores, with no padded rows, the token quantized as the loop goes (no codes buffer, no
  barrier). Which form streams faster, and with which tiles, K step, warps and pipeline depth, is measured per
  shape (``benchmarks/fp8_decode_probe.py``) and chosen by ``tiles.decode_tiles``.

Weight scales: any grid whose scale is constant over each K step (per tensor, per channel, or ``block_k`` a
multiple of the step, which is 128 or a multiple of it); a grid that changes along K scales each step's partial
product before it is accumulated, as ``fp8_gemm`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tfbackend.kernels.launch import launch
from tfbackend.quantization.fp8 import _MIN_SCALE, FP8_MAX
from tfbackend.quantization.kernels.tiles import DECODE_BLOCK_K, DECODE_NARROWEST_BLOCK_N, DECODE_TOKEN_LIMIT

# tl.dot's smallest row count.
_DOT_ROWS = 16
# Elements of x each program loads per iteration of its absmax and quantization passes: few, wide iterations,
# since each waits on an L2 round trip.
_ROW_ELEMENTS = 8192


def decode_counters(out_features: int, device: torch.device) -> torch.Tensor:
    """Zeroed per-tile arrival counters for a layer of ``out_features`` (enough for any ``decode_tiles``)."""
    return torch.zeros(triton.cdiv(out_features, DECODE_NARROWEST_BLOCK_N), dtype=torch.int32, device=device)


@triton.jit
def _fp8_decode_gemm_kernel(
    x_ptr, w_ptr, w_scale_ptr, out_ptr, codes_ptr, partial_ptr, counter_ptr,
    M, N, K, stride_xm, stride_wn, stride_wsn, stride_om, stride_cm,
    w_block_n, w_block_k, scale_ub, steps_per_split,
    HAS_UB: tl.constexpr, PER_STEP_SCALES: tl.constexpr, SPLITS: tl.constexpr, GEMV: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ROW_BLOCK: tl.constexpr, FP8_MAX_VALUE: tl.constexpr, MIN_SCALE: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tokens = tl.arange(0, TOKENS)
    token_mask = tokens < M
    x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_xm

    # Each token's scale, from its whole row: the same in every program.
    amax = tl.zeros((TOKENS,), dtype=tl.float32)
    for k0 in tl.range(0, K, ROW_BLOCK, num_stages=2):
        cols = k0 + tl.arange(0, ROW_BLOCK)
        x = tl.load(x_rows + cols[None, :], mask=token_mask[:, None] & (cols[None, :] < K), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    if HAS_UB:
        amax = tl.minimum(amax, scale_ub)
    x_scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX_VALUE), MIN_SCALE)

    k_begin = split * steps_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, K)
    if not GEMV:
        # Quantize this split's K range into the codes buffer. Done here, in the loads' own layout, because
        # inside the GEMM loop the compiler would divide in tl.dot's operand layout, where each code is held (and
        # so computed) by many threads. Every column tile writes the same bytes for its split: the duplicate
        # stores are harmless, and each program reads back only what it wrote itself (after the barrier) or its
        # twins did. The GEMV form quantizes in its loop instead: its K-major tiles hold each code in few threads.
        code_rows = codes_ptr + tokens[:, None].to(tl.int64) * stride_cm
        for k0 in tl.range(k_begin, k_end, ROW_BLOCK, num_stages=2):
            cols = k0 + tl.arange(0, ROW_BLOCK)
            mask = token_mask[:, None] & (cols[None, :] < k_end)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            codes = tl.clamp(tl.math.div_rn(x, x_scale[:, None]), -FP8_MAX_VALUE, FP8_MAX_VALUE)
            tl.store(code_rows + cols[None, :], codes.to(codes_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the codes this program's threads wrote are visible to all of them
    token_scale = tl.max(x_scale, axis=0)  # GEMV: the one token's

    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = codes_ptr + rows[:, None].to(tl.int64) * stride_cm + (k_begin + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k_begin + offs_k)[:, None]
    w_scale_rows = w_scale_ptr + (offs_n // w_block_n) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_ptrs = x_ptr + k_begin + offs_k  # GEMV: the one token's row
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_mask = offs_k < K - k0
        w = tl.load(w_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        if GEMV:
            x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            codes = tl.clamp(tl.math.div_rn(x, token_scale), -FP8_MAX_VALUE, FP8_MAX_VALUE)
            a = codes.to(w_ptr.dtype.element_ty).to(tl.float32)
            product = tl.sum(w.to(tl.float32) * a[:, None], axis=0)[None, :]
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            product = tl.dot(a, w)
        if PER_STEP_SCALES:
            product = product * tl.load(w_scale_rows + k0 // w_block_k, mask=n_mask, other=0.0)[None, :]
        acc += product
        a_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    out_mask = row_mask[:, None] & n_mask[None, :]
    if SPLITS > 1:
        # Park this split's partial; the last split of the tile to arrive finishes it.
        tile_offsets = rows[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + split * M * N + tile_offsets, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLITS - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for other in tl.static_range(SPLITS):
                acc += tl.load(partial_ptr + other * M * N + tile_offsets, mask=out_mask, other=0.0,
                               cache_modifier=".cg")
            _store_scaled(acc, x_scale, w_scale_rows, out_ptr, rows, offs_n, out_mask, stride_om, n_mask,
                          PER_STEP_SCALES, TOKENS, BLOCK_M)
            tl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next launch
    else:
        _store_scaled(acc, x_scale, w_scale_rows, out_ptr, rows, offs_n, out_mask, stride_om, n_mask,
                      PER_STEP_SCALES, TOKENS, BLOCK_M)


@triton.jit
def _store_scaled(acc, x_scale, w_scale_rows, out_ptr, rows, offs_n, out_mask, stride_om, n_mask,
                  PER_STEP_SCALES: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr):
    """``acc`` times the token scales (and the weight's, unless applied per step) into the output."""
    if TOKENS < BLOCK_M:  # rows past the tokens are masked off: any scale will do for them
        x_scale = tl.reshape(tl.broadcast_to(x_scale[None, :], (BLOCK_M // TOKENS, TOKENS)), (BLOCK_M,))
    acc = acc * x_scale[:, None]
    if not PER_STEP_SCALES:
        acc = acc * tl.load(w_scale_rows, mask=n_mask, other=0.0)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def fp8_decode_gemm_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_block_n: int,
    weight_block_k: int,
    scale_ub: float | None,
    tile_counters: torch.Tensor,
    block_n: int,
    splits: int,
    block_k: int = DECODE_BLOCK_K,
    num_warps: int = 4,
    num_stages: int = 4,
    gemv: bool = False,
) -> torch.Tensor:
    """``x[M, K]`` quantized per token (absmax capped at ``scale_ub``) times the E4M3 ``weight[N, K]`` with its
    scale grid, in ``x.dtype``; M at most ``DECODE_TOKEN_LIMIT``. The tiling (``block_n``, ``splits``, the K step
    ``block_k``, a multiple of ``DECODE_BLOCK_K``, warps, pipeline stages, and ``gemv``: the GEMV form for a single
    token) comes from ``decode_tiles``, ``tile_counters`` from ``decode_counters`` (zero on entry, left zero)."""
    x = x if x.stride(1) == 1 else x.contiguous()
    num_tokens, in_features = x.shape
    out_features = weight.shape[0]
    if num_tokens > DECODE_TOKEN_LIMIT:
        raise ValueError(f"the FP8 decode GEMM takes at most {DECODE_TOKEN_LIMIT} tokens, got {num_tokens}")
    if block_k % DECODE_BLOCK_K != 0:
        raise ValueError(f"the decode GEMM's K step must be a multiple of {DECODE_BLOCK_K}, got {block_k}")
    if weight_block_k < in_features and weight_block_k % block_k != 0:
        raise ValueError(f"FP8 weight scale blocks {weight_block_k} wide along K are not multiples of "
                         f"{block_k}, the decode GEMM's K step")
    column_tiles = triton.cdiv(out_features, block_n)
    if tile_counters.numel() < column_tiles:
        raise ValueError(f"{column_tiles} column tiles need as many counters, got {tile_counters.numel()}")
    out = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    k_steps = triton.cdiv(in_features, block_k)
    steps_per_split = triton.cdiv(k_steps, splits)
    splits = triton.cdiv(k_steps, steps_per_split)  # none left empty
    # Scratch, never initialized: the codes (row stride a multiple of 16, as the GEMM loop's loads like) and,
    # with split K, each split's float32 partial products.
    gemv = gemv and num_tokens == 1
    codes = torch.empty(num_tokens, 16 if gemv else triton.cdiv(in_features, 16) * 16, dtype=weight.dtype,
                        device=x.device)  # the GEMV form needs none: a placeholder (a kernel pointer must be real)
    partials = torch.empty(splits if splits > 1 else 0, num_tokens, out_features, dtype=torch.float32,
                           device=x.device)
    tokens = triton.next_power_of_2(num_tokens)
    launch(_fp8_decode_gemm_kernel, (column_tiles, splits),
        x, weight, weight_scale, out, codes, partials, tile_counters,
        num_tokens, out_features, in_features, x.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0),
        codes.stride(0), weight_block_n, weight_block_k, scale_ub if scale_ub is not None else 0.0,
        steps_per_split,
        HAS_UB=scale_ub is not None, PER_STEP_SCALES=weight_block_k < in_features, SPLITS=splits, GEMV=gemv,
        TOKENS=tokens, BLOCK_M=1 if gemv else max(_DOT_ROWS, tokens), BLOCK_N=block_n, BLOCK_K=block_k,
        ROW_BLOCK=min(triton.next_power_of_2(in_features), _ROW_ELEMENTS // tokens),
        FP8_MAX_VALUE=FP8_MAX, MIN_SCALE=_MIN_SCALE,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# As an op (opaque to torch.compile); code already inside an op calls fp8_decode_gemm_launch, skipping the dispatcher.
fp8_decode_gemm = torch.library.custom_op("tfbackend::fp8_decode_gemm", fp8_decode_gemm_launch, mutates_args=())


@fp8_decode_gemm.register_fake
def _(x, weight, weight_scale, weight_block_n, weight_block_k, scale_ub, tile_counters, block_n, splits,
      block_k=DECODE_BLOCK_K, num_warps=4, num_stages=4, gemv=False):
    return x.new_empty(x.shape[0], weight.shape[0])
