"""Projections that read the same input, merged into one GEMM at load (the Transformers fallback).

HF attention modules run ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` as three GEMMs, gated MLPs run
``gate_proj(x)`` and ``up_proj(x)`` as two: at batch-1 decode each is a launch reading a slice of the weights,
where one GEMM over the concatenated weights does the same work in one launch. The native port fuses them by
construction; this pass does it for any HF model, without knowing its family.

Nothing is taken from module names. A probe forward records the input of every plain linear layer; the linear
children of one module that received the very same tensor object, once each, in every call, become one group.
Their weights are concatenated once (the originals are freed) into a ``FusedLinears`` registered on that module,
and each member is replaced by a ``LinearSlice``, so the module's own forward still runs: the first member called
with an input computes the fused GEMM, the others serve their columns of its output as views. A member called
with any other input than the one computed for (a branch the probe did not take) gets a fresh GEMM of its own,
so the result is the unfused model's whatever the forward does. A second probe then compares the model's hidden
states with the first; any difference beyond rounding undoes the fusion.

The runtime state is a reference to the current input and which members it has served, plain module
attributes that ``torch.compile`` traces as side effects. In the pattern the probe showed it is empty again
once the last member is served, so no activation outlives a step, and the compiled graph (what CUDA graphs
capture) holds one GEMM per group and no host sync.

Residual + RMSNorm and rotary embeddings are not fused here: they are elementwise, and on the GPU path the
compiled forward's Inductor already fuses them with their neighbours; replacing HF's norm or rotary modules
would need per-family code for no gain under compile.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tfbackend.distributed.layers import ColumnParallelLinear

logger = logging.getLogger(__name__)

FUSION_ENV = "TFBACKEND_FALLBACK_FUSION"  # "0" keeps the model's projections as HF wrote them (to compare)
# Largest per-token relative difference of the probe's hidden states allowed after fusion. The fused GEMM
# computes the same dot products, but a GEMM library may pick another kernel (accumulation order) for the
# wider output; a fusion the forward mishandles changes every token by O(1). Half precision: the median token,
# with the margin of the adapter's step check (rounding grows with depth).
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 0.15, torch.bfloat16: 0.15}


def fusion_enabled() -> bool:
    return os.environ.get(FUSION_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


class FusedLinears(nn.Module):
    """One GEMM for several linear layers that read the same input: ``weight`` is theirs stacked by rows."""

    def __init__(self, names: tuple[str, ...], weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        super().__init__()
        self.names = names
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sizes = sizes
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] | None = None
        self._served = 0  # bit i: member i has taken its part of the current outputs

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s projection of ``x``."""
        bit = 1 << index
        if self._input is not x or self._served & bit:  # a new input: one GEMM for every member
            self._outputs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
            self._input, self._served = x, 0
        out = self._outputs[index]
        self._served |= bit
        if self._served == (1 << len(self.sizes)) - 1:  # all served: hold no activation past this call
            self._input, self._outputs, self._served = None, None, 0
        return out

    def rows(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index] + self.sizes[index])

    def extra_repr(self) -> str:
        return f"{'|'.join(self.names)}: in={self.weight.shape[1]}, out={'+'.join(map(str, self.sizes))}"


class LinearSlice(nn.Module):
    """Stands where one member of a ``FusedLinears`` was: its output is its columns of the fused GEMM. Its
    ``weight`` and ``bias`` are views of the fused ones, for code that reads them (e.g. their dtype)."""

    def __init__(self, fused: FusedLinears, index: int):
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the module holding both owns it
        self.index = index
        self.in_features = fused.weight.shape[1]
        self.out_features = fused.sizes[index]

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.fused.rows(self.index)]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.fused.bias is None else self.fused.bias[self.fused.rows(self.index)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output(self.index, x)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.fused.names}: in={self.in_features}, out={self.out_features}"


@dataclass
class _Group:
    parent: nn.Module
    leaves: list[str]  # the members' attribute names on ``parent``, in the order of the model's modules
    members: list[nn.Module]


def fuse_projections(model: nn.Module, run_probe: Callable[[], torch.Tensor]) -> list[FusedLinears]:
    """Fuse, in place, every group of linear layers of ``model`` that ``run_probe`` (a forward pass returning
    hidden states) shows reading the same input; the fused modules, or none where the check after fusing fails.
    Run it on the model as it will serve (after tensor-parallel splitting, on its device)."""
    candidates = _candidates(model)
    if not candidates:
        return []
    with _recorded_inputs(candidates) as inputs:
        reference = run_probe()
        groups = _groups(model, candidates, inputs)
    if not groups:
        return []
    undo = [_fuse(group) for group in groups]
    fused = [fused_module for fused_module, _ in undo]
    try:
        error = hidden_states_error(run_probe(), reference, reference.dtype)
        reason = None if error <= _TOLERANCE.get(reference.dtype, 0.15) else f"hidden states differ by {error:.2e}"
    except Exception as exception:  # e.g. a forward that reshapes a projection's output in a way a view cannot
        reason = f"{type(exception).__name__}: {exception}"
    if reason is not None:
        for restore in reversed([restore for _, restore in undo]):
            restore()
        logger.warning("%s: projections left unfused, the fused model differs (%s)", type(model).__name__, reason)
        return []
    logger.info("%s: %d groups of projections fused (%s)", type(model).__name__, len(fused),
                ", ".join(sorted({"|".join(f.names) for f in fused})))
    return fused


