"""Pipeline parallelism: which decoder layers a stage holds, and how a step's tensors move between stages.

Each step runs the stages one after the other (no micro-batches in flight): stage s receives the previous
stage's activations from the rank with the same tensor-parallel index in stage s - 1, runs its layers and
sends its own on; the last stage computes the logits of the sampling rows, and its first tensor-parallel rank
sends them to the driver (rank 0, in stage 0), which samples. Transfers are point-to-point on the device
group (NCCL send/recv on GPUs), in the order every rank takes its steps, so no message needs a header.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tfbackend.distributed.state import ParallelContext
from tfbackend.model_interface import IntermediateTensors


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """The decoder layers of stage ``pp_rank``: an even split, the last stages taking one more when
    ``num_layers`` does not divide (the first stage also runs the embedding, the last the LM head)."""
    if num_layers < pp_size:
        raise ValueError(
            f"{num_layers} decoder layers cannot be split into {pp_size} pipeline stages: "
            f"use a pipeline_parallel_size of at most {num_layers}"
        )
    base, extra = divmod(num_layers, pp_size)
    first_long = pp_size - extra  # stages from this index on hold base + 1 layers
    start = pp_rank * base + max(0, pp_rank - first_long)
    return range(start, start + base + (pp_rank >= first_long))


class StageLinks:
    """The point-to-point transfers of one rank's steps: activations in and out, logits to the driver."""

    def __init__(self, parallel: ParallelContext, widths: dict[str, int], dtype: torch.dtype, device: torch.device,
                 vocab_size: int):
        self.parallel = parallel
        self.widths = widths
        self.dtype, self.device = dtype, device
        self.vocab_size = vocab_size
        self.group = parallel.world_device.group
        tp_rank = parallel.tp.rank
        self.previous = None if parallel.is_first_stage else parallel.rank_of(parallel.pp_rank - 1, tp_rank)
        self.next = None if parallel.is_last_stage else parallel.rank_of(parallel.pp_rank + 1, tp_rank)
        self.logits_source = parallel.rank_of(parallel.pp_size - 1, 0)  # sends the logits to the driver

    def receive(self, num_tokens: int) -> IntermediateTensors | None:
        """The previous stage's activations for a step of ``num_tokens`` tokens (None on the first stage)."""
        if self.previous is None:
            return None
        tensors = {}
        for name, width in self.widths.items():
            tensors[name] = torch.empty(num_tokens, width, dtype=self.dtype, device=self.device)
            dist.recv(tensors[name], src=self.previous, group=self.group)
        return tensors

    def send(self, tensors: IntermediateTensors) -> None:
        if self.next is None:
            raise RuntimeError("the last pipeline stage has nobody to send activations to")
        if set(tensors) != set(self.widths):
            raise RuntimeError(f"a stage produced {sorted(tensors)}, the model declared {sorted(self.widths)}")
        for name in self.widths:
            dist.send(tensors[name].contiguous(), dst=self.next, group=self.group)

    def exchange_logits(self, logits: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
        """Bring the last stage's logits (float32, ``[num_rows, vocab]``) to the driver; None on other ranks."""
        parallel = self.parallel
        if parallel.is_driver:
            received = torch.empty(num_rows, self.vocab_size, dtype=torch.float32, device=self.device)
            dist.recv(received, src=self.logits_source, group=self.group)
            return received
        if parallel.rank == self.logits_source:
            if logits.shape != (num_rows, self.vocab_size):
                raise RuntimeError(f"logits of shape {tuple(logits.shape)}, expected ({num_rows}, {self.vocab_size})")
            dist.send(logits.float().contiguous(), dst=0, group=self.group)
        return None
