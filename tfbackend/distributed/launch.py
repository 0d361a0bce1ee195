"""Starting the rank processes of one node and noticing when one of them dies.

Processes come from a fork server that has imported tfbackend (torch, transformers) once: a rank then starts
in a fraction of a second instead of importing everything again, and never inherits the state of the
process that asked for it (threads, a CUDA context). ``TFBACKEND_RANK_START_METHOD=spawn`` starts each rank
from scratch instead. A rank that fails leaves its error in the store
(``report_failure``), so the driver can say what went wrong instead of only that a connection closed. A
rank that hangs instead prints where each of its threads is on ``kill -USR1 <pid>`` (``dump_stacks_on_signal``).
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable

import torch.distributed as dist

from tfbackend.distributed.rendezvous import (
    Rendezvous,
    close_process_groups,
    connect_store,
    error_key,
    init_rank,
    joined_key,
    wait_for_ranks,
)
from tfbackend.distributed.state import use_parallel

logger = logging.getLogger(__name__)

# What the fork server imports once: everything a rank needs (engine, both model paths, torch, transformers).
PRELOAD = ["tfbackend.engine.worker", "tfbackend.adapter", "tfbackend.native.llama"]
# "forkserver" (default) or "spawn" (every rank imports everything itself: slower, shares nothing).
START_METHOD_ENV = "TFBACKEND_RANK_START_METHOD"


def process_context(default_method: str = "forkserver") -> multiprocessing.context.BaseContext:
    method = os.environ.get(START_METHOD_ENV, default_method)
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_METHOD_ENV} must be forkserver or spawn, got {method!r}")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # A CUDA driver initialised in the fork server would be unusable in its children: should any import ask
        # whether CUDA is available, let it ask NVML instead of initialising the driver.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        context.set_forkserver_preload(PRELOAD)
    return context


def dump_stacks_on_signal() -> None:
    """On SIGUSR1 (``kill -USR1 <pid>``), print every thread's Python stack to stderr and go on: where a stuck
    process waits (a collective, a peer), without a debugger. For the processes tfbackend owns: rank workers
    and ``serve``."""
    stream = sys.__stderr__  # the process's own stderr (sys.stderr may be a capture without a file descriptor)
    if not hasattr(signal, "SIGUSR1") or stream is None:  # Windows; no stderr at all
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
    except (OSError, ValueError) as error:  # a stderr without a file descriptor
        logger.debug("no stack dumps on SIGUSR1: %s", error)


def report_failure(store: dist.Store, rank: int, error: BaseException) -> None:
    """Leave ``error`` where the driver looks for it (best effort: the store may be gone too)."""
    logger.error("rank %d failed:\n%s", rank, "".join(traceback.format_exception(error)))
    try:
        store.set(error_key(rank), f"{type(error).__name__}: {error}")
    except Exception:  # the driver is gone; nobody is left to tell
        pass


def reported_failure(store: dist.Store, rank: int) -> str | None:
    try:
        return store.get(error_key(rank)).decode() if store.check([error_key(rank)]) else None
    except Exception:
        return None


class LocalRanks:
    """The rank processes this launcher started, watched by a thread that reports the first one to die.

    ``target(*args, rank)`` runs in each; ``on_death(rank, exitcode)`` is called (from the watching thread)
    for the first rank that exits while the ranks are not being stopped.
    """

    def __init__(self, target: Callable, args: tuple, ranks: Iterable[int],
                 on_death: Callable[[int, int], None] | None = None, start_method: str = "forkserver"):
        context = process_context(start_method)
        self.processes = {
            rank: context.Process(target=target, args=(*args, rank), name=f"tfbackend-rank-{rank}", daemon=True)
            for rank in ranks
        }
        self.on_death = on_death
        self.dead: tuple[int, int] | None = None  # (rank, exit code) of the first rank that died
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="tfbackend-rank-watchdog", daemon=True)

    def start(self) -> None:
        for process in self.processes.values():
            process.start()
        if self.processes:
            self._watcher.start()

    def _watch(self) -> None:
        """A rank that exits with code 0 was told to stop; any other exit is a death."""
        sentinels = {process.sentinel: rank for rank, process in self.processes.items()}
        while sentinels:
            for sentinel in multiprocessing.connection.wait(list(sentinels)):
                rank = sentinels.pop(sentinel)
                process = self.processes[rank]
                process.join()
                if process.exitcode == 0 or self._stopping.is_set():
                    continue
                self.dead = (rank, process.exitcode)
                logger.error("rank %d (pid %d) exited with code %s", rank, process.pid, process.exitcode)
                if self.on_death is not None:
                    self.on_death(rank, process.exitcode)
                return

    def _after_watcher(self, timeout: float | None = None) -> None:
        """Let the watching thread finish joining first. Two threads joining one forkserver process race for
        its exit code on one pipe: the loser reads end-of-file and records 255 for a rank that exited with 0."""
        if self._watcher.is_alive():
            self._watcher.join(timeout)

    def wait(self) -> int:
        """Wait for every rank to exit; the worst exit code (0 if all succeeded)."""
        self._after_watcher()  # it returns once every rank has exited, or at the first death
        codes = []
        for process in self.processes.values():
            process.join()
            codes.append(process.exitcode)
        return max((abs(code) for code in codes if code), default=0)

    def expect_exit(self) -> None:
        """From now on ranks exiting are no deaths (they are being stopped)."""
        self._stopping.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the ranks finish on their own within ``timeout`` seconds, then terminate, then kill them."""
        self._stopping.set()
        self._after_watcher(timeout)
        for process in self.processes.values():
            process.join(timeout)
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()


def run_spmd(fn: Callable, args: tuple, rendezvous: Rendezvous):
    """Run ``fn(*args)`` on every rank of a one-node world (this process is rank 0), each inside its parallel
    context; rank 0's result. For tools that drive a sharded model step by step themselves (``check``)."""
    store = connect_store(rendezvous, is_master=True)
    ranks = LocalRanks(_spmd_rank, (rendezvous, fn, args), range(1, rendezvous.world_size))
    ranks.start()

    def check_alive() -> None:
        if ranks.dead is not None:
            rank, code = ranks.dead
            raise RuntimeError(f"rank {rank} exited with code {code}: {reported_failure(store, rank)}")

    try:
        wait_for_ranks(store, rendezvous, check_alive)
        with use_parallel(init_rank(rendezvous, 0, store)):
            return fn(*args)
    except Exception as error:
        failure = next((f for f in (reported_failure(store, r) for r in ranks.processes) if f), None)
        if failure is None or isinstance(error, ValueError):
            raise
        raise RuntimeError(f"another rank failed: {failure}") from error
    finally:
        close_process_groups()
        ranks.stop()


def _spmd_rank(rendezvous: Rendezvous, fn: Callable, args: tuple, rank: int) -> None:
    store = connect_store(rendezvous, is_master=False)
    try:
        store.set(joined_key(rank), "1")
        with use_parallel(init_rank(rendezvous, rank, store)):
            fn(*args)
    except BaseException as error:
        report_failure(store, rank, error)
        raise SystemExit(1) from error
    finally:
        close_process_groups()
