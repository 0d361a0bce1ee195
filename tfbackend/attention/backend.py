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
    # The engine's id of each sequence, for models that keep per-sequence state of their own (the compat tier).
    seq_ids_host: list[int] | None = None

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
    chunk_size: int | None = None  # query i sees key j iff i // chunk_size == j // chunk_size (and j <= i)


class AttentionBackend(ABC):
    """Writes new K/V into a layer's paged cache and attends over it.

    Caches are laid out ``[num_blocks, block_size, num_kv_heads, head_dim]`` (key and value may have
    different head dims). Implementations must give the same result as ``TorchAttentionBackend``, the
    reference, up to floating-point rounding. A cache may be FP8 (E4M3): entries are stored as
    ``key / k_scale`` and ``value / v_scale`` (saturated to ±448) and read back multiplied by the scale.
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
        k_scale: float = 1.0,
        v_scale: float = 1.0,
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
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [T, H_q, D_v]
        """Causal attention of each query row over its sequence's cached keys."""


def metadata_for_chunks(
    starts: list[int], query_lens: list[int], block_tables: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, AttentionMetadata]:
    """``(positions[T], metadata)`` for a step where sequence b appends ``query_lens[b]`` tokens at positions
    ``starts[b]...`` into the blocks of ``block_tables[b]`` (for tools and load checks; the runner builds
    its steps vectorised on the host)."""
    device = block_tables.device
    seq_lens = [start + n for start, n in zip(starts, query_lens)]
    query_start_loc = [0]
    for n in query_lens:
        query_start_loc.append(query_start_loc[-1] + n)
    positions = torch.cat([torch.arange(start, end) for start, end in zip(starts, seq_lens)]).to(device)
    seq_index = torch.repeat_interleave(torch.arange(len(starts)), torch.tensor(query_lens)).to(device)
    slots = block_tables[seq_index, positions // block_size].long() * block_size + positions % block_size
    metadata = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_host=query_start_loc,
        seq_lens_host=seq_lens,
        seq_ids_host=list(range(len(starts))),  # sequence b is sequence b of every such step
    )
    return positions, metadata
