"""Launching this package's Triton kernels, and compiling them ahead of a warm-up on several threads.

A Triton kernel compiles the first time a launch meets a new specialization, on the launching thread, one
after another: a cold start's warm-up spent 10-14 s of a GPU machine's time compiling 12-27 kernel variants
that way (`docs/benchmarks.md`, issue 11), on one of its 16 cores. Triton's compiler releases the GIL (its
MLIR passes, ptxas), so compilations on several threads run side by side.

``compiling_ahead()`` runs a block in which every launch through ``launch`` only queues the compilation of its
specialization on a thread pool (Triton's asynchronous compile mode) and returns without running the kernel;
leaving the block waits for all of them. Run the warm-up's steps once inside it and once after: the second
pass finds every kernel compiled. Inside the block the outputs of Triton kernels are never written, so code run
there must not decide anything on the host from them, nor index memory with them (the model forwards here do
neither: their host decisions come from shapes and step metadata, and sampling is left out).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

# More threads than this gain little: a warm-up meets a few dozen variants at most.
MAX_COMPILE_THREADS = 8

_compiling_ahead: contextvars.ContextVar[bool] = contextvars.ContextVar("tfbackend_compiling_ahead", default=False)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; inside ``compiling_ahead``, only queue the compilation of that launch's
    specialization (``kernel.warmup``), without running the kernel."""
    if _compiling_ahead.get():
        return kernel.warmup(*args, grid=grid, **kwargs)
    return kernel[grid](*args, **kwargs)


@functools.cache
def _async_compile_mode() -> type | None:
    """Triton's asynchronous compile mode (Triton 3.4 and later), imported on first use: serving on a CPU
    never imports Triton."""
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "AsyncCompileMode", None)  # absent before Triton 3.4


def can_compile_ahead() -> bool:
    """Whether the installed Triton compiles asynchronously (``compiling_ahead`` needs it)."""
    return _async_compile_mode() is not None


def compile_threads() -> int:
    """Threads for compiling ahead: the cores this process may run on, up to ``MAX_COMPILE_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_COMPILE_THREADS, cores))


@contextlib.contextmanager
def compiling_ahead(threads: int | None = None) -> Iterator[None]:
    """Launches through ``launch`` inside this block compile on ``threads`` threads and run nothing; on leaving,
    every compilation has finished and sits in its kernel's cache (a compile error is raised here)."""
    async_compile_mode = _async_compile_mode()
    if async_compile_mode is None:
        raise RuntimeError("compiling ahead needs a Triton with asynchronous compilation (3.4 or later)")
    if _compiling_ahead.get():
        raise RuntimeError("compiling_ahead blocks do not nest")
    with ThreadPoolExecutor(threads or compile_threads(), thread_name_prefix="tfbackend-triton-compile") as pool:
        token = _compiling_ahead.set(True)
        try:
            with async_compile_mode(pool):
                yield
        finally:
            _compiling_ahead.reset(token)
