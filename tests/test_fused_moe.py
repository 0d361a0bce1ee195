"""The fused MoE experts: the Triton kernels against the torch reference (on CPU through Triton's interpreter),
the fused experts against transformers' own experts classes, and the fallback running MoE checkpoints with them.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.moe import use_experts_implementation
from transformers.models.auto.configuration_auto import model_type_to_module_name

pytest.importorskip("triton")

from tests.model_zoo import build_tiny_model, causal_lm_types  # noqa: E402
from tests.tiny_models import _widen_init, hf_greedy, make_checkpoint, make_config, random_prompts  # noqa: E402
from tests.triton_interpreter import interpreter_bf16_dot  # noqa: E402, F401
from tfbackend import LLM, SamplingParams  # noqa: E402
from tfbackend.kernels import moe  # noqa: E402
from tfbackend.kernels.fused_moe import fused_experts_triton, sort_pairs_by_expert  # noqa: E402
from tfbackend.kernels.fused_moe_reference import fused_experts_reference  # noqa: E402
from tfbackend.kernels.hf_experts import (  # noqa: E402
    EXPERTS_IMPLEMENTATION,
    experts_layout,
    is_experts_module,
    tfbackend_experts_forward,
    use_fused_experts,
)
from tfbackend.kernels.moe import GatedActivation, fused_experts  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpreter_bf16_dot")
MOE_FAMILIES = ["gpt_oss", "mixtral", "olmoe", "qwen3_moe"]


def random_layer(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden: int = 48,
    inter: int = 40,
    *,
    bias: bool = False,
    transposed: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict:
    """Inputs of ``fused_experts``: routing from a softmax router, weights as (out, in) views.

    ``transposed`` stores the weights (in, out) as gpt-oss does and passes transposed views; 48 and 40 are not
    multiples of any block size, so every masked edge is exercised.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    probs = torch.randn(num_tokens, num_experts, generator=generator).softmax(dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if transposed:
        gate_up = randn(num_experts, hidden, 2 * inter, scale=0.2).transpose(1, 2)
        down = randn(num_experts, inter, hidden, scale=0.2).transpose(1, 2)
    else:
        gate_up = randn(num_experts, 2 * inter, hidden, scale=0.2)
        down = randn(num_experts, hidden, inter, scale=0.2)
    return dict(
        hidden=randn(num_tokens, hidden),
        topk_ids=topk_ids,
        topk_weights=topk_weights,
        gate_up=gate_up,
        down=down,
        gate_up_bias=randn(num_experts, 2 * inter) if bias else None,
        down_bias=randn(num_experts, hidden) if bias else None,
    )


def kernel_vs_reference(layer: dict, activation: GatedActivation) -> float:
    args = [layer[name] for name in ("hidden", "topk_ids", "topk_weights", "gate_up", "down")]
    biases = layer["gate_up_bias"], layer["down_bias"]
    out = fused_experts_triton(*args, activation, *biases)
    expected = fused_experts_reference(*args, activation, *biases)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


# One token (the unsorted decode path), token counts that are not multiples of the row blocks, from 1 to 260 pairs
# per expert (each of moe_tiles' row-block sizes), more pairs than one sorting-kernel scan block of 1024, top-1,
# and every expert chosen (top_k = num_experts).
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k"),
    [(1, 4, 2), (1, 8, 8), (7, 8, 2), (40, 16, 4), (33, 6, 3), (90, 3, 1), (520, 4, 2)],
)
def test_kernel_matches_reference(num_tokens, num_experts, top_k):
    layer = random_layer(num_tokens, num_experts, top_k)
    assert kernel_vs_reference(layer, GatedActivation("silu")) < 1e-5


@pytest.mark.parametrize(
    "activation",
    [
        GatedActivation("gelu"),
        GatedActivation("gelu_tanh", interleaved=True),
        GatedActivation("relu", limit=1.0),
        GatedActivation("gpt_oss_swiglu", interleaved=True, alpha=1.702, limit=1.0),
    ],
    ids=lambda activation: activation.kind,
)
@pytest.mark.parametrize("num_tokens", [1, 19])
def test_kernel_activations_layouts_and_biases(activation, num_tokens):
    """Gate/up interleaved or concatenated, weights stored (in, out) with biases, as gpt-oss has them.

    A limit of 1 clamps most gate and up values, so the clamps are exercised."""
    layer = random_layer(num_tokens, 6, 2, bias=True, transposed=True)
    assert kernel_vs_reference(layer, activation) < 1e-5


