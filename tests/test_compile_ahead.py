"""Compiling the warm-up's Triton kernels ahead, on several threads (``kernels.launch``, ``engine.warmup``).

On a GPU the compilations themselves are what gets faster (``benchmarks/gpu_startup_run.sh`` times a cold start);
here: launches inside ``compiling_ahead`` only queue compilations on its thread pool, which it waits for, and a
warm-up that compiles ahead runs every step's forward pass once more, before the steps proper, without sampling
and without changing what the engine generates.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from tests.tiny_models import make_checkpoint, random_prompts

from tfbackend.config import EngineConfig
from tfbackend.engine import worker
from tfbackend.engine.llm_engine import LLMEngine
from tfbackend.engine.model_runner import ModelRunner
from tfbackend.engine.sampler import Sampler
from tfbackend.kernels.launch import can_compile_ahead, compiling_ahead, launch
from tfbackend.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not can_compile_ahead(), reason="this Triton has no asynchronous compile mode")


class RecordingKernel:
    """Stands in for a ``triton.jit`` function: records launches (``kernel[grid](...)``) and warm-ups."""

    def __init__(self):
        self.launched, self.warmed = [], []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        self.warmed.append((grid, args, kwargs))


def test_launches_inside_compiling_ahead_only_warm_up():
    kernel = RecordingKernel()
    launch(kernel, (4,), "x", BLOCK=16)
    with compiling_ahead(threads=2):
        launch(kernel, (8, 2), "y", BLOCK=32)
    launch(kernel, (1,), "z", BLOCK=16)
    assert kernel.launched == [((4,), ("x",), {"BLOCK": 16}), ((1,), ("z",), {"BLOCK": 16})]
    assert kernel.warmed == [((8, 2), ("y",), {"BLOCK": 32})]


def test_compiling_ahead_does_not_nest_and_ends_with_an_error():
    kernel = RecordingKernel()
    with pytest.raises(RuntimeError, match="do not nest"), compiling_ahead(threads=1), compiling_ahead(threads=1):
        pass
    with pytest.raises(ValueError, match="boom"), compiling_ahead(threads=1):
        raise ValueError("boom")
    launch(kernel, (1,), "after")
    assert kernel.launched and not kernel.warmed  # the mode ended with the block, error or not


def test_compilations_run_on_the_pool_and_are_awaited_on_leaving():
    """What Triton's JIT does on a kernel-cache miss inside the block: submit to the active async mode."""
    from triton.runtime._async_compile import active_mode

    threads, finalized = [], []

    def compile_kernel():
        threads.append(threading.current_thread().name)
        return "binary"

    with compiling_ahead(threads=2):
        mode = active_mode.get()
        assert mode is not None
        for key in ("a", "b", "a"):  # the same specialization twice compiles once
            mode.submit(key, compile_kernel, finalized.append, lambda _: None)
    assert active_mode.get() is None
    assert finalized == ["binary", "binary"]
    assert all(name.startswith("tfbackend-triton-compile") for name in threads) and len(threads) == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint("llama", path, max_position_embeddings=128)
    return path


def engine_tokens(checkpoint: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(checkpoint), model_impl="native", device="cpu", dtype="float32",
                                    block_size=4, max_model_len=128, max_num_batched_tokens=32, max_num_seqs=8,
                                    kv_cache_memory=1 << 20))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
    return [finished[f"r{i}"] for i in range(len(prompts))]


def test_a_warmup_that_compiles_ahead_runs_each_forward_first_and_samples_once(checkpoint, monkeypatch, caplog):
    prompts = random_prompts([5, 12, 20])
    reference = engine_tokens(checkpoint, prompts)

    calls = []
    run_model, sample = ModelRunner.run_model, Sampler.sample_on_device

    def counted(name, method):
        return lambda self, *args, **kwargs: calls.append(name) or method(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "run_model", counted("forward", run_model))
    monkeypatch.setattr(Sampler, "sample_on_device", counted("sample", sample))
    monkeypatch.setattr(worker.Worker, "_compiles_ahead", lambda self: True)
    with caplog.at_level(logging.INFO, logger="tfbackend.engine.warmup"):
        engine = LLMEngine(EngineConfig(model=str(checkpoint), model_impl="native", device="cpu", dtype="float32",
                                        block_size=4, max_model_len=128, max_num_batched_tokens=32,
                                        max_num_seqs=8, kv_cache_memory=1 << 20))
    del engine
    warmup_calls = calls[-3 * 2:]  # the CPU warm-up's two first steps: two forwards ahead, then two sampled
    assert warmup_calls == ["forward", "forward", "forward", "sample", "forward", "sample"]
    assert "Triton kernels compiled ahead" in caplog.text

    assert engine_tokens(checkpoint, prompts) == reference  # this engine compiled ahead too
