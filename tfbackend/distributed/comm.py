"""Collectives inside a forward pass, written so that torch.compile traces them and CUDA graphs capture them.

All-reduce and all-gather go through PyTorch's functional collective ops (``torch.ops._c10d_functional``):
dynamo and inductor know them (a compiled model stays one graph, collectives included) and on NCCL they are
plain kernels on the stream, which graph capture records. Each op is followed by its ``wait_tensor`` at once,
so eager code gets an ordinary tensor (``torch.distributed._functional_collectives`` would hand back a lazy
wrapper subclass, which HF modules should never see). Groups are referred to by name, a string that traces as
a constant. All-reduces of CUDA tensors go through ``peer_all_reduce``'s op, which takes peer memory for small
messages where the group has it and NCCL otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tfbackend.distributed import peer_all_reduce

_ops = torch.ops._c10d_functional


@dataclass(frozen=True)
class CommGroup:
    """A group of ranks and the collectives over it; with one rank every collective is the identity."""

    rank: int = 0  # this process's index in the group
    size: int = 1
    group: dist.ProcessGroup | None = None
    name: str = ""  # the group's registered name, for the functional ops
    ranks: tuple[int, ...] = (0,)  # global ranks of the members, by group index

    @classmethod
    def of(cls, group: dist.ProcessGroup, ranks: list[int]) -> CommGroup:
        return cls(dist.get_rank(group), dist.get_world_size(group), group, group.group_name, tuple(ranks))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``x``."""
        if self.size == 1:
            return x
        if x.is_cuda:
            return peer_all_reduce.peer_all_reduce(x.contiguous(), self.name)
        return _ops.wait_tensor(_ops.all_reduce(x.contiguous(), "sum", self.name))

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in rank order."""
        if self.size == 1:
            return x
        gathered = _ops.wait_tensor(_ops.all_gather_into_tensor(x.contiguous(), self.size, self.name))
        if dim in (0, -x.dim()):
            return gathered
        return torch.cat(gathered.chunk(self.size, dim=0), dim=dim)

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """``x`` filled in place from global rank ``src`` (eager only: between model calls)."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x