def _candidates(model: nn.Module) -> dict[nn.Module, tuple[nn.Module, str]]:
    """Linear layers that may be fused -> (their parent, attribute name): a plain GEMM (``nn.Linear``, or a
    column-parallel shard that gathers nothing), attached once, with no hooks and weights of their own."""
    attachments: dict[nn.Module, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for leaf, child in parent.named_children():
            attachments.setdefault(child, []).append((parent, leaf))
    weight_uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        weight_uses[id(param)] = weight_uses.get(id(param), 0) + 1
    result = {}
    for module, places in attachments.items():
        plain = type(module) is nn.Linear or (type(module) is ColumnParallelLinear and not module.gather_output)
        hooked = module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
        shared = any(weight_uses[id(param)] > 1 for param in module.parameters())
        if plain and len(places) == 1 and not hooked and not shared and module.weight.dim() == 2:
            result[module] = places[0]
    return result


@contextlib.contextmanager
def _recorded_inputs(candidates: dict[nn.Module, tuple[nn.Module, str]]) -> Iterator[dict[nn.Module, list]]:
    """The input of each call of each candidate, while inside; ``None`` for a call that was not one tensor."""
    inputs: dict[nn.Module, list] = {module: [] for module in candidates}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        single = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        inputs[module].append(args[0] if single else None)

    handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in candidates]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _groups(model: nn.Module, candidates: dict[nn.Module, tuple[nn.Module, str]], inputs: dict) -> list[_Group]:
    """Siblings that received the same tensors (by identity), each once, with matching weights' dtype, device,
    input width and bias presence; in the order they were first called."""
    by_key: dict[tuple, _Group] = {}
    for module, (parent, leaf) in candidates.items():
        seen = inputs[module]
        if not seen or any(x is None for x in seen) or len({id(x) for x in seen}) != len(seen):
            continue  # never called, called with other than one tensor, or twice on one input
        weight = module.weight
        key = (id(parent), tuple(id(x) for x in seen), weight.dtype, weight.device, weight.shape[1],
               module.bias is not None)
        group = by_key.setdefault(key, _Group(parent, [], []))
        group.leaves.append(leaf)
        group.members.append(module)
    order = {id(module): i for i, module in enumerate(model.modules())}
    groups = [group for group in by_key.values() if len(group.members) > 1]
    for group in groups:  # a stable member order: the modules' order in the model
        pairs = sorted(zip(group.leaves, group.members), key=lambda pair: order[id(pair[1])])
        group.leaves, group.members = [leaf for leaf, _ in pairs], [member for _, member in pairs]
    return groups


def _fuse(group: _Group) -> tuple[FusedLinears, Callable[[], None]]:
    """Concatenate the group's weights into one ``FusedLinears`` and put slices in the members' places; and
    how to undo it (the members get their weights back as views of the fused ones, no copy)."""
    members, parent = group.members, group.parent
    name = "fused_" + "_".join(group.leaves)
    with torch.inference_mode(False), torch.no_grad():  # ordinary parameters, also when run in inference mode
        weight = torch.cat([member.weight for member in members])
        bias = None if members[0].bias is None else torch.cat([member.bias for member in members])
        fused = FusedLinears(tuple(group.leaves), weight, bias, [member.weight.shape[0] for member in members])
        parent.add_module(name, fused)
        for index, (leaf, member) in enumerate(zip(group.leaves, members)):
            setattr(parent, leaf, LinearSlice(fused, index))
            # The member is kept (for undo) with its weights as views of the fused ones: its copies are freed.
            member.weight = nn.Parameter(fused.weight.data[fused.rows(index)], requires_grad=False)
            if bias is not None:
                member.bias = nn.Parameter(fused.bias.data[fused.rows(index)], requires_grad=False)

    def undo() -> None:
        for leaf, member in zip(group.leaves, members):
            setattr(parent, leaf, member)
        delattr(parent, name)

    return fused, undo


def hidden_states_error(hidden: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> float:
    """How far ``hidden`` is from ``reference`` (hidden states of a model run in ``dtype``): the relative error of
    each token, the largest in float32, the median in half precision (whose rounding grows with depth)."""
    per_token = (hidden.float() - reference.float()).norm(dim=-1) / reference.float().norm(dim=-1).clamp_min(1e-12)
    per_token = per_token.flatten()
    return (per_token.max() if dtype == torch.float32 else per_token.median()).item()
