"""What the engine leaves behind and what it asks for: a multi-rank engine shuts down without waiting on
itself, and the KV cache never outgrows what the scheduler can use."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tests.tiny_models import make_checkpoint

from tfbackend import LLM
from tfbackend.config import EngineConfig
from tfbackend.distributed import rendezvous
from tfbackend.distributed.launch import LocalRanks
from tfbackend.engine import executor as executor_module
from tfbackend.engine.memory import plan_cache
from tfbackend.kv_cache import KVCacheSpec
from tfbackend.model_interface import AttentionLayerSpec

CPU = dict(dtype="float32", device="cpu", block_size=4, max_model_len=64)


def test_shutdown_frees_graphs_and_leaves_the_groups_before_it_waits_for_the_ranks(tmp_path: Path, monkeypatch):
    # Leaving NCCL groups waits for every rank to leave and for every CUDA graph with a collective to be freed:
    # a driver that joined its ranks' processes first, or left with its graphs alive, waited forever.
    make_checkpoint("llama", tmp_path, num_hidden_layers=2)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **CPU)
    executor = llm.engine.executor
    calls: list[str] = []

    def record(name, function):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return wrapper

    executor.release_graphs = record("release graphs", executor.release_graphs)
    executor.steps.send_stop = record("stop ranks", executor.steps.send_stop)
    monkeypatch.setattr(executor_module, "close_process_groups",
                        record("leave groups", executor_module.close_process_groups))
    executor.ranks.stop = record("wait for ranks", executor.ranks.stop)
    llm.engine.shutdown()
    assert calls == ["release graphs", "stop ranks", "leave groups", "wait for ranks"]
    assert not dist.is_initialized()
    assert [process.exitcode for process in executor.ranks.processes.values()] == [0]


def _exit_soon(rank: int) -> None:
    time.sleep(0.05)


def test_stopped_ranks_report_the_exit_code_they_exited_with():
    """The watchdog thread and ``stop`` both join the rank processes; two threads joining one forkserver process
    race for its exit code, and the loser recorded 255 for a rank that exited with 0 (about every other try)."""
    for _ in range(10):
        ranks = LocalRanks(_exit_soon, (), [1, 2, 3])
        ranks.start()
        time.sleep(0.05)
        ranks.stop()
        assert [process.exitcode for process in ranks.processes.values()] == [0, 0, 0]


def test_leaving_groups_that_never_finish_gives_up_with_a_warning(monkeypatch, caplog):
    never = threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", never.wait)  # a peer that never leaves
    with caplog.at_level(logging.WARNING, logger=rendezvous.__name__):
        rendezvous.close_process_groups(timeout=0.2)
    assert "did not finish within" in caplog.text
    never.set()


@pytest.mark.parametrize("budget_blocks, expected", [(10**7, 4 * 16), (40, 40)])
def test_kv_cache_holds_at_most_what_max_num_seqs_full_sequences_use(budget_blocks, expected):
    spec = KVCacheSpec((AttentionLayerSpec(2, 8, 8),), torch.float32, 4)
    config = EngineConfig(model="unused", max_num_seqs=4)
    plan = plan_cache(config, spec, None, 64, lambda full_batch_bytes: budget_blocks * spec.bytes_per_block)
    assert plan.num_blocks == expected  # 4 sequences x 64 tokens / 4 per block = 64 blocks at most
    assert plan.max_num_seqs == 4
