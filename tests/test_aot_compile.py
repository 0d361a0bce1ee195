"""Ahead-of-time compilation (``engine/aot_compile.py``): the first start saves the compiled forward, the next
loads it instead of tracing and compiling, with the same tokens; what cannot be saved or loaded falls back to
compiling in process.

Inductor generates code for real here (its C++ backend on the CPU, ~20 s per compile).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tests.test_piecewise_compile import engine_tokens, greedy_tokens
from tests.tiny_models import make_checkpoint
from tfbackend.bench.cold import compile_cache_env
from tfbackend.engine import aot_compile, worker
from tfbackend.engine.compile_cache import (
    AOT_CACHE_ENV,
    INDUCTOR_CACHE_ENV,
    TRITON_CACHE_ENV,
    aot_artifact_path,
    aot_cache_dir,
)
from tfbackend.engine.cuda_graphs import CompiledForward
from tfbackend.engine.piecewise_compile import start_compile_workers

MAX_MODEL_LEN = 128


@pytest.fixture(autouse=True)
def empty_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFBACKEND_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(AOT_CACHE_ENV, raising=False)  # the saved forwards: under TFBACKEND_CACHE
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "inductor"))
    monkeypatch.setenv(TRITON_CACHE_ENV, str(tmp_path / "triton"))
    torch._dynamo.reset()


def start(path, impl: str) -> tuple[list[list[int]], CompiledForward]:
    """One engine start, on a fresh dynamo as a new process has: its greedy tokens and its compiled forward."""
    torch._dynamo.reset()
    counters.clear()
    tokens, engine = engine_tokens(path, impl)
    return tokens, engine.forward


@pytest.mark.parametrize("impl,family", [("native", "llama"), ("transformers", "gemma2")])
def test_the_second_start_loads_the_saved_forward_with_the_same_tokens(tmp_path, monkeypatch, impl, family):
    path = tmp_path / family
    make_checkpoint(family, path, max_position_embeddings=MAX_MODEL_LEN, num_hidden_layers=3)
    with monkeypatch.context() as eager_only:
        eager = greedy_tokens(path, impl, compiled=False, monkeypatch=eager_only)
    monkeypatch.setattr(worker, "COMPILE_DEVICE_TYPES", ("cuda", "cpu"))
    pool_starts = []  # Inductor's compile workers are started ahead of a compile, not for a loaded forward
    monkeypatch.setattr(worker, "start_compile_workers", lambda device, ranks_on_node: pool_starts.append(device))

    first, forward = start(path, impl)
    assert first == eager
    assert forward.aot_function is not None and not forward.aot_loaded
    saved = list((tmp_path / "cache" / "compile" / "aot").glob("*.bin"))
    assert len(saved) == 1
    assert pool_starts == [torch.device("cpu")]

    second, forward = start(path, impl)
    assert second == eager
    assert forward.aot_loaded
    assert counters["stats"]["unique_graphs"] == 0  # dynamo traced nothing: the saved bytecode ran
    assert len(pool_starts) == 1


@pytest.mark.parametrize("device,starts", [("cuda", 1), ("cpu", 0)])
def test_compile_workers_start_for_gpu_models_only(monkeypatch, device, starts):
    from torch._inductor import async_compile

    calls = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: calls.append(True))
    start_compile_workers(torch.device(device))
    assert len(calls) == starts


@pytest.mark.parametrize("environment,expected", [(None, 8), ("5", 32)])
def test_the_ranks_of_a_node_share_its_compile_workers(monkeypatch, environment, expected):
    from torch._inductor import async_compile
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: None)
    if environment is None:
        monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    else:  # the user's choice stands
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", environment)
    with inductor_config.patch(compile_threads=32):
        start_compile_workers(torch.device("cuda"), ranks_on_node=4)
        assert inductor_config.compile_threads == expected


class Embed(torch.nn.Module):
    """A forward without attention calls: the saved artifact is one piece."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.embed(input_ids)) * 2 + positions[:, None]


def inputs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(count) % 16, torch.arange(count)


def test_a_stale_saved_forward_is_compiled_and_saved_again(tmp_path):
    model, path = Embed(), tmp_path / "forward.bin"
    path.write_bytes(b"not a compiled function")
    expected = model(*inputs(5))
    forward = CompiledForward(model, path)
    torch.testing.assert_close(forward(*inputs(5)), expected)
    assert forward.aot_function is not None and not forward.aot_loaded
    torch._dynamo.reset()
    loaded = CompiledForward(model, path)
    torch.testing.assert_close(loaded(*inputs(5)), expected)
    assert loaded.aot_loaded
    torch.testing.assert_close(loaded(*inputs(9)), model(*inputs(9)))  # one forward for every step size


def test_a_forward_that_cannot_be_saved_compiles_in_process_and_is_not_tried_again(tmp_path, monkeypatch):
    attempts = []

    def fail(*args):
        attempts.append(args)
        raise RuntimeError("cannot save this one")

    monkeypatch.setattr(aot_compile, "compile_and_save", fail)
    model, path = Embed(), tmp_path / "forward.bin"
    for _ in range(2):  # two starts
        torch._dynamo.reset()
        forward = CompiledForward(model, path)
        torch.testing.assert_close(forward(*inputs(5)), model(*inputs(5)))
        assert forward.aot_function is None and forward.compiled is not None
    assert len(attempts) == 1
    assert "cannot save this one" in path.with_suffix(".skip").read_text()


def test_the_saved_forward_is_keyed_by_what_the_compiled_code_depends_on(tmp_path):
    factors = {"config": "{}", "dtype": "torch.bfloat16", "device": ["cuda", "NVIDIA H100", [9, 0]]}
    path = aot_artifact_path(tmp_path, Embed(), factors)
    assert path == aot_artifact_path(tmp_path, Embed(), dict(factors))
    assert path.parent == tmp_path
    assert path != aot_artifact_path(tmp_path, Embed(), factors | {"dtype": "torch.float16"})
    assert path != aot_artifact_path(tmp_path, torch.nn.Linear(1, 1), factors)


def test_saved_forwards_live_under_the_cache_root_unless_the_variable_names_a_folder(tmp_path, monkeypatch):
    assert aot_cache_dir(tmp_path) == tmp_path / "compile" / "aot"
    monkeypatch.setenv(AOT_CACHE_ENV, str(tmp_path / "elsewhere"))
    assert aot_cache_dir(tmp_path) == tmp_path / "elsewhere"
    # `bench --cold` points it into the run's empty cache folder: a cold start finds no saved forward.
    for name, value in compile_cache_env(tmp_path / "cold").items():
        monkeypatch.setenv(name, value)
    assert aot_cache_dir(tmp_path) == tmp_path / "cold" / "aot"
