"""Which rank this process is and which process groups it talks over: the parallel context models load with.

A multi-rank engine runs one process per rank. Rank ``r`` of a ``tp x pp`` world is tensor-parallel rank
``r % tp`` in pipeline stage ``r // tp``, so the ranks of one stage are neighbours (one node when TP fits a
node; stages may span nodes). Models read the context when they are built (``current_parallel()``, set by
``use_parallel`` around loading) and keep the groups they need; nothing reads it per step.

Three kinds of groups: ``tp``, the ranks of this stage (the all-reduces and gathers inside a forward pass, on
the device backend: NCCL on GPUs, gloo on CPUs); ``world_device``, every rank on the device backend (activations
between stages, sampled tokens from the driver); ``world_cpu``, every rank on gloo (each step's host metadata,
which travels as bytes, never pickled objects).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tfbackend.distributed.comm import CommGroup


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a multi-rank engine (the default: the only rank of a single-process one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index among the ranks of this node: picks the GPU
    local_size: int = 1  # ranks on this node
    tp: CommGroup = field(default_factory=CommGroup)  # the tensor-parallel ranks of this pipeline stage
    pp_rank: int = 0
    pp_size: int = 1
    world_device: CommGroup = field(default_factory=CommGroup)
    world_cpu: dist.ProcessGroup | None = None
    device: torch.device | None = None  # this rank's device; None: the engine's configured device

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler and the sampler; every other rank only runs the model."""
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        """The global rank of tensor-parallel rank ``tp_rank`` in stage ``pp_rank``."""
        return pp_rank * self.tp.size + tp_rank

    def gather_objects(self, value: object) -> list:
        """Every rank's ``value``, by rank (pickled: for setup, never per step)."""
        if self.world_size == 1:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.world_cpu)
        return values

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's ``value`` (each rank calls this with its own)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.world_cpu)
        return int(tensor.item())


SINGLE_PROCESS = ParallelContext()

_current: contextvars.ContextVar[ParallelContext] = contextvars.ContextVar("tfbackend_parallel", default=SINGLE_PROCESS)


def current_parallel() -> ParallelContext:
    """The context of the model being built in this thread (single-process unless ``use_parallel`` says else)."""
    return _current.get()


@contextlib.contextmanager
def use_parallel(context: ParallelContext) -> Iterator[ParallelContext]:
    """Build models inside this block as rank ``context.rank`` of a multi-rank engine."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
