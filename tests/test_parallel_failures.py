"""A multi-rank engine fails fast and clearly: layouts that cannot work are refused before any process starts,
and a rank that dies makes the engine (and a server) fail its requests and stop instead of hanging."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist
from tests.tiny_models import make_checkpoint

from tfbackend import LLM, SamplingParams
from tfbackend.distributed.rendezvous import free_port
from tfbackend.engine.errors import EngineDeadError
from tfbackend.engine.llm_engine import EngineStats
from tfbackend.server.async_engine import AsyncEngine, EngineError
from tfbackend.server.metrics import ServerMetrics

CPU = dict(dtype="float32", device="cpu", block_size=4, max_model_len=64)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", directory, num_hidden_layers=4)  # 4 query heads, 2 KV heads
    return directory


def test_heads_that_do_not_divide_fail_before_any_rank_starts(llama):
    with pytest.raises(ValueError) as error:
        LLM(str(llama), tensor_parallel_size=3, **CPU)
    message = str(error.value)
    assert "native LlamaForCausalLM declines: 4 attention heads cannot be split evenly over 3" in message
    assert "Transformers fallback declines: model.layers.0.self_attn: 4 attention heads" in message
    assert not dist.is_initialized()


def test_more_ranks_than_gpus_fail_before_any_rank_starts(llama):
    gpus = torch.cuda.device_count()
    ranks = max(2, gpus + 1)  # as pipeline stages, so that the heads need not divide
    if ranks > 4:
        pytest.skip("the test model has 4 layers: too few stages for this many GPUs")
    with pytest.raises(ValueError, match=rf"need {ranks} GPUs, but this node has {gpus}"):
        LLM(str(llama), pipeline_parallel_size=ranks, **{**CPU, "device": "cuda"})
    assert not dist.is_initialized()


def test_a_killed_rank_fails_the_engine_instead_of_hanging(llama):
    llm = LLM(str(llama), tensor_parallel_size=2, **CPU)
    engine = llm.engine
    try:
        for i in range(2):
            engine.add_request(str(i), [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        engine.step()
        os.kill(engine.executor.ranks.processes[1].pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="rank 1 exited with code -9"):
            for _ in range(40):
                engine.step()
        with pytest.raises(EngineDeadError, match="rank 1"):  # and stays dead
            engine.step()
    finally:
        engine.shutdown()
    assert not dist.is_initialized()


class _DyingEngine:
    """An engine whose rank dies: while a request runs (``step``) or while idle (``check_health``)."""

    def __init__(self, dies_idle: bool) -> None:
        self.dies_idle = dies_idle
        self.pending: list[str] = []

    def add_request(self, request_id: str, prompt: str, params: SamplingParams) -> None:
        self.pending.append(request_id)

    def abort_request(self, request_id: str) -> None:
        self.pending = [rid for rid in self.pending if rid != request_id]

    def step(self):
        raise EngineDeadError("the engine lost a rank: rank 1 exited with code -9")

    def check_health(self) -> None:
        if self.dies_idle:
            raise EngineDeadError("the engine lost a rank: rank 1 exited with code -9")

    def stats(self) -> EngineStats:
        return EngineStats(num_running=0, num_waiting=len(self.pending), num_kv_blocks_used=0,
                           num_kv_blocks_total=1, kv_capacity_tokens=16, prefix_cache_queries=0,
                           prefix_cache_hits=0, num_preemptions=0)


def test_server_loop_fails_requests_and_stops_when_the_engine_dies() -> None:
    async def scenario() -> None:
        died = threading.Event()
        engine = AsyncEngine(_DyingEngine(dies_idle=False), ServerMetrics("fake"), on_dead=died.set)
        engine.start()
        try:
            stream = await engine.generate(["a"], ["x"], SamplingParams())
            with pytest.raises(EngineError, match="rank 1 exited"):
                [item async for item in stream]
            assert died.wait(10) and not engine.is_alive
            with pytest.raises(EngineError, match="the engine is dead"):
                await engine.generate(["b"], ["x"], SamplingParams())
        finally:
            engine.shutdown()

    asyncio.run(scenario())


def test_idle_server_loop_notices_a_dead_rank() -> None:
    died = threading.Event()
    engine = AsyncEngine(_DyingEngine(dies_idle=True), ServerMetrics("fake"), on_dead=died.set)
    engine.start()
    try:
        assert died.wait(10) and not engine.is_alive
    finally:
        engine.shutdown()


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank process through /proc")
def test_server_answers_errors_and_exits_when_a_rank_dies(llama, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "tfbackend.entrypoints.cli", "serve", str(llama), "--port", str(port),
               "--device", "cpu", "--max-model-len", "64", "--tensor-parallel-size", "2"]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _up(url):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        # Rank 1 runs in a process forked from the fork server, a child of the server process.
        ranks = [pid for child in _children(server.pid) for pid in _children(child)]
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGKILL)
        body = {"model": str(llama), "prompt": [5, 6, 7], "max_tokens": 8}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code >= 500 and "rank 1" in response.text
        assert server.wait(timeout=60) == 1, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_stuck_process_prints_its_stacks_on_sigusr1_and_goes_on():
    """What rank workers and `serve` install: `kill -USR1 <pid>` shows where each thread waits."""
    script = (
        "import sys, threading, time\n"
        "from tfbackend.distributed.launch import dump_stacks_on_signal\n"
        "dump_stacks_on_signal()\n"
        "def waiting_for_a_peer():\n"
        "    time.sleep(60)\n"
        "threading.Thread(target=waiting_for_a_peer, daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # the main thread waits until told to exit
        "print('still alive', flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGUSR1)
        time.sleep(1)
        out, err = process.communicate("\n", timeout=30)
    finally:
        process.kill()
    assert out.strip() == "still alive"
    assert "in waiting_for_a_peer" in err  # the other thread's stack
    assert 'File "<string>", line 8 in <module>' in err  # and the main thread's, at its readline
