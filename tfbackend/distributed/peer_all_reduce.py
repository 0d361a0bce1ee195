"""All-reduce through peer GPU memory for the small messages of decode steps (ranks of one node only).

NCCL is built for bandwidth: on two H200s it takes 11 µs for an 8 KiB all-reduce and 32 µs for the 2 MiB of a
256-token decode step of an 8B model, and a decode step of a TP model does two all-reduces per layer. torch's
symmetric memory gives every rank of a node a buffer that all the others can read and write over NVLink, and
kernels that all-reduce in it with one launch: ``two_shot`` (each rank sums its share of the buffer from every
peer, then gathers the others' sums: 19 µs for those 2 MiB) and ``one_shot`` (each rank reads every peer's
whole buffer: fewest steps for the smallest messages). Messages larger than the buffer go to NCCL, which
catches up with them anyway (see ``benchmarks/allreduce_probe.py`` for the measurements behind the limits).

``CommGroup.all_reduce`` calls ``torch.ops.tfbackend.peer_all_reduce`` on CUDA tensors; the op takes the peer
path when ``enable`` set one up for the group and the message fits, NCCL otherwise. It is an opaque custom op,
so dynamo traces it, inductor keeps it in place and CUDA graphs capture its kernels; saved compiled forwards
call it by name, whatever this process's peer buffer turned out to be.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from tfbackend.distributed.comm import CommGroup

logger = logging.getLogger(__name__)

# The peer buffer's size, per group: messages up to this many bytes take the peer path. Two-shot is ahead of
# NCCL up to 32 MiB on two H200s and level at 64 MiB, where prefill chunks live.
BUFFER_BYTES = 32 * 2**20
# Messages up to this many bytes take one-shot (each rank reads all of every peer's message) instead of
# two-shot.
ONE_SHOT_MAX_BYTES = 256 * 2**10
# What torch's kernels take: these dtypes, 2, 4 or 8 ranks (two-shot into a separate output), messages of
# whole 4-byte words.
PEER_DTYPES = (torch.bfloat16, torch.float32)
PEER_WORLD_SIZES = (2, 4, 8)
WORD_BYTES = 4

# "0" leaves every all-reduce to the process group's backend (NCCL), to compare or to rule the peer path out.
PEER_ALL_REDUCE_ENV = "TFBACKEND_PEER_ALL_REDUCE"

_functional = torch.ops._c10d_functional


class PeerBuffer:
    """A buffer of ``BUFFER_BYTES`` that every rank of a group has mapped (torch symmetric memory)."""

    def __init__(self, group_name: str, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group_name
        self.storage = symm_mem.empty(BUFFER_BYTES, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.storage, group_name)  # collective: every rank of the group maps the others'

    @staticmethod
    def fits(x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.dtype in PEER_DTYPES and 0 < nbytes <= BUFFER_BYTES and nbytes % WORD_BYTES == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``x`` (which must ``fit``), as a new tensor."""
        x = x.contiguous()
        return self.one_shot(x) if x.numel() * x.element_size() <= ONE_SHOT_MAX_BYTES else self.two_shot(x)

    def one_shot(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank reads all of every peer's message (the kernel copies ``x`` into the buffer itself)."""
        return torch.ops.symm_mem.one_shot_all_reduce_copy(self._staged(x), x, "sum", self.group_name)

    def two_shot(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank sums its share of the message from every peer, then gathers the others' sums."""
        staged = self._staged(x)
        staged.copy_(x)
        return torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", self.group_name, torch.empty_like(x))

    def _staged(self, x: torch.Tensor) -> torch.Tensor:
        """The start of the buffer as a tensor of ``x``'s dtype and shape (the kernels want the message's)."""
        return self.storage[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)


_buffers: dict[str, PeerBuffer] = {}
_mapped_before = False  # whether this process has set up peer memory (for any group) already


def enable(group: CommGroup, device: torch.device) -> bool:
    """Set up the peer path for a group of ranks on this node's GPUs; collective over the group (each of its
    ranks calls it). Checks a one-shot and a two-shot all-reduce against the exact sum; whatever fails (a torch
    without these kernels, a machine that does not map peer memory) leaves the group on the process group's own
    all-reduce (NCCL), with a log line saying why. Returns whether the peer path is on."""
    global _mapped_before
    if group.size not in PEER_WORLD_SIZES:
        logger.info("all-reduce through peer memory needs 2, 4 or 8 ranks, not %d; the process group's backend "
                    "does every all-reduce", group.size)
        return False
    # torch numbers the store exchanges of its symmetric-memory rendezvous per process, not per group, and keeps
    # a group name's mapping for the life of the process (names start again from "0" for a later engine's
    # groups). A process that has mapped peer memory before is ahead of a fresh worker, and a rendezvous between
    # them waits forever (pytorch#196082; it hung TP=2 x PP=2 after a TP=4 engine in one process). So a process
    # maps peer memory once, for its first multi-rank engine, and only when every rank of the group is as fresh.
    wanted = os.environ.get(PEER_ALL_REDUCE_ENV, "1") != "0"
    agreed = torch.tensor([int(wanted), int(not _mapped_before)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group.group)
    if not agreed[0].item():
        logger.info("all-reduce through peer memory is off (%s=0 on a rank of group %s)", PEER_ALL_REDUCE_ENV,
                    group.name)
        return False
    if not agreed[1].item():
        logger.info("all-reduce through peer memory was set up by an earlier engine of a process of group %s and "
                    "cannot be again; the process group's backend does every all-reduce", group.name)
        return False
    _mapped_before = True
    failure = None
    try:
        buffer = PeerBuffer(group.name, device)
        for numel in (64, 2 * ONE_SHOT_MAX_BYTES // 4):  # one-shot, then two-shot; integers, so sums are exact
            values = torch.arange(numel, dtype=torch.float32, device=device)
            got = buffer.all_reduce(values * (group.rank + 1))
            if not torch.equal(got, values * (group.size * (group.size + 1) // 2)):
                raise RuntimeError(f"the sum of {numel} values differs from the exact one")
    except Exception as error:  # noqa: BLE001 - any failure means NCCL does the job, as before
        failure = f"{type(error).__name__}: {error}"
    # Every rank must take the same path at every all-reduce: one rank's failure turns the path off for all.
    succeeded = torch.tensor([int(failure is None)], device=device)
    dist.all_reduce(succeeded, op=dist.ReduceOp.MIN, group=group.group)
    if not succeeded.item():
        logger.warning("all-reduce through peer memory is off for group %s (%s); the process group's backend "
                       "does every all-reduce", group.name, failure or "it failed on another rank of the group")
        return False
    _buffers[group.name] = buffer
    logger.info("all-reduce through peer memory for messages up to %d MiB (group %s, %d ranks)",
                BUFFER_BYTES // 2**20, group.name, group.size)
    return True


def release() -> None:
    """Free every group's peer buffer (before the process groups are torn down); NCCL does the rest."""
    _buffers.clear()


@torch.library.custom_op("tfbackend::peer_all_reduce", mutates_args=())
def peer_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of every rank's ``x``: through peer memory where ``enable`` set it up and ``x`` fits, else NCCL."""
    buffer = _buffers.get(group_name)
    if buffer is not None and PeerBuffer.fits(x):
        return buffer.all_reduce(x)
    return _functional.wait_tensor(_functional.all_reduce(x, "sum", group_name))


@peer_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)
