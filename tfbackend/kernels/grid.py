"""The order in which a 2-D GEMM grid's programs take their output tiles, shared by every Triton GEMM here."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_row_tiles, num_col_tiles, GROUP_M: tl.constexpr):
    """The (row tile, column tile) of program ``pid``: programs walk ``GROUP_M`` row tiles per column tile
    before moving on, so neighbouring programs share weight tiles in L2."""
    pids_per_group = GROUP_M * num_col_tiles
    first_row_tile = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_row_tiles - first_row_tile, GROUP_M)
    row_tile = first_row_tile + (pid % pids_per_group) % group_rows
    col_tile = (pid % pids_per_group) // group_rows
    return row_tile, col_tile