@pytest.mark.parametrize("num_tokens", [1, 24])
def test_kernel_bf16(num_tokens):
    layer = random_layer(num_tokens, 8, 2, dtype=torch.bfloat16)
    assert kernel_vs_reference(layer, GatedActivation("silu")) < 2e-2


def test_sort_pairs_by_expert():
    """Every pair once, grouped by expert in order, in segments padded to whole blocks; spare blocks: no expert."""
    block_m, num_experts = 4, 5
    topk_ids = torch.tensor([[3, 0], [3, 1], [0, 3], [4, 3], [3, 0], [1, 4]])  # expert 2 never chosen
    sorted_pairs, block_expert = sort_pairs_by_expert(topk_ids, num_experts, block_m)
    num_pairs = topk_ids.numel()
    # room for 12 pairs + 3 padding rows for each of the 5 experts: 27 rows, 7 blocks; 5 are used
    assert block_expert.tolist() == [0, 1, 3, 3, 4, num_experts, num_experts]
    sentinel = num_pairs
    assert sorted_pairs[:20].tolist() == [
        1, 4, 9, sentinel,  # expert 0: pair p is token p // 2's choice p % 2
        3, 10, sentinel, sentinel,  # expert 1
        0, 2, 5, 7,  # expert 3: five pairs fill one block and start the next
        8, sentinel, sentinel, sentinel,
        6, 11, sentinel, sentinel,  # expert 4
    ]  # fmt: skip


def test_fused_experts_rejects_mismatched_shapes():
    layer = random_layer(3, 4, 2)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_experts(layer["hidden"], layer["topk_ids"][:2], layer["topk_weights"], layer["gate_up"], layer["down"])
    with pytest.raises(ValueError, match="down"):
        fused_experts(layer["hidden"], layer["topk_ids"], layer["topk_weights"], layer["gate_up"], layer["gate_up"])
    with pytest.raises(ValueError, match="unknown gated activation"):
        GatedActivation("swish")


def test_custom_op_registration():
    """Schema, fake (meta) implementation and dispatch agree, so torch.compile can keep the op opaque."""
    layer = random_layer(5, 4, 2, bias=True)
    args = (
        *(layer[name] for name in ("hidden", "topk_ids", "topk_weights", "gate_up", "down")),
        layer["gate_up_bias"], layer["down_bias"], "silu", False, 1.0, math.inf,
    )
    torch.library.opcheck(torch.ops.tfbackend.fused_experts.default, args)


def random_hf_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(model_type)).eval()
    _widen_init(model)
    return model


def use_triton_kernels(monkeypatch: pytest.MonkeyPatch, enabled: bool) -> None:
    """Run the fused experts through the Triton kernels (interpreted on CPU) or the torch reference."""
    monkeypatch.setattr(moe, "_use_triton", lambda device: enabled)


