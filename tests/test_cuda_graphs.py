"""Host-side logic of the CUDA-graph decode path, on the CPU: step flattening, batch sizes, padding."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from tfbackend.engine.cuda_graphs import CUDAGraphRunner, graph_batch_sizes
from tfbackend.engine.device import placeholder
from tfbackend.engine.model_runner import flatten_step
from tfbackend.engine.scheduler import ScheduledBatch
from tfbackend.engine.sequence import Sequence
from tfbackend.kv_cache import KVCache, KVCacheSpec
from tfbackend.model_interface import AttentionLayerSpec
from tfbackend.sampling_params import SamplingParams

BLOCK = 4


def sequence(seq_id: int, tokens: list[int], computed: int, blocks: list[int]) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), 0, list(tokens), len(tokens), SamplingParams())
    seq.num_computed_tokens = computed
    seq.block_table = list(blocks)
    return seq


def test_flatten_mixed_step():
    prefill = sequence(0, list(range(10, 20)), computed=4, blocks=[7, 3, 9])  # positions 4..9, reaches its end
    decode = sequence(1, [5, 6, 7, 8, 9], computed=4, blocks=[2, 5])  # position 4
    partial = sequence(2, [1, 2, 3, 4, 5, 6], computed=0, blocks=[1])  # positions 0..2, samples nothing
    step = flatten_step(ScheduledBatch([prefill, decode, partial], [6, 1, 3]), BLOCK)
    assert step.input_ids.tolist() == [14, 15, 16, 17, 18, 19, 9, 1, 2, 3]
    assert step.positions.tolist() == [4, 5, 6, 7, 8, 9, 4, 0, 1, 2]
    assert step.slot_mapping.tolist() == [12, 13, 14, 15, 36, 37, 20, 4, 5, 6]
    assert step.query_start_loc.tolist() == [0, 6, 7, 10]
    assert step.seq_lens.tolist() == [10, 5, 3]
    assert step.block_tables.tolist() == [[7, 3, 9], [2, 5, 0], [1, 0, 0]]
    assert step.sampled.tolist() == [True, True, False]
    assert step.logits_rows.tolist() == [5, 6]
    assert step.max_query_len == 6


def test_graph_batch_sizes():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 16, 32, *range(48, 257, 16)]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(300)[-3:] == [256, 288, 300]


def test_run_pads_the_batch_with_rows_that_store_nothing():
    kv_cache = KVCache(KVCacheSpec((AttentionLayerSpec(1, 4, 4),), torch.float32, BLOCK), 16, torch.device("cpu"))
    runner = CUDAGraphRunner(lambda ids, pos: None, kv_cache, SimpleNamespace(name="triton"), 8, max_model_len=32)
    replayed = []
    for size in runner.batch_sizes:  # stand-ins for captured graphs
        runner.graphs[size] = SimpleNamespace(replay=lambda size=size: replayed.append(size))
        runner.outputs[size] = torch.arange(size).float()[:, None]
    runner.slot_mapping.fill_(99)  # stale rows of an earlier, larger batch
    runner.seq_lens.fill_(99)
    seqs = [sequence(i, [1, 2, 3, placeholder(2 - i)], computed=3, blocks=[4 + i]) for i in range(3)]
    step = flatten_step(ScheduledBatch(seqs, [1, 1, 1]), BLOCK)
    hidden = runner.run(step, pending_tokens=torch.tensor([50, 51, 52]))
    assert replayed == [4] and hidden.shape[0] == 3
    assert runner.input_ids[:4].tolist() == [52, 51, 50, 0]  # placeholders resolved on the device
    assert runner.positions[:4].tolist() == [3, 3, 3, 0]
    assert runner.slot_mapping[:4].tolist() == [19, 23, 27, -1]  # the padding row writes nothing
    assert runner.seq_lens[:4].tolist() == [4, 4, 4, 1]  # and attends to one key of block 0
    assert runner.block_tables[:4, :1].tolist() == [[4], [5], [6], [0]]
    assert np.array_equal(runner.query_start_loc[:5].numpy(), np.arange(5))
