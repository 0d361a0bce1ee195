"""How much memory the KV cache gets: a fixed budget on CPU, what a profiled largest step leaves on GPU."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tfbackend.config import EngineConfig
from tfbackend.kv_cache import KVCacheSpec, num_blocks_for_budget
from tfbackend.model_interface import SequenceStateSpec

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# Kept free for the CUDA graphs' memory pool, allocated after the KV cache. Decode activations are small
# (hidden states of at most max_num_seqs tokens); capture logs what the pool really took.
CUDA_GRAPH_MEMORY_RESERVE = 512 << 20


def kv_cache_budget(
    config: EngineConfig,
    device: torch.device,
    use_cuda_graphs: bool,
    run_largest_step: Callable[[], None],
    full_batch_bytes: int,
) -> int:
    """Bytes for the KV cache: ``kv_cache_memory`` when set; on CPU a fixed default, or less when
    ``full_batch_bytes`` (``max_num_seqs`` sequences of ``max_model_len`` tokens) is less; on GPU what
    ``gpu_memory_utilization`` of the GPU leaves after the peak of ``run_largest_step`` (weights, activations,
    sampler temporaries), other processes' memory and the CUDA graphs' pool."""
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type != "cuda":
        return min(DEFAULT_CPU_KV_CACHE_BYTES, full_batch_bytes)
    peak = profile_peak_memory(device, run_largest_step)
    free, total = torch.cuda.mem_get_info(device)
    used_elsewhere = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
    graphs = CUDA_GRAPH_MEMORY_RESERVE if use_cuda_graphs else 0
    budget = int(total * config.gpu_memory_utilization) - used_elsewhere - peak - graphs
    logger.info(
        "GPU memory: %.2f GiB total, %.2f GiB used elsewhere, peak of the largest step %.2f GiB, "
        "CUDA graph reserve %.2f GiB -> KV cache %.2f GiB",
        total / 2**30, used_elsewhere / 2**30, peak / 2**30, graphs / 2**30, budget / 2**30,
    )
    if budget <= 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache at gpu_memory_utilization="
            f"{config.gpu_memory_utilization} (largest step peaks at {peak / 2**30:.2f} GiB): raise it, "
            f"or lower max_num_batched_tokens / max_num_seqs"
        )
    return budget


def profile_peak_memory(device: torch.device, run_largest_step: Callable[[], None]) -> int:
    """Peak allocated bytes while ``run_largest_step`` runs; its cached blocks are handed back afterwards."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_largest_step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()  # hand the activations' cached blocks back, for the KV cache's one allocation
    return peak


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int  # KV blocks of the paged cache (for a model without one: token bookkeeping only)
    max_num_seqs: int  # sequences that may run at once


def plan_cache(
    config: EngineConfig,
    spec: KVCacheSpec,
    state: SequenceStateSpec | None,
    max_model_len: int,
    budget_for: Callable[[int], int],
) -> CachePlan:
    """Blocks and concurrent sequences for a memory budget (``budget_for(bytes a full batch would need)``).

    A model with a paged cache gets as many blocks as the budget holds, up to what ``max_num_seqs`` sequences
    of ``max_model_len`` tokens can use (a small model on a large GPU would otherwise get tens of millions of
    blocks that the scheduler can never fill, and the block manager would spend minutes listing them). A
    model that keeps its sequences' state itself (``state``) gets as many sequences as fit if every one
    reached ``max_model_len`` (its rows are padded to the longest), and blocks only to count their tokens.
    """
    blocks_per_seq = -(-max_model_len // spec.block_size)
    if state is None:
        full_batch_blocks = config.max_num_seqs * blocks_per_seq
        num_blocks = num_blocks_for_budget(spec, budget_for(full_batch_blocks * spec.bytes_per_block), max_model_len)
        if num_blocks > full_batch_blocks:
            logger.info("KV cache capped at %d blocks: all that %d sequences of %d tokens can use (the budget "
                        "held %d)", full_batch_blocks, config.max_num_seqs, max_model_len, num_blocks)
        return CachePlan(min(num_blocks, full_batch_blocks), config.max_num_seqs)
    per_sequence = state.sequence_bytes(max_model_len)
    budget = budget_for(config.max_num_seqs * per_sequence)
    max_num_seqs = min(config.max_num_seqs, budget // max(per_sequence, 1), state.max_sequences or config.max_num_seqs)
    if max_num_seqs < 1:
        raise ValueError(
            f"one sequence of max_model_len={max_model_len} needs {per_sequence / 2**20:.1f} MiB of model state, "
            f"more than the {budget / 2**20:.1f} MiB budget: raise the KV cache memory or lower max_model_len"
        )
    return CachePlan(max_num_seqs * blocks_per_seq, max_num_seqs)
