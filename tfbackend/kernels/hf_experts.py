"""The fused experts kernel as a transformers experts implementation, for the Transformers fallback.

transformers 5 stores a MoE layer's experts as 3D weights in a class decorated with ``@use_experts_implementation``,
whose ``forward(hidden, top_k_index, top_k_weights)`` dispatches through ``ExpertsInterface`` on
``config._experts_implementation``. We register ``fused_experts`` there as ``"tfbackend"``.

Those classes vary in what the decorator's flags say (weights stored (in, out) ``is_transposed``, ``has_bias``,
``has_gate``, ``has_post_expert_norm``) and in ``_apply_gate``, the function from the gate/up outputs to the down
projection's inputs. Rather than trusting class names, ``experts_layout`` runs the module's own ``_apply_gate`` on
a probe and keeps the ``GatedActivation`` that reproduces it. A model whose experts we cannot reproduce keeps
transformers' implementation, and the reason is logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from transformers.integrations.moe import ExpertsInterface

from tfbackend.kernels.fused_moe_reference import gated_activation
from tfbackend.kernels.moe import GatedActivation, fused_experts

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "tfbackend"
_PLAIN_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# Where experts classes keep a clamp limit and gpt-oss's sigmoid scale.
_LIMIT_ATTRIBUTES = ("limit", "swiglu_limit")
_ALPHA_ATTRIBUTES = ("alpha", "swiglu_alpha")
_PROBE_ROWS = 16
_PROBE_RANGE = 12.0


@dataclass(frozen=True)
class ExpertsLayout:
    """What the fused kernel needs to know about one experts module beyond its weights."""

    activation: GatedActivation
    transposed: bool  # weights stored (in, out): gate_up [E, H, 2I], down [E, I, H]
    has_bias: bool


def is_experts_module(module: torch.nn.Module) -> bool:
    """A module of a class decorated with transformers' ``@use_experts_implementation``."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "config")


def experts_layout(module: torch.nn.Module) -> ExpertsLayout | str:
    """The module's layout, or why the fused kernel cannot reproduce it."""
    name = type(module).__name__
    if not module.has_gate:
        return f"{name} has no gate projection (has_gate=False)"
    if getattr(module, "has_post_expert_norm", False):
        return f"{name} normalises each expert's output before the routing weights (has_post_expert_norm)"
    if getattr(module, "_is_expert_parallel", False):
        return f"{name} is expert-parallel"
    names = ["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"] if module.has_bias else [])
    tensors = [getattr(module, attr, None) for attr in names]
    for attr, tensor in zip(names, tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            return f"{name}.{attr} is not a float32/bfloat16/float16 tensor ({kind})"
    gate_up, down = tensors[:2]
    unexpected = f"{name} has expert weights of unexpected shapes {tuple(gate_up.shape)} and {tuple(down.shape)}"
    if gate_up.dim() != 3 or down.dim() != 3:
        return unexpected
    if module.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    num_experts, two_inter, hidden_size = gate_up.shape
    if two_inter % 2 or tuple(down.shape) != (num_experts, hidden_size, two_inter // 2):
        return unexpected
    activation = _probe_activation(module, two_inter)
    if activation is None:
        return f"{name}._apply_gate matches none of act(gate) * up for {_PLAIN_ACTIVATIONS} nor gpt-oss's swiglu"
    return ExpertsLayout(activation, bool(module.is_transposed), bool(module.has_bias))


def _probe_activation(module: torch.nn.Module, gate_up_width: int) -> GatedActivation | None:
    """The candidate activation whose output equals the module's ``_apply_gate`` on random inputs.

    Candidates: every plain activation and gpt-oss's swiglu, in both layouts, unclamped or clamped at a limit
    the module declares. The probe spans twice the largest limit, so a clamp always shows.
    """
    limits = [math.inf, *_numeric_attributes(module, _LIMIT_ATTRIBUTES)]
    alphas = _numeric_attributes(module, _ALPHA_ATTRIBUTES)
    candidates = [
        GatedActivation(kind, interleaved, limit=limit)
        for interleaved in (False, True)
        for limit in limits
        for kind in _PLAIN_ACTIVATIONS
    ] + [
        GatedActivation("gpt_oss_swiglu", interleaved, alpha, limit)
        for interleaved in (False, True)
        for limit in limits
        for alpha in alphas
    ]
    probe_range = max([_PROBE_RANGE] + [2 * limit for limit in limits if limit != math.inf])
    generator = torch.Generator().manual_seed(0)
    probe = (torch.rand(_PROBE_ROWS, gate_up_width, generator=generator) * 2 - 1) * probe_range
    with torch.no_grad():
        try:
            expected = module._apply_gate(probe.to(module.gate_up_proj.device)).float().cpu()
        except Exception as error:  # a gate we cannot even call on a probe is not one we reproduce
            logger.debug("probing %s._apply_gate failed: %s", type(module).__name__, error)
            return None
    for candidate in candidates:
        actual = gated_activation(probe, candidate)
        if actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-5, atol=1e-5):
            return candidate
    return None


def _numeric_attributes(module: torch.nn.Module, names: tuple[str, ...]) -> list[float]:
    values = (getattr(module, name, None) for name in names)
    return sorted({float(value) for value in values if isinstance(value, (int, float)) and not isinstance(value, bool)})


def tfbackend_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, K]
    top_k_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    """The ``"tfbackend"`` experts implementation: ``fused_experts`` on the module's weights."""
    layout = getattr(self, "_tfbackend_layout", None)
    if layout is None:
        raise RuntimeError(
            f"{type(self).__name__} runs the {EXPERTS_IMPLEMENTATION!r} experts implementation without a checked "
            "layout: enable it through tfbackend.kernels.hf_experts.use_fused_experts(model)"
        )
    gate_up, down = self.gate_up_proj, self.down_proj
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return fused_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        gate_up,
        down,
        layout.activation,
        self.gate_up_proj_bias if layout.has_bias else None,
        self.down_proj_bias if layout.has_bias else None,
    )


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, tfbackend_experts_forward)


def use_fused_experts(hf_model: torch.nn.Module) -> bool:
    """Run every experts module of ``hf_model`` through the fused kernel, if all of them can be.

    Returns whether every experts module now uses it. A model without experts modules is left alone (False);
    one with experts the kernel cannot reproduce keeps transformers' implementation, with the reason logged.
    """
    experts = [module for module in hf_model.modules() if is_experts_module(module)]
    if not experts:
        return False
    layouts = [experts_layout(module) for module in experts]
    reasons = sorted({layout for layout in layouts if isinstance(layout, str)})
    if reasons:
        logger.warning(
            "MoE experts keep transformers' %r implementation: %s",
            experts[0].config._experts_implementation, "; ".join(reasons),
        )
        return False
    for module, layout in zip(experts, layouts):
        module._tfbackend_layout = layout
    hf_model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    unswitched = {type(m).__name__ for m in experts if m.config._experts_implementation != EXPERTS_IMPLEMENTATION}
    if unswitched:
        logger.warning("transformers did not switch %s to the fused experts kernel", ", ".join(sorted(unswitched)))
        return False
    logger.info("MoE experts run the fused kernel (%d layers, %s)", len(experts), layouts[0].activation)
    return True
