"""The attention backend interface and the per-step metadata every backend reads.

A step is one flattened batch of T tokens: prefill chunks and decodes of B sequences laid end to end, no
padding. Sequence b owns query rows ``query_start_loc[b]:query_start_loc[b+1]``; its keys are the first
``seq_lens[b]`` tokens in its KV blocks (cached prefix plus this step's new tokens, which are written to
the cache before attention runs). The last query row of a sequence therefore sits at position
``seq_lens[b] - 1`` and causality follows from that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32: keys per sequence after this step's tokens are written
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical block ids, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so a backend that loops over sequences never synchronises with the device.
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass(frozen=True)
class LayerAttentionOptions:
    """What a layer asks of attention beyond Q, K and V (as the model's attention call passes it)."""

    scale: float
    sliding_window: int | None = None  # query i sees key j iff i - j < sliding_window
    softcap: float | None = None  # scores -> tanh(scores / softcap) * softcap before softmax
    sinks: torch.Tensor | None = None  # [H_q] extra per-head logit in the softmax denominator


class AttentionBackend(ABC):
    """Writes new K/V into a layer's paged cache and attends over it.

    Caches are laid out ``[num_blocks, block_size, num_kv_heads, head_dim]`` (key and value may have
    different head dims). Implementations must give the same result as ``TorchAttentionBackend``, the
    reference, up to floating-point rounding.
    """

    name: str = "abstract"

    @abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,  # [T, H_kv, D_k]
        value: torch.Tensor,  # [T, H_kv, D_v]
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T]; a negative slot means "do not store"
    ) -> None:
        """Store each token's key and value at its slot."""

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,  # [T, H_q, D_k]
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        options: LayerAttentionOptions,
    ) -> torch.Tensor:  # [T, H_q, D_v]
        """Causal attention of each query row over its sequence's cached keys."""
