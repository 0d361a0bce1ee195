"""Counting compilations, so "nothing compiles after ready" is a number that can be watched.

Three things stall a step when they happen inside it: a torch.compile graph (a first compilation or a
recompilation after a guard failed), a Triton kernel compiled for a specialization not seen before (or loaded
from the disk cache, which still costs milliseconds), and a CUDA graph capture. The engine does all of them
at startup; ``CompileMonitor`` snapshots the counts when the engine is ready and reports any increase after
that, with a warning naming the step that caused it.

The counts are per process (torch's dynamo counters, a Triton JIT hook): a second engine built in the same
process counts as compilation after the first one's ready.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields

import torch


_triton_compilations = 0
_triton_hook_installed = False
_cuda_graph_captures = 0


@dataclass(frozen=True)
class CompileCounts:
    torch_compile_graphs: int  # graphs dynamo handed to the compiler backend, recompilations included
    triton_kernels: int  # Triton JIT specializations compiled or loaded from the disk cache
    cuda_graphs: int  # CUDA graphs captured

    @property
    def total(self) -> int:
        return self.torch_compile_graphs + self.triton_kernels + self.cuda_graphs

    def __sub__(self, other: CompileCounts) -> CompileCounts:
        return CompileCounts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


def count_cuda_graph_capture() -> None:
    global _cuda_graph_captures
    _cuda_graph_captures += 1


def install_triton_hook() -> None:
    """Count Triton JIT compilations through Triton's pre-compile hook (chained after any hook already set).

    The hook runs only on a miss of a kernel's in-memory cache, i.e. for a specialization this process has not
    launched yet. Without a GPU nothing compiles (the CPU interpreter runs kernels as Python), so Triton, a
    quarter second of startup, is not even imported."""
    global _triton_hook_installed
    if _triton_hook_installed or not torch.cuda.is_available():
        return
    try:
        from triton import knobs
    except ImportError:  # no Triton, or one older than its knobs (3.4): nothing of ours compiles through it
        _triton_hook_installed = True
        return
    previous = knobs.runtime.jit_cache_hook

    def count(*args, **kwargs):
        global _triton_compilations
        _triton_compilations += 1
        return previous(*args, **kwargs) if previous is not None else None

    knobs.runtime.jit_cache_hook = count
    _triton_hook_installed = True


def current_counts() -> CompileCounts:
    # Nothing was compiled with torch.compile if dynamo was never imported (importing it takes seconds).
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    return CompileCounts(
        torch_compile_graphs=dynamo_utils.counters["stats"]["unique_graphs"] if dynamo_utils else 0,
        triton_kernels=_triton_compilations,
        cuda_graphs=_cuda_graph_captures,
    )


class CompileMonitor:
    """Compilations since the engine became ready; ``check`` tells when their number grew."""

    def __init__(self) -> None:
        install_triton_hook()
        self.at_start = current_counts()
        self.at_ready: CompileCounts | None = None
        self._reported = CompileCounts(0, 0, 0)

    def mark_ready(self) -> None:
        self.at_ready = current_counts()

    def during_startup(self) -> CompileCounts:
        """What startup compiled (so far, before ``mark_ready``)."""
        return (self.at_ready or current_counts()) - self.at_start

    def after_ready(self) -> CompileCounts:
        if self.at_ready is None:
            return CompileCounts(0, 0, 0)
        return current_counts() - self.at_ready

    def check(self) -> CompileCounts | None:
        """What compiled since the last check, if anything did after ready (the caller warns about it)."""
        after = self.after_ready()
        if after.total == self._reported.total:
            return None
        new, self._reported = after - self._reported, after
        return new
