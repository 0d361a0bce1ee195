"""The startup report: how long each phase of building an engine took, one log line per phase."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# The phases in the order the engine runs them; each logs one line, skipped ones too.
PHASES = ("resolve", "init device", "load weights", "compile", "profile memory", "warm up", "capture graphs",
          "build scheduler")


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