# Every family through the reference; through the (slow) interpreter the two layouts: gpt-oss's transposed,
# interleaved, biased clamped swiglu and qwen3-moe's plain silu.
@pytest.mark.parametrize(
    ("model_type", "triton"),
    [*((family, False) for family in MOE_FAMILIES), ("gpt_oss", True), ("qwen3_moe", True)],
)
@torch.no_grad()
def test_fused_experts_reproduce_hf_experts(model_type, triton, monkeypatch):
    """The whole HF model's logits with transformers' eager experts and with ours, on the installed classes."""
    use_triton_kernels(monkeypatch, triton)
    model = random_hf_model(model_type)
    input_ids = torch.tensor([random_prompts([11])[0]])
    model.set_experts_implementation("eager")
    expected = model(input_ids).logits
    assert use_fused_experts(model)
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    actual = model(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def experts_model_types() -> list[str]:
    """Causal-LM types whose modeling code uses ``@use_experts_implementation`` (read, not imported)."""
    types = []
    for model_type in causal_lm_types():
        module = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
        if spec is not None and "@use_experts_implementation" in Path(spec.origin).read_text():
            types.append(model_type)
    return types


@pytest.mark.parametrize("model_type", experts_model_types())
@torch.no_grad()
def test_every_installed_experts_class_is_reproduced_or_refused(model_type):
    """Each experts module of every MoE family the installed transformers ships either gives, through the fused
    experts, the output of transformers' own eager implementation, or is refused with a reason (and then keeps
    transformers' implementation: see the toy classes above)."""
    try:
        model = build_tiny_model(model_type)
    except Exception as error:  # a gap of the model zoo, not of the experts
        pytest.skip(f"no tiny {model_type} model: {type(error).__name__}: {error}")
    generator = torch.Generator().manual_seed(0)
    for module in (m for m in model.modules() if is_experts_module(m)):
        layout = experts_layout(module)
        if isinstance(layout, str):
            continue
        num_experts = module.gate_up_proj.shape[0]
        hidden_size = module.gate_up_proj.shape[1 if module.is_transposed else 2]
        hidden = torch.randn(9, hidden_size, generator=generator)
        weights, ids = torch.topk(torch.randn(9, num_experts, generator=generator).softmax(-1), min(2, num_experts))
        module.config._experts_implementation = "eager"
        expected = module(hidden, ids, weights)
        module._tfbackend_layout = layout
        actual = tfbackend_experts_forward(module, hidden, ids, weights)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_models_without_experts_are_left_alone():
    model = random_hf_model("llama")
    assert not use_fused_experts(model)
    assert model.config._experts_implementation != EXPERTS_IMPLEMENTATION


class _ToyExperts(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(2, 8, 4))
        self.up_proj = torch.nn.Parameter(torch.randn(2, 4, 4))
        self.down_proj = torch.nn.Parameter(torch.randn(2, 4, 4))
        self.act_fn = torch.nn.SiLU()


class _SquaredGateExperts(_ToyExperts):
    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return gate * gate * up


@pytest.mark.parametrize(
    ("experts_class", "reason"),
    [
        (use_experts_implementation(has_gate=False)(type("UpOnlyExperts", (_ToyExperts,), {})), "has_gate=False"),
        (use_experts_implementation(_SquaredGateExperts), "_apply_gate matches none"),
        (use_experts_implementation(type("PlainExperts", (_ToyExperts,), {})), None),
    ],
)
def test_experts_the_kernel_cannot_reproduce_keep_hf_implementation(experts_class, reason, caplog):
    config = PretrainedConfig()
    config._experts_implementation = "eager"
    experts = experts_class(config)
    layout = experts_layout(experts)
    if reason is None:
        assert layout.activation == GatedActivation("silu")
        return
    assert reason in layout
    with caplog.at_level(logging.WARNING):
        assert not use_fused_experts(torch.nn.ModuleList([experts]))
    assert reason in caplog.text and "keep transformers' 'eager' implementation" in caplog.text
    assert config._experts_implementation == "eager"


def test_fallback_greedy_parity_through_the_triton_kernels(tmp_path, monkeypatch):
    """The engine's fallback with the interpreted Triton kernels generates what HF generate does (float32).

    The second request outlives the first, so the last steps decode one token (the kernels' unsorted path).
    (The torch reference path is held to the same in tests/test_fallback_parity.py, for every MoE family.)"""
    use_triton_kernels(monkeypatch, True)
    hf_model = make_checkpoint("gpt_oss", tmp_path)
    prompts, max_tokens = random_prompts([9, 3]), [3, 8]
    llm = LLM(
        str(tmp_path), model_impl="transformers", dtype="float32", device="cpu", block_size=4, max_model_len=64,
        kv_cache_memory=2**20,
    )
    assert llm.engine.model.hf_model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    params = [SamplingParams(temperature=0, max_tokens=n) for n in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    expected = [tokens[:n] for tokens, n in zip(hf_greedy(hf_model, prompts, max(max_tokens)), max_tokens)]
    assert [out.outputs[0].token_ids for out in outputs] == expected
