"""Token bitmasks: one bit per token id, 32 ids per int32 word (bit ``i % 32`` of word ``i // 32``).

The host fills one ``[rows, ceil(V / 32)]`` mask per step from the sequences' matchers; it reaches the
device in one copy and is expanded and applied there, so masking costs no host round trip per sequence.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tfbackend.structured_output.grammar import SequenceGrammar


def fill_token_bitmask(grammars: list[SequenceGrammar | None], vocab_size: int) -> torch.Tensor:
    """One row per sampled sequence: its grammar's allowed next tokens, or every token (no grammar)."""
    bitmask = torch.full((len(grammars), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    rows = [row for row, grammar in enumerate(grammars) if grammar is not None]
    if len(rows) > 1:
        _batch_matcher().batch_fill_next_token_bitmask([grammars[row].matcher for row in rows], bitmask, rows)
    elif rows:
        grammars[rows[0]].fill_bitmask(bitmask, rows[0])
    return bitmask


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[N, V]`` with every token that ``bitmask`` ``[N, ceil(V / 32)]`` (on the same device)
    forbids at -inf.

    The int32 words are read as little-endian bytes and each byte is spread into 8 booleans: one ``[N, V]``
    intermediate and one ``where``, never a loop over rows or tokens.
    """
    vocab_size = logits.shape[-1]
    bits = (1 << torch.arange(8, device=logits.device)).to(torch.uint8)
    as_bytes = bitmask.contiguous().view(torch.uint8)  # byte b holds tokens 8b .. 8b + 7, lowest bit first
    allowed = ((as_bytes[:, :, None] & bits) != 0).flatten(1)[:, :vocab_size]
    return torch.where(allowed, logits, float("-inf"))


@functools.cache
def _batch_matcher():
    """xgrammar's thread-pooled mask filler, shared by every step."""
    import xgrammar

    return xgrammar.BatchGrammarMatcher()
