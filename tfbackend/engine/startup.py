"""The startup report: how long each phase of building an engine took, one log line per phase."""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# The phases in the order the engine runs them; each logs one line, skipped ones too.
PHASES = ("resolve", "start ranks", "init device", "load weights", "compile", "profile memory", "warm up",
          "capture graphs", "build scheduler")


@contextmanager
def paused_gc(collect: bool = False) -> Iterator[None]:
    """Pause Python's cyclic garbage collector over a stretch that makes many long-lived objects (importing
    torch's compiler stack, building an engine: about a million): each of its full passes would traverse them all
    again, a quarter of the import time on a 2-core CPU. ``collect`` runs one collection of the youngest
    generation at the end, where everything made while paused sits: the stretch's garbage (CUDA tensors in
    reference cycles among it) is freed now, not in the first request, without walking the older objects (a full
    collection costs half a second in a process that has imported torch). The caller's setting is restored.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collect:
            gc.collect(0)
        if was_enabled:
            gc.enable()


def freeze_startup_objects() -> None:
    """Hide every object alive now from the cyclic collector, for a process that serves one engine until it
    exits (``serve``, a rank's worker): a full pass while serving would otherwise stall a step for about half a
    second walking the engine's and torch's objects. Not for ``LLM``: objects frozen are never collected as
    cycles, and a program may drop one engine to build another.
    """
    gc.freeze()
    _unfreeze_at_exit()


@functools.cache
def _unfreeze_at_exit() -> None:
    # Frozen objects are skipped by the interpreter's last collection too; native extensions (Triton's
    # nanobind bindings) then report them as leaked at exit.
    atexit.register(gc.unfreeze)


class StartupReport:
    """Times the engine's construction phases; ``seconds`` maps each finished phase (and "total") to seconds."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.record(name, time.perf_counter() - start)

    def record(self, name: str, seconds: float, detail: str = "") -> None:
        if name not in PHASES:
            raise ValueError(f"unknown startup phase {name!r}; expected one of {PHASES}")
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        logger.info("startup: %-15s %7.2f s%s", name, seconds, f"  ({detail})" if detail else "")

    def skip(self, name: str, reason: str) -> None:
        """Log a phase this engine does not run, and why."""
        self.record(name, 0.0, f"skipped: {reason}")

    def finish(self, detail: str = "") -> float:
        """Log the total since construction, and how much of it no phase covers (imports made on first use,
        mostly); returns the total."""
        self.seconds["total"] = total = time.perf_counter() - self._start
        detail = f"{detail}; " if detail else ""
        logger.info("startup: %-15s %7.2f s  (%s%.2f s outside the phases)", "total", total, detail,
                    outside_phases(self.seconds))
        return total


def outside_phases(seconds: dict[str, float]) -> float:
    """Of a finished report's ``seconds``, the part of the total that no phase covers."""
    return seconds["total"] - sum(value for phase, value in seconds.items() if phase != "total")
