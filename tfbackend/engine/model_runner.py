"""Runs one scheduled step: flattens it into model inputs and attention metadata, calls the model, samples.

The step is one batch of T tokens with no padding: each sequence contributes its next chunk (a prefill
chunk or one decode token). Logits are computed only for the last token of sequences whose chunk
reaches their end; partial prefill chunks sample nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from tfbackend.attention import AttentionBackend, AttentionMetadata, ForwardContext, forward_context
from tfbackend.engine.sampler import Sampler, SamplerOutput
from tfbackend.engine.scheduler import ScheduledBatch
from tfbackend.engine.sequence import Sequence
from tfbackend.kv_cache import KVCache


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        attention_backend: AttentionBackend,
        sampler: Sampler,
        device: torch.device,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.attention_backend = attention_backend
        self.sampler = sampler
        self.device = device
        self.block_size = kv_cache.spec.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Host-side flattening of the step; one copy of each array to the device."""
        bs = self.block_size
        input_ids, positions, slots = [], [], []
        query_start_loc, seq_lens, logits_rows = [0], [], []
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = np.zeros((len(batch), max_blocks), dtype=np.int32)
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + num_new
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_tables[i, : len(table)] = table
            pos = np.arange(start, end, dtype=np.int64)
            input_ids.extend(seq.token_ids[start:end])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(end)
            if end == seq.num_tokens:
                logits_rows.append(query_start_loc[-1] - 1)
        to_device = self._to_device
        metadata = AttentionMetadata(
            slot_mapping=to_device(np.concatenate(slots)),
            query_start_loc=to_device(np.asarray(query_start_loc, dtype=np.int32)),
            seq_lens=to_device(np.asarray(seq_lens, dtype=np.int32)),
            block_tables=to_device(block_tables),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            query_start_loc_host=query_start_loc,
            seq_lens_host=seq_lens,
        )
        return (
            to_device(np.asarray(input_ids, dtype=np.int64)),
            to_device(np.concatenate(positions)),
            metadata,
            logits_rows,
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run the step; return the sequences that sampled a token and what they sampled."""
        input_ids, positions, metadata, logits_rows = self.prepare(batch)
        context = ForwardContext(metadata, self.kv_cache.layers, self.attention_backend)
        with forward_context(context):
            hidden = self.model(input_ids, positions)
        sampling_seqs = [
            seq for seq, n in zip(batch.seqs, batch.num_new_tokens) if seq.num_computed_tokens + n == seq.num_tokens
        ]
        if not sampling_seqs:
            return [], None
        rows = torch.tensor(logits_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        return sampling_seqs, self.sampler(logits, sampling_seqs)
