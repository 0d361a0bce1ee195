"""Runs one scheduled step: flattens it into model inputs and attention metadata, calls the model, samples.

The step is one batch of T tokens with no padding: each sequence contributes its next chunk (a prefill
chunk or one decode token). Logits are computed only for the last token of sequences whose chunk
reaches their end; partial prefill chunks sample nothing. On CUDA, steps of one token per sequence replay
a captured CUDA graph when one fits (``cuda_graphs.py``); every other step runs the model eagerly.

The flattening is vectorised with numpy, so a 256-sequence step costs a few hundred microseconds of Python
rather than a loop per token, and its arrays reach the GPU through pinned memory with non-blocking copies.
``launch`` queues a step without waiting for the GPU; only ``PendingStep.fetch`` waits, for the sampled
tokens of that step alone, which lets the engine prepare the next step meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from tfbackend.attention import AttentionBackend, AttentionMetadata, ForwardContext, forward_context
from tfbackend.distributed import SINGLE_PROCESS, ParallelContext
from tfbackend.distributed.pipeline import StageLinks
from tfbackend.engine.cuda_graphs import CUDAGraphRunner
from tfbackend.engine.device import resolve_placeholders, upload
from tfbackend.engine.sampler import Sampler, SamplerOutput
from tfbackend.engine.scheduler import ScheduledBatch
from tfbackend.engine.sequence import Sequence
from tfbackend.kv_cache import KVCache
from tfbackend.sampling_params import SamplingParams


@dataclass
class StepInputs:
    """One step flattened on the host, before anything is copied to the device."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32, padded with 0
    sampled: np.ndarray  # [B] bool: the sequence's chunk reaches its end, so it samples a token
    logits_rows: np.ndarray  # [N] int64: the token row of each sampling sequence's last token
    max_query_len: int
    seq_ids: list[int]  # the engine's id of each sequence

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class PendingStep:
    """A launched step whose sampled tokens are still on the device.

    Their copy to the host is queued right behind the sampling, so ``fetch`` waits for this step alone: a
    plain ``tokens.tolist()`` would also wait for every step queued after it.
    """

    def __init__(
        self, seqs: list[Sequence], tokens: torch.Tensor, raw_logits: torch.Tensor | None, sampler: Sampler
    ):
        self.seqs = seqs  # the sequences that sample, in row order
        self.tokens = tokens  # [N] sampled ids, on the device
        self.raw_logits = raw_logits  # for logprobs; None when no row asked for them
        self.sampler = sampler
        self.ready: torch.cuda.Event | None = None
        if tokens.is_cuda:
            self.host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host_tokens.copy_(tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host_tokens = tokens

    def fetch(self) -> SamplerOutput:
        """Wait for the step and bring its tokens (and logprobs, where asked for) to the host."""
        if self.ready is not None:
            self.ready.synchronize()
        logprobs = self.sampler.gather_logprobs(self.raw_logits, self.tokens, self.seqs)
        return SamplerOutput(self.host_tokens.tolist(), logprobs)


def flatten_step(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """Host-side flattening of a scheduled step into the arrays the model and attention read."""
    seqs, num_seqs = batch.seqs, len(batch.seqs)
    query_lens = np.array(batch.num_new_tokens, dtype=np.int64)
    computed = np.fromiter((seq.num_computed_tokens for seq in seqs), np.int64, num_seqs)
    seq_lens = computed + query_lens
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    max_query_len = int(query_lens.max())

    if max_query_len == 1:  # decode-only: one token per sequence, the common step when batches are large
        seq_of_token = np.arange(num_seqs)
        positions = computed
        input_ids = np.fromiter((seq.token_ids[seq.num_computed_tokens] for seq in seqs), np.int64, num_seqs)
    else:
        seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
        positions = np.arange(num_tokens) - query_start_loc[seq_of_token] + computed[seq_of_token]
        starts = computed.tolist()
        chunks = (seq.token_ids[start : start + n] for seq, start, n in zip(seqs, starts, batch.num_new_tokens))
        input_ids = np.fromiter(chain.from_iterable(chunks), np.int64, num_tokens)

    table_lens = np.fromiter((len(seq.block_table) for seq in seqs), np.int64, num_seqs)
    block_tables = np.zeros((num_seqs, int(table_lens.max())), dtype=np.int32)
    in_table = np.arange(block_tables.shape[1]) < table_lens[:, None]  # row-major, like the flattened tables
    all_blocks = chain.from_iterable(seq.block_table for seq in seqs)
    block_tables[in_table] = np.fromiter(all_blocks, np.int32, int(table_lens.sum()))
    blocks = block_tables[seq_of_token, positions // block_size].astype(np.int64)
    slot_mapping = blocks * block_size + positions % block_size

    sampled = seq_lens == np.fromiter((seq.num_tokens for seq in seqs), np.int64, num_seqs)
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc.astype(np.int32),
        seq_lens=seq_lens.astype(np.int32),
        block_tables=block_tables,
        sampled=sampled,
        logits_rows=query_start_loc[1:][sampled] - 1,
        max_query_len=max_query_len,
        seq_ids=[seq.seq_id for seq in seqs],
    )


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return upload(torch.from_numpy(array), device)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        attention_backend: AttentionBackend,
        sampler: Sampler | None,
        device: torch.device,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        parallel: ParallelContext = SINGLE_PROCESS,
        stages: StageLinks | None = None,
        send_step: Callable[[StepInputs, torch.Tensor | None], None] | None = None,
    ):
        """``forward`` replaces ``model`` for the forward pass (e.g. a compiled one); logits still come from
        ``model.compute_logits``.

        Several ranks: every rank has a runner and runs each step's ``run_model``; only the driver's launches
        steps (``send_step`` hands each to the other ranks first) and samples (``sampler``; None elsewhere).
        ``stages`` moves activations and logits between pipeline stages.
        """
        self.model = model
        self.forward = forward if forward is not None else model
        self.kv_cache = kv_cache
        self.attention_backend = attention_backend
        self.sampler = sampler
        self.device = device
        self.block_size = kv_cache.spec.block_size
        self.cuda_graphs: CUDAGraphRunner | None = None
        self.parallel = parallel
        self.stages = stages
        self.send_step = send_step

    def capture_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        """From now on, decode steps of up to ``max_batch_size`` sequences replay captured graphs."""
        with torch.inference_mode():  # static inputs as inference tensors, like eager steps' (one compilation)
            graphs = CUDAGraphRunner(
                self.forward, self.kv_cache, self.attention_backend, max_batch_size, max_model_len
            )
            graphs.capture()
        self.cuda_graphs = graphs

    def release_cuda_graphs(self) -> None:
        """Back to eager steps, the graphs freed (before a multi-rank engine leaves its process groups)."""
        if self.cuda_graphs is not None:
            self.cuda_graphs.release()
            self.cuda_graphs = None

    def prepare(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's device inputs and attention metadata, for an eager forward."""
        metadata = AttentionMetadata(
            slot_mapping=to_device(step.slot_mapping, self.device),
            query_start_loc=to_device(step.query_start_loc, self.device),
            seq_lens=to_device(step.seq_lens, self.device),
            block_tables=to_device(step.block_tables, self.device),
            max_query_len=step.max_query_len,
            max_seq_len=int(step.seq_lens.max()),
            query_start_loc_host=step.query_start_loc.tolist(),
            seq_lens_host=step.seq_lens.tolist(),
            seq_ids_host=step.seq_ids,
        )
        return to_device(step.input_ids, self.device), to_device(step.positions, self.device), metadata

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: PendingStep | None = None) -> PendingStep | None:
        """Queue the step's forward and sampling on the device without waiting for them.

        Input ids that are placeholders (``device.placeholder``) are tokens ``previous`` sampled; the device
        takes them from its samples. Returns None when no sequence samples in this step.
        """
        step = flatten_step(batch, self.block_size)
        pending_tokens = None
        if step.input_ids.min() < 0:
            assert previous is not None, "placeholder input ids need the step that samples them"
            pending_tokens = previous.tokens
        if self.send_step is not None:
            self.send_step(step, pending_tokens)
        logits = self.run_model(step, pending_tokens)
        if logits is None:
            return None
        sampling_seqs = [seq for seq, sampled in zip(batch.seqs, step.sampled.tolist()) if sampled]
        tokens, raw_logits = self.sampler.sample_on_device(logits, sampling_seqs)
        return PendingStep(sampling_seqs, tokens, raw_logits, self.sampler)

    @torch.inference_mode()
    def run_model(self, step: StepInputs, pending_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """This rank's part of a step: the forward pass and, on the last pipeline stage, the logits of the
        sampling rows. Returns those logits on the driver; None on other ranks or when no row samples."""
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(step):
            hidden = self.cuda_graphs.run(step, pending_tokens)
        else:
            input_ids, positions, metadata = self.prepare(step)
            if pending_tokens is not None:
                input_ids = resolve_placeholders(input_ids, pending_tokens)
            with forward_context(ForwardContext(metadata, self.kv_cache, self.attention_backend)):
                if self.stages is None:
                    hidden = self.forward(input_ids, positions)
                else:
                    hidden = self.forward(input_ids, positions, self.stages.receive(step.num_tokens))
            if self.stages is not None and not self.parallel.is_last_stage:
                self.stages.send(hidden)
                hidden = None
        num_rows = len(step.logits_rows)
        if num_rows == 0:
            return None
        logits = None
        if hidden is not None:
            if num_rows < step.num_tokens:  # else every row is sampled, in order (a decode step)
                hidden = hidden[to_device(step.logits_rows, self.device)]
            logits = self.model.compute_logits(hidden)
        if self.stages is not None:
            return self.stages.exchange_logits(logits, num_rows)
        return logits if self.parallel.is_driver else None

    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run the step to the end; return the sequences that sampled a token and what they sampled."""
        pending = self.launch(batch)
        if pending is None:
            return [], None
        return pending.seqs, pending.fetch()

    def profile_run(self, num_tokens: int, num_seqs: int, max_model_len: int) -> None:
        """Run the largest step the scheduler can form, to measure peak memory.

        ``num_tokens`` tokens are split over ``num_seqs`` prefills that all sample with top-k and top-p (the
        sampler's costliest path). Every block table points at block 0, so the KV cache may be one block.
        """
        num_seqs = min(num_tokens, max(num_seqs, -(-num_tokens // max_model_len)))
        lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=1)
        seqs = []
        for i, n in enumerate(lengths):
            seq = Sequence(i, "profile", 0, [0] * n, n, params)
            seq.block_table = [0] * -(-n // self.block_size)
            seqs.append(seq)
        self.execute(ScheduledBatch(seqs, lengths))
