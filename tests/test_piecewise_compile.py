"""Piecewise compilation: Inductor compiles the graph piece by piece between attention calls, identical layers once.

These tests generate code for real (Inductor's C++ backend on the CPU, ~20 s each), since what they check is
Inductor's: the compiled pieces give the eager model's tokens, and the pieces of identical layers are
compiled once.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import make_checkpoint, random_prompts
from tfbackend.config import EngineConfig
from tfbackend.engine import worker
from tfbackend.engine.compile_cache import INDUCTOR_CACHE_ENV, TRITON_CACHE_ENV
from tfbackend.engine.cuda_graphs import CompiledForward
from tfbackend.engine.llm_engine import LLMEngine
from tfbackend.engine.piecewise_compile import piece_signature, piecewise_inductor
from tfbackend.sampling_params import SamplingParams

MAX_MODEL_LEN = 128


@pytest.fixture(autouse=True)
def empty_compile_cache(tmp_path, monkeypatch):
    """Empty compile caches of this test's own (named outright: anything that asked torch for its cache folder
    earlier in the process has set the variable to torch's shared default)."""
    monkeypatch.setenv("TFBACKEND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "inductor"))
    monkeypatch.setenv(TRITON_CACHE_ENV, str(tmp_path / "triton"))
    torch._dynamo.reset()


def greedy_tokens(path, impl: str, compiled: bool, monkeypatch) -> list[list[int]]:
    """Greedy tokens from an engine compiled in process (or run eagerly)."""
    monkeypatch.setattr(worker, "COMPILE_DEVICE_TYPES", ("cuda", "cpu") if compiled else ("cuda",))
    monkeypatch.setattr(worker.Worker, "_aot_path", lambda self, hf_config: None)  # in process (test_aot_compile)
    tokens, engine = engine_tokens(path, impl)
    assert isinstance(engine.forward, CompiledForward) == compiled
    assert not compiled or engine.forward.compiled is not None, "the compile failed: the model runs uncompiled"
    return tokens


def engine_tokens(path, impl: str) -> tuple[list[list[int]], LLMEngine]:
    """A new engine's greedy tokens for a chunked prefill, mixed steps and one-token decodes; and the engine."""
    engine = LLMEngine(EngineConfig(model=str(path), model_impl=impl, device="cpu", dtype="float32", block_size=4,
                                    max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=32, max_num_seqs=4,
                                    kv_cache_memory=1 << 20))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompts = random_prompts([3, 40, 1])
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.outputs[0].token_ids
    assert engine.stats().compilations_after_ready.total == 0
    return [tokens[str(i)] for i in range(len(prompts))], engine


@pytest.mark.parametrize("impl,num_layers", [("native", 4), ("transformers", 3)])
def test_pieces_give_the_eager_tokens_and_identical_layers_compile_once(tmp_path, monkeypatch, impl, num_layers):
    from torch._dynamo.utils import counters

    path = tmp_path / "llama"
    make_checkpoint("llama", path, max_position_embeddings=MAX_MODEL_LEN, num_hidden_layers=num_layers)
    assert CompiledForward.backend is piecewise_inductor
    eager = greedy_tokens(path, impl, compiled=False, monkeypatch=monkeypatch)
    counters.clear()
    compiled = greedy_tokens(path, impl, compiled=True, monkeypatch=monkeypatch)
    assert compiled == eager
    # The pieces: before the first attention call, between each two (num_layers - 1, all the same graph) and
    # after the last. Inductor compiles three of them; the layers' pieces share one compiled function.
    assert counters["inductor"]["fxgraph_cache_miss"] == 3
    assert counters["inductor"]["fxgraph_cache_hit"] == 0


def test_a_graph_without_attention_compiles_whole(monkeypatch):
    """A graph break's tail, or a model whose attention is not the paged op: one piece, Inductor on all of it."""
    compiled_graphs = []
    real = torch._inductor.compile_fx.compile_fx

    def counting_compile_fx(gm, example_inputs, *args, **kwargs):
        compiled_graphs.append(gm)
        return real(gm, example_inputs, *args, **kwargs)

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", counting_compile_fx)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU(), torch.nn.Linear(8, 8))
    x = torch.randn(5, 8)
    with torch.no_grad():
        out = torch.compile(model, backend=piecewise_inductor, dynamic=True)(x)
        torch.testing.assert_close(out, model(x))
    assert len(compiled_graphs) == 1


def test_pieces_differing_only_in_their_inputs_names_share_a_signature():
    from torch.fx.experimental.proxy_tensor import make_fx

    def piece(weight, x):
        return torch.nn.functional.silu(x @ weight.t()) + x

    x, w = torch.randn(3, 4), torch.randn(4, 4)
    first, second = make_fx(piece)(w, x), make_fx(piece)(w, x)
    for node in second.graph.nodes:  # another layer's piece: the same graph, other input names
        if node.op == "placeholder":
            node.name = node.target = node.name + "_layer_7"
    second.recompile()
    assert piece_signature(first, [w, x]) == piece_signature(second, [w, x])
    assert piece_signature(first, [w, x]) != piece_signature(first, [w, x[:2]])  # other input sizes
    other = make_fx(lambda weight, x: torch.nn.functional.gelu(x @ weight.t()) + x)(w, x)
    assert piece_signature(first, [w, x]) != piece_signature(other, [w, x])  # other computation


def test_pieces_embedding_different_constants_do_not_share_code():
    class Scaled(torch.nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            self.register_buffer("scale", torch.tensor(scale))

        def forward(self, x):
            return x * self.scale

    x = torch.randn(3)
    first, second = (torch.fx.symbolic_trace(Scaled(s)) for s in (2.0, 3.0))
    assert any(node.op == "get_attr" for node in first.graph.nodes)
    assert piece_signature(first, [x]) != piece_signature(second, [x])
