"""The fallback runs projections that read the same input as one GEMM (tfbackend.fallback_fusion).

Found from what a probe forward shows, not from names: q/k/v and gate/up of Llama-, Qwen3- and Gemma-2-type
models fuse, a model that already fuses them (or keeps them in Conv1D) is left alone, siblings fed different
tensors stay apart, and a fusion the model's forward cannot take is undone. The fused model computes what the
unfused one computes, traces as one graph, and composes with tensor parallelism and FP8 linears. Greedy parity
with HF for every family is in test_fallback_parity.py, which runs with the fusion on.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.parallel_runs import NEW_TOKENS, compiled_forward_difference, generate, prompts_below
from tests.tiny_models import hf_greedy, make_checkpoint
from tfbackend.adapter import TransformersForCausalLM
from tfbackend.distributed.launch import run_spmd
from tfbackend.distributed.rendezvous import Rendezvous, free_port
from tfbackend.fallback_fusion import FUSION_ENV, FusedLinears, LinearSlice, fuse_projections
from tfbackend.hf_classes import load_hf_config
from tfbackend.quantization.linear import QuantizedLinear

CPU = torch.device("cpu")
LAYERS = 2  # of the tiny checkpoints
_GEMMS = {torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class _CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in _GEMMS
        return func(*args, **(kwargs or {}))


def load_fallback(model_dir, **kwargs) -> TransformersForCausalLM:
    return TransformersForCausalLM.load(model_dir, load_hf_config(model_dir, False), torch.float32, CPU, **kwargs)


def probe_run(model: TransformersForCausalLM) -> tuple[torch.Tensor, int]:
    """Hidden states of the probe prompt, and how many GEMMs the decoder ran for them."""
    with torch.inference_mode(), _CountGemms() as gemms:
        hidden = model._probe_hidden_states()
    return hidden, gemms.count


def fused_names(model: nn.Module) -> list[tuple[str, ...]]:
    return [module.names for module in model.modules() if isinstance(module, FusedLinears)]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_qkv_and_gate_up_run_as_one_gemm_each(model_type, tmp_path, monkeypatch):
    make_checkpoint(model_type, tmp_path)
    fused = load_fallback(tmp_path)
    assert fused_names(fused.hf_model) == [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")] * LAYERS
    assert fused.fused_projections == [m for m in fused.hf_model.modules() if isinstance(m, FusedLinears)]
    monkeypatch.setenv(FUSION_ENV, "0")
    plain = load_fallback(tmp_path)
    assert fused_names(plain.hf_model) == []
    fused_hidden, fused_gemms = probe_run(fused)
    plain_hidden, plain_gemms = probe_run(plain)
    # Per layer 7 GEMMs (q, k, v, o, gate, up, down) become 4.
    assert (plain_gemms, fused_gemms) == (7 * LAYERS, 4 * LAYERS)
    torch.testing.assert_close(fused_hidden, plain_hidden, rtol=1e-5, atol=1e-5)


def test_originals_are_freed_and_slices_read_the_fused_weights(tmp_path):
    hf_model = make_checkpoint("qwen2", tmp_path)  # q/k/v with biases
    model = load_fallback(tmp_path)
    attention = model.hf_model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, LinearSlice)
    fused = attention.fused_q_proj_k_proj_v_proj
    reference = hf_model.model.layers[0].self_attn
    for leaf in ("q_proj", "k_proj", "v_proj"):
        part, original = getattr(attention, leaf), getattr(reference, leaf)
        assert torch.equal(part.weight, original.weight) and torch.equal(part.bias, original.bias)
        assert part.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    # The model holds each weight once: as many parameter elements as the checkpoint.
    assert sum(p.numel() for p in model.hf_model.parameters()) == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("model_type", ["gpt2", "phi3"])
def test_models_without_separate_projections_are_left_alone(model_type, tmp_path):
    make_checkpoint(model_type, tmp_path)  # GPT-2: Conv1D c_attn; Phi-3: qkv_proj and gate_up_proj already fused
    model = load_fallback(tmp_path)
    assert model.fused_projections == [] and fused_names(model.hf_model) == []


class _Attention(nn.Module):
    """q and k read the hidden states; v reads ``value_input`` when given (cross-attention-like)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))

    def forward(self, hidden: torch.Tensor, value_input: torch.Tensor | None = None) -> torch.Tensor:
        q, k = self.q_proj(hidden), self.k_proj(hidden)
        v = self.v_proj(hidden if value_input is None else value_input)
        return q * k + v


