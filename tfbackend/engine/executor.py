"""The driver's side of a multi-rank engine: start the other ranks, meet them, send each step, notice failures.

The engine's own process is rank 0, the driver: it schedules, samples and holds its share of the model like
every other rank. ``Executor`` starts this node's other ranks (``worker.run_worker`` in processes of their
own), waits until every rank of every node has joined, hands each step to them (``StepBroadcast``) and stops
them at shutdown. Other nodes start their ranks with ``run_headless_node`` (``tfbackend serve --headless``).

A rank that dies makes the engine unusable: the others would wait for it forever. A watchdog thread sees a
local rank exit at once; a rank on another node shows as a closed connection or, at worst, a collective that
times out. Either way the next (or current) step raises ``EngineDeadError`` naming the rank and its error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from tfbackend.config import EngineConfig
from tfbackend.distributed import CommGroup, ParallelContext, use_parallel
from tfbackend.distributed.launch import LocalRanks, reported_failure
from tfbackend.distributed.rendezvous import (
    CONFIG_KEY,
    Rendezvous,
    close_process_groups,
    connect_store,
    free_port,
    init_rank,
    wait_for_ranks,
)
from tfbackend.engine.errors import EngineDeadError
from tfbackend.engine.step_broadcast import StepBroadcast
from tfbackend.engine.worker import run_worker
from tfbackend.registry import resolve

logger = logging.getLogger(__name__)

# How long a failed collective waits for the watchdog to name the rank that died.
_DEATH_NOTICE_SECONDS = 3.0


def rendezvous_of(config: EngineConfig) -> Rendezvous:
    return Rendezvous(
        master_addr=config.master_addr, master_port=config.master_port or free_port(),
        tensor_parallel_size=config.tensor_parallel_size, pipeline_parallel_size=config.pipeline_parallel_size,
        nnodes=config.nnodes, device_type=config.torch_device().type,
    )


class Executor:
    def __init__(self, config: EngineConfig, model_dir: str | Path, hf_config):
        if config.node_rank != 0:
            raise ValueError(f"node {config.node_rank} runs only workers: start it with --headless")
        if dist.is_initialized():
            raise RuntimeError("a multi-rank engine already runs in this process: shut it down first")
        check_layout(config, hf_config)
        self.rendezvous = rendezvous_of(config)
        self.rendezvous.check_devices()
        self.failure: str | None = None
        self.release_graphs: Callable[[], None] | None = None  # the driver's CUDA graphs, freed at shutdown
        self.store = connect_store(self.rendezvous, is_master=True)
        self.store.set(CONFIG_KEY, json.dumps(dataclasses.asdict(dataclasses.replace(config, model=str(model_dir)))))
        self.ranks = LocalRanks(run_worker, (self.rendezvous,), self.rendezvous.node_ranks(0)[1:], self._on_death)
        self.ranks.start()
        self._closed = False
        try:
            wait_for_ranks(self.store, self.rendezvous, self.raise_if_dead)
            self.parallel = init_rank(self.rendezvous, 0, self.store)
        except BaseException:
            self.shutdown()
            raise
        self.steps = StepBroadcast(self.parallel, self.parallel.device)
        self.send_step = self.steps.send

    def _on_death(self, rank: int, exitcode: int) -> None:
        error = reported_failure(self.store, rank)
        self.failure = f"rank {rank} exited with code {exitcode}" + (f" ({error})" if error else "")
        if self.rendezvous.device_type == "cuda" and dist.is_initialized():
            # A driver blocked in an NCCL collective with the dead rank would wait until the timeout.
            dist.distributed_c10d._abort_process_group()

    def raise_if_dead(self) -> None:
        if self.failure is not None:
            raise EngineDeadError(f"the engine lost a rank: {self.failure}")

    def rank_failure(self) -> str | None:
        """What went wrong on another rank, if anything: asked after a step or startup failed on the driver
        (the watchdog may notice a dead rank a moment after the driver's collective did)."""
        deadline = time.monotonic() + _DEATH_NOTICE_SECONDS
        while self.failure is None and self.ranks.processes and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.failure is None:  # ranks on other nodes have no watchdog here, only their reports
            reports = ((rank, reported_failure(self.store, rank)) for rank in range(1, self.rendezvous.world_size))
            self.failure = next((f"rank {rank} failed ({error})" for rank, error in reports if error), None)
        return self.failure

    def shutdown(self) -> None:
        """Stop every rank (asking them to, then by force) and leave the process groups. Idempotent.

        On GPUs, leaving the groups finalizes the NCCL communicators, which waits for the other ranks to do the
        same and for every CUDA graph that captured one of their collectives to be freed. So the driver frees
        its graphs (``release_graphs``, set by the engine), tells the ranks to stop (they free theirs) and
        leaves the groups while they do, and only then waits for their processes to end."""
        if self._closed:
            return
        self._closed = True
        self.ranks.expect_exit()
        if self.failure is None and dist.is_initialized() and hasattr(self, "steps"):
            if self.release_graphs is not None:
                self.release_graphs()
            try:
                self.steps.send_stop()
            except Exception:  # a rank died meanwhile; the others stop when their connections close
                logger.warning("could not tell every rank to stop", exc_info=True)
        close_process_groups()
        self.ranks.stop()


def check_layout(config: EngineConfig, hf_config) -> None:
    """Fail before starting any process when no implementation can split the model as asked (heads or layers
    that do not divide): the same ``supports`` checks every rank makes at load, for a rank-0 context."""
    layout = ParallelContext(
        world_size=config.world_size, tp=CommGroup(size=config.tensor_parallel_size),
        pp_size=config.pipeline_parallel_size,
    )
    with use_parallel(layout):
        resolve(hf_config, config.model_impl)


def run_headless_node(config: EngineConfig) -> int:
    """Run this node's ranks (``config.node_rank`` > 0) for a driver elsewhere, until it stops them."""
    if config.node_rank == 0:
        raise ValueError("--headless runs the workers of another node than node 0 (pass --node-rank)")
    rendezvous = rendezvous_of(config)
    rendezvous.check_devices()
    # Spawned, not forked from a fork server: this launcher only waits for its ranks and reports how they
    # ended, and a fork server that goes first loses their exit status (multiprocessing then says 255).
    ranks = LocalRanks(run_worker, (rendezvous,), rendezvous.node_ranks(config.node_rank), start_method="spawn")
    logger.info("node %d: starting ranks %s for the driver at %s:%d", config.node_rank,
                list(ranks.processes), rendezvous.master_addr, rendezvous.master_port)
    ranks.start()
    return ranks.wait()
