"""One sequence's position in its grammar: which tokens may come next, and advancing by the token sampled."""

from __future__ import annotations

from typing import Any

import torch


class SequenceGrammar:
    """Wraps an xgrammar ``GrammarMatcher``; one per sequence, since each sequence samples its own tokens."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (host int32, one bit per token id)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False if the grammar does not allow it (the matcher is then unchanged)."""
        return self.matcher.accept_token(token)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may be generated."""
        return self.matcher.is_terminated()
