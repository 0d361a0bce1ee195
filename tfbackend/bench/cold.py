"""``bench throughput --cold``: what a user meets after a restart, from a cold and from a warm compile cache.

Each run is a fresh process (spawned, so it shares no compiled code, CUDA context or imported module with this
one) that builds the engine, sends one request and times its first token, then runs T1 with no warm-up of its
own. The first run's compile caches (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) are an empty folder;
the second run reuses what the first one wrote, as a second start of a server would. Startup is timed from
the process's start to the engine being ready, so it includes Python's imports.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tfbackend.bench.workloads import ThroughputResult, ThroughputWorkload, greedy, run_throughput
from tfbackend.config import EngineConfig
from tfbackend.engine.compile_cache import AOT_CACHE_ENV, INDUCTOR_CACHE_ENV, TRITON_CACHE_ENV
from tfbackend.kv_cache import KVCacheSpec


@dataclass
class ColdRun:
    compile_cache: str  # "empty" or "warm"
    startup_s: float  # process start to engine ready
    startup_phases: dict[str, float]  # the engine's own report (without the imports before it)
    first_request_s: float  # one request of the workload's first prompt, to its first (and only) token
    throughput: ThroughputResult
    compilations_after_ready: int  # torch.compile graphs, Triton kernels, CUDA graphs, over the request and T1
    model_impl: str
    kv_specs: list[KVCacheSpec]  # every rank's, for the benchmark's floor
    weight_bytes: int  # all ranks', for the floor


def run_cold_and_warm(
    config: EngineConfig, workload: ThroughputWorkload, vocab_size: int, cache_dir: Path | None = None
) -> list[ColdRun]:
    """The workload in a fresh process with empty compile caches, then in another with the caches it left.

    ``cache_dir``: an empty folder for those caches, left filled afterwards (default: a temporary one)."""
    if cache_dir is not None:
        if cache_dir.exists() and any(cache_dir.iterdir()):
            raise ValueError(f"the compile cache folder of a cold run must be empty: {cache_dir}")
        return [_in_fresh_process(config, workload, vocab_size, cache_dir, label) for label in ("empty", "warm")]
    with tempfile.TemporaryDirectory(prefix="tfbackend-cold-") as cache:
        return run_cold_and_warm(config, workload, vocab_size, Path(cache))


def _in_fresh_process(
    config: EngineConfig, workload: ThroughputWorkload, vocab_size: int, cache: Path, label: str
) -> ColdRun:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(config, workload, vocab_size, cache, label, results, _log_setup()))
    started = time.time()
    process.start()
    try:
        outcome = results.get()
    finally:
        process.join()
    if isinstance(outcome, BaseException):
        raise RuntimeError(f"the {label}-cache run failed: {outcome!r}") from outcome
    outcome.startup_s -= started  # the child sent the wall-clock time at which its engine was ready
    return outcome


def compile_cache_env(cache: Path) -> dict[str, str]:
    """The environment that points the compile caches (the saved compiled forwards too) into ``cache`` (the
    layout a cold run fills)."""
    return {INDUCTOR_CACHE_ENV: str(cache / "inductor"), TRITON_CACHE_ENV: str(cache / "triton"),
            AOT_CACHE_ENV: str(cache / "aot")}


def _log_setup() -> tuple[int, str | None]:
    """This process's log level and format (the first handler's), for a spawned child: it starts with logging
    unconfigured, so its engine's startup report would be lost."""
    root = logging.getLogger()
    formats = [handler.formatter._fmt for handler in root.handlers if handler.formatter is not None]
    return root.level, next((f for f in formats if isinstance(f, str)), None)


def _child(
    config: EngineConfig, workload: ThroughputWorkload, vocab_size: int, cache: Path, label: str, results,
    log_setup: tuple[int, str | None] = (logging.WARNING, None),
) -> None:
    level, log_format = log_setup
    if log_format is not None:
        logging.basicConfig(level=level, format=log_format)
    # Set before anything compiles; the engine keeps caches the environment already names.
    os.environ.update(compile_cache_env(cache))
    try:
        from tfbackend.llm import LLM

        llm = LLM(config=config)
        ready = time.time()
        engine = llm.engine
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": workload.prompts(vocab_size)[0]}], greedy(1))
        first_request_s = time.perf_counter() - start
        throughput = run_throughput(llm, workload, vocab_size, warmup=False)
        compiled = engine.stats().compilations_after_ready.total
        results.put(ColdRun(label, ready, dict(engine.startup.seconds), first_request_s, throughput, compiled,
                            engine.model_impl, engine.worker.kv_specs, engine.worker.weight_bytes))
        engine.shutdown()
    except BaseException as error:  # noqa: BLE001 - the parent reports it
        results.put(RuntimeError(f"{type(error).__name__}: {error}"))
        raise
