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


def decode_tiles(out_features: int, in_features: int, num_sms: int, scale_block_k: int | None = None) -> DecodeTiles:
    """The decode GEMM's tiling of an ``N x K`` weight for one token whose scales change every ``scale_block_k``
    input features (None: constant along K), as measured on an H100
    (``benchmarks/fp8_decode_probe.py``, 2026-11-28, Llama-3.1-8B's projections streamed from HBM):

    - Wider K steps than 128 won on every projection.
    - The GEMV form wins everywhere but on long-K weights. Outputs wide enough for one 128-wide column tile per
      SM (gate/up: 224) take 128-wide tiles and 8 warps: 45.2 us, 0.48x bf16's time (the byte ratio is 0.5x).
      Outputs of at most one 32-wide tile per SM (o: 128) take those with 512-wide K steps: 11.7-12.4 us against
      14.2 for the best ``tl.dot`` tiling. Outputs in between (q/k/v: 6144) take 64-wide tiles, K split until
      there are two programs per SM (96 x 4): 12.9 us against 15.3 with ``tl.dot``.
    - Long-K weights (K >= 2N; down) take ``tl.dot`` with 64-wide tiles, 8 warps and K split until there are
      programs for half the SMs (64 x 2 splits: 30.8 us against 35.6 with 4-way splits).
    """
    def k_step(widest: int) -> int:
        step = DECODE_BLOCK_K
        # Doubled while K still has 4 steps at least and a step does not straddle two scale blocks.
        while step < widest and in_features >= 8 * step and (scale_block_k is None or scale_block_k % (2 * step) == 0):
            step *= 2
        return step

    def splits_for(column_tiles: int, block_k: int, wanted_programs: int) -> int:
        splits, k_steps = 1, -(-in_features // block_k)
        while column_tiles * splits < wanted_programs and k_steps // (2 * splits) >= _MIN_STEPS_PER_SPLIT:
            splits *= 2
        return splits

    wide, narrow = 2 * DECODE_MIN_BLOCK_N, DECODE_MIN_BLOCK_N // 2
    if -(-out_features // wide) >= num_sms:
        return DecodeTiles(wide, 1, k_step(256), num_warps=8, num_stages=4, gemv=True)
    if in_features >= 2 * out_features:
        block_k = k_step(256)
        splits = splits_for(-(-out_features // DECODE_MIN_BLOCK_N), block_k, num_sms // 2)
        return DecodeTiles(DECODE_MIN_BLOCK_N, splits, block_k, num_warps=8, num_stages=4)
    if -(-out_features // narrow) <= num_sms:
        return DecodeTiles(narrow, 1, k_step(512), num_warps=8, num_stages=4, gemv=True)
    block_k = k_step(256)
    splits = splits_for(-(-out_features // DECODE_MIN_BLOCK_N), block_k, 2 * num_sms)
    return DecodeTiles(DECODE_MIN_BLOCK_N, splits, block_k, num_warps=4, num_stages=4, gemv=True)
