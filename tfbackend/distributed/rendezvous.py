"""Meeting of the ranks, torchrun-style: a TCPStore at ``master_addr:master_port`` that the driver (rank 0)
hosts, then one process group per role (see ``state.py``).

Ranks are numbered node by node: node ``n`` of ``nnodes`` runs ranks ``n * local_size ... (n + 1) *
local_size - 1``; on node 0, rank 0 is the engine's own process. Every rank reads the engine's configuration
from the store, so other nodes need only the rendezvous flags.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tfbackend.distributed import peer_all_reduce
from tfbackend.distributed.comm import CommGroup
from tfbackend.distributed.state import ParallelContext

# Every rank must have joined within this time (other nodes may start later than the driver).
JOIN_TIMEOUT = datetime.timedelta(minutes=10)
# A collective inside a step that waits longer than this means a rank is lost.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# Workers wait for the next step on the host group for as long as the server stays idle; a rank that dies
# closes its connections, which wakes them at once.
IDLE_TIMEOUT = datetime.timedelta(days=365)
# Leaving the groups at shutdown: normally well under a second (see close_process_groups).
CLOSE_TIMEOUT = 30.0

logger = logging.getLogger(__name__)

CONFIG_KEY = "tfbackend/engine_config"


def joined_key(rank: int) -> str:
    return f"tfbackend/joined/{rank}"


def error_key(rank: int) -> str:
    return f"tfbackend/error/{rank}"


@dataclass(frozen=True)
class Rendezvous:
    """Where and how many ranks meet."""

    master_addr: str
    master_port: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    nnodes: int
    device_type: str  # "cuda" or "cpu": NCCL or gloo for device collectives

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def local_size(self) -> int:
        return self.world_size // self.nnodes

    def node_ranks(self, node_rank: int) -> range:
        return range(node_rank * self.local_size, (node_rank + 1) * self.local_size)

    def check_devices(self) -> None:
        """Raise ValueError unless this node has a device for each of its ranks."""
        if self.device_type != "cuda":
            return
        available = torch.cuda.device_count()
        if self.local_size > available:
            raise ValueError(
                f"{self.local_size} ranks per node (tensor_parallel_size {self.tensor_parallel_size} x "
                f"pipeline_parallel_size {self.pipeline_parallel_size} over {self.nnodes} node(s)) need "
                f"{self.local_size} GPUs, but this node has {available}"
            )


def connect_store(rendezvous: Rendezvous, is_master: bool) -> dist.TCPStore:
    """The driver hosts the store; every other process connects to it (waiting up to JOIN_TIMEOUT)."""
    return dist.TCPStore(
        rendezvous.master_addr, rendezvous.master_port, world_size=None, is_master=is_master,
        timeout=JOIN_TIMEOUT, wait_for_workers=False,
    )


def wait_for_ranks(store: dist.Store, rendezvous: Rendezvous, check_alive: Callable[[], None]) -> None:
    """Wait until every rank has reached the store, calling ``check_alive`` (which raises to stop) meanwhile."""
    deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
    missing = list(range(1, rendezvous.world_size))
    while missing:
        check_alive()
        missing = [rank for rank in missing if not store.check([joined_key(rank)])]
        if missing and time.monotonic() > deadline:
            raise TimeoutError(
                f"ranks {missing} of {rendezvous.world_size} did not join {rendezvous.master_addr}:"
                f"{rendezvous.master_port} within {JOIN_TIMEOUT}: start the other nodes with the same "
                f"--nnodes, --master-addr and --master-port, their own --node-rank, and --headless"
            )
        time.sleep(0.05)


def init_rank(rendezvous: Rendezvous, rank: int, store: dist.Store) -> ParallelContext:
    """Join the process groups as ``rank``: the world on the device backend, its gloo twin, the TP groups."""
    local_rank = rank % rendezvous.local_size
    cuda = rendezvous.device_type == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif rank != 0:  # CPU ranks share the machine's cores (rank 0 is the caller's own process: left as it is)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rendezvous.local_size))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend, store=dist.PrefixStore("tfbackend/pg", store), rank=rank, world_size=rendezvous.world_size,
        timeout=COLLECTIVE_TIMEOUT, device_id=device if cuda else None,
    )
    world_ranks = list(range(rendezvous.world_size))
    world_cpu = dist.new_group(world_ranks, backend="gloo", timeout=IDLE_TIMEOUT)
    tp_size, pp_size = rendezvous.tensor_parallel_size, rendezvous.pipeline_parallel_size
    tp = None
    for stage in range(pp_size):  # every rank takes part in creating every group
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.group.WORLD if pp_size == 1 else dist.new_group(ranks, backend=backend)
        if rank in ranks:
            tp = CommGroup.of(group, ranks)
    world = CommGroup.of(dist.group.WORLD, world_ranks)
    if cuda:  # bring NCCL up now, not inside the first forward (or a CUDA graph capture)
        dist.all_reduce(torch.zeros(1, device=device))
        if tp_size > 1 and rendezvous.local_size % tp_size == 0:  # the stage shares a node: all-reduces via NVLink
            peer_all_reduce.enable(tp, device)
    return ParallelContext(
        rank=rank, world_size=rendezvous.world_size, local_rank=local_rank, local_size=rendezvous.local_size,
        tp=tp, pp_rank=rank // tp_size,
        pp_size=pp_size, world_device=world, world_cpu=world_cpu, device=device,
    )


def close_process_groups(timeout: float = CLOSE_TIMEOUT) -> None:
    """Leave every process group (also after a failure, when the groups may be aborted already).

    Leaving NCCL groups is collective: it waits for the other ranks to leave too, and for every CUDA graph that
    captured a collective to be freed. A rank that died or a graph still alive would make it wait forever, so
    it waits ``timeout`` seconds at most, then gives up with a warning (the process can still exit)."""
    if not dist.is_initialized():
        return
    peer_all_reduce.release()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # an aborted NCCL communicator; nothing is left to release
            logger.warning("could not destroy the process groups cleanly", exc_info=True)

    leaving = threading.Thread(target=destroy, name="tfbackend-leave-groups", daemon=True)
    leaving.start()
    leaving.join(timeout)
    if leaving.is_alive():
        logger.warning("leaving the process groups did not finish within %.0f s (a rank gone, or a CUDA graph "
                       "with a collective still alive); going on without", timeout)


def free_port() -> int:
    """A TCP port nobody listens on now (for a single-node engine that was given none)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
