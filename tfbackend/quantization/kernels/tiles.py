"""Tile sizes shared by the quantized GEMMs, chosen from the number of tokens alone.

A decode step multiplies a handful of rows by a large weight: short, wide tiles keep every SM busy streaming
the weight. A prefill is a real matrix product: square tiles and more warps reuse each loaded weight tile
across many rows.
"""

from __future__ import annotations

from typing import NamedTuple


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
