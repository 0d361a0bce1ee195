"""Ready means fast: the compile cache's location, the startup report, and nothing compiling after ready.

On a CPU the engine compiles nothing, so the tests that need compilation turn it on for the CPU with
torch.compile's "eager" backend: dynamo traces, guards and recompiles exactly as on a GPU, without generating
code. Triton kernels and CUDA graphs need a GPU; ``benchmarks/startup_check.sh`` counts those.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from tests.tiny_models import make_checkpoint, random_prompts

from tfbackend.config import EngineConfig
from tfbackend.engine import worker
from tfbackend.engine.compile_cache import INDUCTOR_CACHE_ENV, TRITON_CACHE_ENV, configure_compile_cache
from tfbackend.engine.cuda_graphs import CompiledForward
from tfbackend.engine.llm_engine import LLMEngine
from tfbackend.engine.startup import PHASES
from tfbackend.engine.warmup import query_length_ladder, warmup_shapes
from tfbackend.sampling_params import SamplingParams

MAX_BATCHED_TOKENS = 32
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint("llama", path, max_position_embeddings=MAX_MODEL_LEN)
    return path


@pytest.fixture(autouse=True)
def compile_cache_env(tmp_path, monkeypatch):
    """Each test gets its own cache root, and the variables the engine sets are restored afterwards."""
    monkeypatch.setenv("TFBACKEND_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(INDUCTOR_CACHE_ENV, raising=False)
    monkeypatch.delenv(TRITON_CACHE_ENV, raising=False)


@pytest.fixture
def compile_on_cpu(monkeypatch):
    monkeypatch.setattr(worker, "COMPILE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(CompiledForward, "backend", "eager")


def make_engine(checkpoint: Path, **overrides) -> LLMEngine:
    config = dict(model=str(checkpoint), model_impl="native", device="cpu", dtype="float32", block_size=4,
                  max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=MAX_BATCHED_TOKENS, max_num_seqs=8,
                  kv_cache_memory=1 << 20)
    return LLMEngine(EngineConfig(**(config | overrides)))


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 3) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compile_caches_default_under_tfbackend_cache(tmp_path):
    dirs = configure_compile_cache(tmp_path)
    assert dirs.inductor == tmp_path / "compile" / "inductor" and not dirs.inductor_from_user
    assert dirs.triton == tmp_path / "compile" / "triton" and not dirs.triton_from_user
    assert os.environ[INDUCTOR_CACHE_ENV] == str(dirs.inductor)
    assert os.environ[TRITON_CACHE_ENV] == str(dirs.triton)


def test_compile_caches_keep_the_users_directories(tmp_path, monkeypatch):
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine-inductor"))
    monkeypatch.setenv(TRITON_CACHE_ENV, str(tmp_path / "mine-triton"))
    dirs = configure_compile_cache(tmp_path / "tfbackend")
    assert (dirs.inductor, dirs.triton) == (tmp_path / "mine-inductor", tmp_path / "mine-triton")
    assert dirs.inductor_from_user and dirs.triton_from_user
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "mine-inductor")


def test_engine_points_the_caches_at_tfbackend_cache(checkpoint, tmp_path):
    make_engine(checkpoint)
    assert os.environ[INDUCTOR_CACHE_ENV] == str(tmp_path / "cache" / "compile" / "inductor")
    assert os.environ[TRITON_CACHE_ENV] == str(tmp_path / "cache" / "compile" / "triton")


def test_startup_report_has_one_line_per_phase(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="tfbackend.engine.startup"):
        engine = make_engine(checkpoint)
    lines = [record.getMessage() for record in caplog.records if record.name == "tfbackend.engine.startup"]
    for phase, line in zip((*PHASES, "total"), lines, strict=True):
        assert line.startswith(f"startup: {phase} ")
    assert "skipped: nothing compiles on cpu" in lines[PHASES.index("compile")]
    assert set(engine.startup.seconds) == {*PHASES, "total"}
    assert engine.startup.seconds["total"] >= engine.startup.seconds["load weights"] > 0


def test_warmup_shapes_fit_the_step_budget():
    assert query_length_ladder(40) == [2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 40]
    shapes = warmup_shapes(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=100)
    for step in shapes:
        assert 1 <= len(step) <= 4
        assert sum(query for query, _ in step) <= 64
        assert all(query + context <= 100 for query, context in step)
    assert [(64, 0)] in shapes and [(64, 36)] in shapes  # the longest chunk, alone, from 0 and after a context
    assert [(1, 0)] * 4 in shapes  # a full decode batch


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_no_compilation_after_ready_across_step_sizes(checkpoint, compile_on_cpu, caplog, impl):
    engine = make_engine(checkpoint, model_impl=impl)
    assert isinstance(engine.forward, CompiledForward)
    assert engine.compile_monitor.during_startup().torch_compile_graphs >= 1
    assert engine.startup.seconds["compile"] > 0 and engine.startup.seconds["warm up"] > 0
    with caplog.at_level(logging.WARNING, logger="tfbackend.engine.llm_engine"):
        generate(engine, random_prompts([1]))  # a lone decode: one token per step
        generate(engine, random_prompts([1, 7, 40, 100, 3, 64, 17, 2]))  # chunked prefills, mixed steps
    assert engine.stats().compilations_after_ready.total == 0
    assert "compiled after ready" not in caplog.text


@pytest.mark.parametrize("model_type,impl", [("llama", "native"), ("llama", "transformers"), ("gemma2", "transformers"),
                                             ("olmoe", "transformers")])
def test_one_compiled_graph_serves_every_step_size_one_token_included(tmp_path, compile_on_cpu, model_type, impl):
    """The token count is unbacked: dynamo neither specializes it at 1 nor guards on it, so the batch-1 decode
    and the largest chunk share the graph compiled at startup (each further graph was a full compile on a GPU)."""
    path = tmp_path / model_type
    make_checkpoint(model_type, path, max_position_embeddings=MAX_MODEL_LEN)
    torch._dynamo.reset()
    engine = make_engine(path, model_impl=impl)
    assert engine.forward.unbacked_tokens and engine.compile_monitor.during_startup().torch_compile_graphs == 1
    generate(engine, random_prompts([1]))
    generate(engine, random_prompts([1, 7, 40, 2]))
    assert engine.stats().compilations_after_ready.total == 0


def test_a_model_that_needs_a_backed_token_count_still_compiles():
    """Compiling with the unbacked size failing is not fatal: the forward compiles with a plain dynamic size."""
    model = torch.nn.Embedding(10, 4)
    compiled = CompiledForward(model)
    calls = []

    def refuse_unbacked(input_ids, positions):
        calls.append(hasattr(input_ids, "_dynamo_unbacked_indices"))
        if calls[-1]:
            raise torch._dynamo.exc.TorchDynamoException("could not guard on data-dependent expression")
        return model(input_ids)

    compiled.compiled = refuse_unbacked
    ids = torch.tensor([1, 2, 3])
    torch.testing.assert_close(compiled(ids, ids), model(ids))
    assert calls == [True, False] and not compiled.unbacked_tokens and compiled.compiled is refuse_unbacked


def test_a_forced_recompile_is_counted_and_warned(checkpoint, compile_on_cpu, caplog):
    engine = make_engine(checkpoint)
    torch._dynamo.reset()  # drops every compiled graph: the next step must compile again
    with caplog.at_level(logging.WARNING, logger="tfbackend.engine.llm_engine"):
        generate(engine, random_prompts([5]), max_tokens=2)
    assert engine.stats().compilations_after_ready.torch_compile_graphs >= 1
    assert "compiled after ready, in a step of 5 tokens over 1 sequences" in caplog.text


def test_enforce_eager_compiles_nothing(checkpoint, compile_on_cpu, caplog):
    before = dynamo_graphs()
    with caplog.at_level(logging.INFO, logger="tfbackend.engine.startup"):
        engine = make_engine(checkpoint, enforce_eager=True)
    generate(engine, random_prompts([3, 20]))
    assert engine.forward is engine.model
    assert dynamo_graphs() == before
    assert engine.compile_monitor.during_startup().total == 0
    assert caplog.text.count("skipped: enforce_eager") == 3  # compile, warm up, capture graphs


def test_serving_on_a_cpu_never_imports_triton_or_dynamo(checkpoint):
    """Triton compiles only for a GPU, and an eager CPU engine compiles nothing: importing them (dynamo comes
    with a custom op's first call, Triton with dynamo) cost a second and a half, at startup or in the first
    request."""
    script = (
        "import sys\n"
        "import tfbackend.entrypoints.serve, tfbackend.server.app\n"
        "from tests.test_startup import generate, make_engine\n"
        f"generate(make_engine({str(checkpoint)!r}), [[1, 2, 3], [4, 5]])\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'triton' or name == 'torch._dynamo'))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_eager_engine_takes_its_first_steps_before_ready(checkpoint):
    """Nothing compiles on a CPU, but a process's first step has one-time costs: the warm-up pays them (a
    skipped phase records 0 s); ``enforce_eager`` skips it."""
    assert make_engine(checkpoint).startup.seconds["warm up"] > 0
    assert make_engine(checkpoint, enforce_eager=True).startup.seconds["warm up"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kv_cache_starts_zeroed_and_writable(dtype):
    """On the CPU the cache comes from calloc (no memset at startup); it must still read as zeros."""
    from tfbackend.kv_cache import KVCache, KVCacheSpec
    from tfbackend.model_interface import AttentionLayerSpec

    cache = KVCache(KVCacheSpec((AttentionLayerSpec(2, 16, 16),), dtype, 4), 8, torch.device("cpu"))
    assert cache.storage.dtype == dtype and not cache.storage.any()
    key, value = cache.layers[0]
    key[3].fill_(1.0)
    assert cache.storage.sum() == key[3].numel()
    assert KVCache(KVCacheSpec((), dtype, 4), 8, torch.device("cpu")).storage.numel() == 0  # compat: no layers


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_engine_starts_with_the_collector_paused_and_collects_once(checkpoint, monkeypatch):
    """Startup's objects would cost every full collection a walk over a million of them: the collector is off
    while the engine builds, then one collection frees startup's garbage cycles before ready (not in the first
    request), and the caller's setting is restored. Nothing is frozen: a program may drop this engine."""
    from tfbackend.engine import llm_engine

    seen = {}
    build = llm_engine.LLMEngine._build

    def spying_build(self, config):
        seen["enabled while building"] = gc.isenabled()
        seen["garbage"] = weakref.ref(_Cycle())  # unreachable but for its own cycle
        build(self, config)

    monkeypatch.setattr(llm_engine.LLMEngine, "_build", spying_build)
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    make_engine(checkpoint)
    assert seen["enabled while building"] is False
    assert seen["garbage"]() is None
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_a_paused_collector_stays_as_the_caller_left_it():
    from tfbackend.engine.startup import paused_gc

    gc.disable()
    try:
        with paused_gc(collect=True):
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("a failed start")
    assert gc.isenabled()


def test_a_serving_process_freezes_its_startup_objects_and_exits_quietly():
    """``serve`` and rank workers keep one engine for life: its objects leave the collector's sight, and are
    handed back at exit (frozen objects would skip the last collection; Triton's bindings then report leaks)."""
    script = (
        "import gc, triton\n"
        "from tfbackend.engine.startup import freeze_startup_objects\n"
        "freeze_startup_objects()\n"
        "print(gc.get_freeze_count() > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert result.stdout.strip() == "True"
    assert "leaked" not in result.stderr
