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
# Target occupancy: enough programs that each SM streams weight while another of its programs computes.
_DECODE_PROGRAMS_PER_SM = 2
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
    """How the decode GEMM divides an ``N x K`` weight: ``block_n`` output columns per tile, K in ``splits``."""

    block_n: int
    splits: int


def decode_tiles(out_features: int, in_features: int, num_sms: int) -> DecodeTiles:
    """About ``_DECODE_PROGRAMS_PER_SM`` programs per SM: 128-wide column tiles when N alone has one per SM
    (Llama-8B's gate/up: 224), else 64-wide ones with K split to make up the count (a 4096 x 4096 weight: 64
    tiles x 4 splits). Split K rather than narrow the tiles: every tile repeats the tokens' quantization."""
    wide = 2 * DECODE_MIN_BLOCK_N
    block_n = wide if -(-out_features // wide) >= num_sms else DECODE_MIN_BLOCK_N
    column_tiles = -(-out_features // block_n)
    k_steps = -(-in_features // DECODE_BLOCK_K)
    wanted = (_DECODE_PROGRAMS_PER_SM * num_sms + column_tiles // 2) // column_tiles
    return DecodeTiles(block_n, max(1, min(wanted, k_steps // _MIN_STEPS_PER_SPLIT)))
