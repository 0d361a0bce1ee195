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


def fill_token_bitmask(grammars: list[SequenceGrammar], vocab_size: int) -> torch.Tensor:
    """The next-token masks of ``grammars``, one row each, as a host int32 tensor."""
    bitmask = torch.full((len(grammars), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    if len(grammars) > 1:
        _batch_matcher().batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)
    else:
        grammars[0].fill_bitmask(bitmask, 0)
    return bitmask


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` with the tokens that ``bitmask`` (on the device, one row per entry of ``rows``) forbids at -inf.

    The int32 words are read as little-endian bytes and each byte is spread into 8 booleans: a ``[rows, V]``
    uint8 intermediate, never a per-token loop.
    """
    vocab_size = logits.shape[-1]
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [R, W * 4], token 8b + i is bit i of byte b
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    allowed = ((as_bytes[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab_size].bool()
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


@functools.cache
def _batch_matcher():
    """xgrammar's thread-pooled mask filler, shared by every step."""
    import xgrammar

    return xgrammar.BatchGrammarMatcher()
