"""Tile sizes of the quantized GEMMs (no Triton here: layers consult them on any device).

``tiles_for``: the regular GEMMs' tiles, chosen from the number of tokens alone. A decode step multiplies a
handful of rows by a large weight: short, wide tiles keep every SM busy streaming the weight. A prefill is a real
matrix product: square tiles and more warps reuse each loaded weight tile across many rows.

``decode_tiles``: the FP8 decode GEMM's (``fp8_decode_gemm.py``) column tiles and K splits, from the weight's
shape and the GPU's SM count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# The FP8 decode GEMM's K step: one 128-byte line of each weight row, and the width of DeepSeek-style scale
# blocks, which a step must not straddle.
DECODE_BLOCK_K = 128
# Most tokens one decode-GEMM launch takes. Its column tiles each redo every token's quantization (absmax over
# the whole row, then its K range), work that grows with the batch while the weight stream does not.
DECODE_TOKEN_LIMIT = 64
# Column tiles are this wide, or twice as wide where the output alone has enough of those for every SM.
DECODE_MIN_BLOCK_N = 64
# The narrowest column tile any decode tiling may use (the layer's arrival counters are sized for it).
DECODE_NARROWEST_BLOCK_N = 16
# A split shorter than this many K steps spends more on its absmax pass and fix-up than on streaming.
_MIN_STEPS_PER_SPLIT = 4


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def tiles_for(num_tokens: int, block_k: int) -> Tiles:
    """Tiles for ``num_tokens`` rows; ``block_k`` is the caller's K step (it must divide the scale groups)."""
    if num_tokens <= 16:
        return Tiles(16, 64, block_k, 4, 4)
    if num_tokens <= 32:
        return Tiles(32, 64, block_k, 4, 4)
    if num_tokens <= 64:
        return Tiles(64, 64, block_k, 4, 3)
    return Tiles(128, 128, block_k, 8, 3)


@dataclass(frozen=True)
class DecodeTiles:
    """How the decode GEMM divides an ``N x K`` weight: ``block_n`` output columns per tile, K in ``splits``,
    ``block_k`` features per K step, its warps and pipeline stages, and whether one token takes the GEMV form."""

    block_n: int
    splits: int
    block_k: int = DECODE_BLOCK_K
    num_warps: int = 4
    num_stages: int = 4
    gemv: bool = False


def decode_tiles(out_features: int, in_features: int, num_sms: int) -> DecodeTiles:
    """The decode GEMM's tiling of an ``N x K`` weight for one token, as measured on an H100
    (``benchmarks/fp8_decode_probe.py``, 2026-11-28, Llama-3.1-8B's projections streamed from HBM):

    - Wider K steps than 128 won on every projection (256; 512 for the narrow GEMV below).
    - Outputs wide enough for one 128-wide column tile per SM (gate/up: 224) stream fastest in the GEMV form
      with 8 warps: 45.2 us, 0.48x bf16's time (the byte ratio is 0.5x).
    - Outputs narrow enough for one 32-wide column tile per SM at most (o: 128) too, with 512-wide K steps:
      11.7 us against 14.2 for the best ``tl.dot`` tiling.
    - The others take ``tl.dot`` with 128-wide tiles (q/k/v: 48 tiles, 15.1 us) and few programs: every program
      first repeats the token's absmax and quantization, and a split adds a fix-up, so K is split only until
      there are a quarter as many programs as SMs. Long-K weights (K >= 2N; down) take 64-wide tiles, 8 warps
      and programs for half the SMs (64 x 2 splits: 30.8 us against 35.6 with 4-way splits).
    """
    def k_step(widest: int) -> int:
        step = DECODE_BLOCK_K
        while step < widest and in_features >= 8 * step:  # doubled, K still has 4 steps at least
            step *= 2
        return step

    wide, narrow = 2 * DECODE_MIN_BLOCK_N, DECODE_MIN_BLOCK_N // 2
    long_k = in_features >= 2 * out_features
    if -(-out_features // wide) >= num_sms:
        return DecodeTiles(wide, 1, k_step(256), num_warps=8, num_stages=4, gemv=True)
    if not long_k and -(-out_features // narrow) <= num_sms:
        return DecodeTiles(narrow, 1, k_step(512), num_warps=8, num_stages=4, gemv=True)
    block_k = k_step(256)
    k_steps = -(-in_features // block_k)
    block_n = DECODE_MIN_BLOCK_N if long_k else wide
    column_tiles = -(-out_features // block_n)
    wanted_programs = num_sms // 2 if long_k else num_sms // 4
    splits = 1
    while column_tiles * splits < wanted_programs and k_steps // (2 * splits) >= _MIN_STEPS_PER_SPLIT:
        splits *= 2
    return DecodeTiles(block_n, splits, block_k, num_warps=8 if long_k else 4, num_stages=4)