def test_siblings_fed_other_tensors_are_not_fused():
    torch.manual_seed(0)
    module, hidden = _Attention(), torch.randn(2, 3, 8)
    other = hidden.clone()  # equal values, another tensor: the probe proves nothing for v
    reference = module(hidden, other)
    fused = fuse_projections(module, lambda: module(hidden, other))
    assert [f.names for f in fused] == [("q_proj", "k_proj")]
    assert type(module.v_proj) is nn.Linear
    torch.testing.assert_close(module(hidden, other), reference)


def test_a_branch_the_probe_did_not_take_still_computes_each_projection():
    torch.manual_seed(0)
    module, hidden = _Attention(), torch.randn(2, 3, 8)
    plain = copy.deepcopy(module)
    assert [f.names for f in fuse_projections(module, lambda: module(hidden))] == [("q_proj", "k_proj", "v_proj")]
    fused = module.fused_q_proj_k_proj_v_proj
    # v reads another tensor than q and k: it gets a GEMM of its own.
    value_input = torch.randn(2, 3, 8)
    torch.testing.assert_close(module(hidden, value_input), plain(hidden, value_input))
    # The pattern the probe showed: one GEMM serves all three, and no activation is held after the call.
    torch.testing.assert_close(module(hidden), plain(hidden))
    assert fused._input is None and fused._outputs is None


class _FlattensProjection(nn.Module):
    """Flattens a projection with ``view``, which a column slice of a fused output (not contiguous) cannot do:
    the check after fusing must undo the fusion."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.up_proj, self.gate_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up_proj(hidden).view(-1) * F.silu(self.gate_proj(hidden)).reshape(-1)


def test_a_fusion_the_forward_cannot_take_is_undone():
    torch.manual_seed(0)
    module, hidden = _FlattensProjection(), torch.randn(2, 3, 8)
    reference = module(hidden)
    assert fuse_projections(module, lambda: module(hidden)) == []
    assert type(module.up_proj) is nn.Linear and type(module.gate_proj) is nn.Linear
    assert not any(isinstance(m, FusedLinears) for m in module.modules())
    torch.testing.assert_close(module(hidden), reference, rtol=0, atol=0)


def test_fused_model_traces_as_one_graph(tmp_path):
    """The GPU path compiles the forward and captures it in CUDA graphs: the fused GEMMs and their per-call state
    must trace without a graph break (``fullgraph``) and compute what the eager model computes (traced and run
    through AOTAutograd without code generation, so exactly; test_piecewise_compile.py generates code)."""
    make_checkpoint("llama", tmp_path)
    assert compiled_forward_difference(tmp_path, "transformers", backend="aot_eager") == 0.0


def _fused_shards(model_dir) -> list[tuple[tuple[str, ...], list[int]]]:
    """Run on every rank: this rank's fused groups and their widths."""
    from tfbackend.registry import load_model

    model, _ = load_model(model_dir, load_hf_config(model_dir, False), "transformers", torch.float32, CPU)
    return [(fused.names, fused.sizes) for fused in model.fused_projections]


def test_fusion_applies_to_each_ranks_shards(tmp_path):
    hf_model = make_checkpoint("llama", tmp_path)
    rendezvous = Rendezvous("127.0.0.1", free_port(), 2, 1, 1, "cpu")
    # Two ranks: q 4 heads -> 2, k and v 2 KV heads -> 1 (head_dim 16); gate and up 128 -> 64.
    assert run_spmd(_fused_shards, (tmp_path,), rendezvous) == [
        (("q_proj", "k_proj", "v_proj"), [32, 16, 16]), (("gate_proj", "up_proj"), [64, 64])] * LAYERS
    prompts = prompts_below(256)
    tokens, _ = generate(tmp_path, prompts, model_impl="transformers", tensor_parallel_size=2)
    assert tokens == hf_greedy(hf_model, prompts, NEW_TOKENS)


def test_fp8_linears_are_left_to_their_own_gemms(tmp_path):
    make_checkpoint("llama", tmp_path)
    model = load_fallback(tmp_path, quantization="fp8")
    assert len([m for m in model.hf_model.modules() if isinstance(m, QuantizedLinear)]) == 7 * LAYERS
    assert model.fused_projections == []
