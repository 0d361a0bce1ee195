"""Putting quantized linears into a model and streaming a checkpoint into it (native ports and the fallback).

A model lists its linear layers as ``LinearSlot``s (module name, checkpoint names of its shards, their sizes);
``replace_linears`` swaps those the checkpoint stores quantized for the method's ``QuantizedLinear``, and
``load_tensors`` copies dense tensors into parameters and hands quantized ones to the layers' sinks, strictly:
every unexpected and every missing tensor is reported, with its checkpoint name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from tfbackend.distributed.layers import ColumnParallelLinear, RowParallelLinear
from tfbackend.quantization.config import QuantizationMethod
from tfbackend.quantization.linear import DequantizedLinear, QuantizedLinear

# A parameter to copy into, with what to cut from the checkpoint tensor first (None: all of it), or a sink.
Target = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None] | Callable[[torch.Tensor], None]
# The dense linear layers quantization replaces: HF's and the native ports' (also when not split over ranks).
DENSE_LINEARS = (nn.Linear, ColumnParallelLinear, RowParallelLinear)
# Dtypes that only ever hold quantized values: copying one into a float parameter would drop its scales.
_QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8, torch.int32)


@dataclass(frozen=True)
class LinearSlot:
    """A linear layer of a model, as its checkpoint sees it."""

    module_name: str
    module: nn.Module  # a DENSE_LINEARS layer
    prefixes: list[str]  # checkpoint module name of each output shard (one unless fused)
    output_sizes: list[int]


def replace_linears(
    model: nn.Module,
    slots: Iterable[LinearSlot],
    method: QuantizationMethod,
    checkpoint_names: Iterable[str] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> list[QuantizedLinear]:
    """Swap each slot the checkpoint stores quantized (all of them for online quantization) for a quantized
    linear; fused shards must be all quantized or all dense. Returns the new layers."""
    quantized = None if checkpoint_names is None else method.quantized_prefixes(checkpoint_names)
    replaced = []
    for slot in slots:
        flags = [True] * len(slot.prefixes) if quantized is None else [p in quantized for p in slot.prefixes]
        if not any(flags):
            continue
        if not all(flags):
            dense = [p for p, flag in zip(slot.prefixes, flags) if not flag]
            raise ValueError(
                f"{slot.module_name} fuses {slot.prefixes}, but the checkpoint stores {dense} unquantized and the "
                f"rest quantized ({method.name}); fused projections must be quantized alike"
            )
        layer = method.make_linear(
            slot.module.in_features, slot.output_sizes, slot.prefixes, slot.module.bias is not None, dtype, device
        )
        model.set_submodule(slot.module_name, layer)
        replaced.append(layer)
    if quantized is not None and not replaced:
        raise ValueError(
            f"the checkpoint's quantization_config says {method.name}, but none of its linear layers has "
            f"{method.name} tensors (weight scales or qweight): is it really quantized?"
        )
    return replaced


def quantized_sinks(model: nn.Module) -> dict[str, Callable[[torch.Tensor], None]]:
    """Checkpoint name -> sink, for every tensor the model's quantized layers take."""
    sinks: dict[str, Callable[[torch.Tensor], None]] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            sinks.update(module.checkpoint_sinks())
    return sinks


@torch.no_grad()
def load_tensors(
    model: nn.Module,
    targets: dict[str, Target],
    weights: Iterable[tuple[str, torch.Tensor]],
    skip: Callable[[str], bool],
) -> None:
    """Copy each ``(name, tensor)`` into its target parameter or hand it to its quantized layer's sink; raise
    ValueError listing the tensors the model did not expect and those it needed but never got."""
    owner = type(model).__name__
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if skip(name):
            continue
        target = targets.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if isinstance(target, tuple):
            target, take = target
            if take is not None:
                tensor = take(tensor)
            if tensor.dtype in _QUANTIZED_DTYPES and target.dtype not in _QUANTIZED_DTYPES:
                raise ValueError(
                    f"checkpoint tensor {name} is {tensor.dtype}, but {owner} loads it as a dense {target.dtype} "
                    f"weight: its scales are missing, or the checkpoint's quantization_config does not describe it"
                )
            if tensor.shape != target.shape:
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, {owner} expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
        else:
            target(tensor)
        loaded.add(name)
    missing = [name for name, target in targets.items() if isinstance(target, tuple) and name not in loaded]
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            missing += module.missing()
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match {owner}: missing {sorted(missing) or 'none'}; "
            f"unexpected {sorted(unexpected) or 'none'}"
        )


def linear_layers(model: nn.Module, skip: set[nn.Module]) -> dict[str, nn.Module]:
    """Every linear layer of ``model`` but ``skip``, dense or quantized in any format, by module name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (QuantizedLinear, *DENSE_LINEARS)) and module not in skip}


ShardTensors = Callable[[str, torch.Tensor, list[int]], list[dict[str, torch.Tensor]]]


def _dense_rows(name: str, weight: torch.Tensor, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    return [{"weight": rows} for rows in weight.split(sizes)]


def requantize_linears(
    model: nn.Module,
    method: QuantizationMethod,
    dtype: torch.dtype,
    device: torch.device,
    skip: set[nn.Module],
    shard_tensors: ShardTensors = _dense_rows,
) -> int:
    """Replace every linear layer but ``skip`` (dense, or quantized in any format) by a ``method`` layer holding
    its current weight quantized anew, fused shards kept: for measuring what a format costs on any model
    (``tfbackend perplexity``). ``shard_tensors(name, weight[N, K], output_sizes)`` gives each shard's checkpoint
    tensors; the default, dense rows, suits an online method. Returns how many layers were replaced."""
    replaced = 0
    for name, module in linear_layers(model, skip).items():
        if isinstance(module, QuantizedLinear):
            sizes, weight = module.output_sizes, module.dequantize()
        else:  # a MergedLinear of a native port says how its output splits into projections
            sizes, weight = getattr(module, "output_sizes", [module.out_features]), module.weight.float()
        prefixes = [f"{name}.shard{index}" for index in range(len(sizes))]
        layer = method.make_linear(module.in_features, sizes, prefixes, module.bias is not None, dtype, device)
        sinks = layer.checkpoint_sinks()
        biases = module.bias.detach().split(sizes) if module.bias is not None else [None] * len(sizes)
        for prefix, tensors, bias in zip(prefixes, shard_tensors(name, weight, sizes), biases):
            for leaf, tensor in tensors.items():
                sinks[f"{prefix}.{leaf}"](tensor)
            if bias is not None:
                sinks[f"{prefix}.bias"](bias)
        model.set_submodule(name, layer)
        replaced += 1
    return replaced


def dequantize_linears(model: nn.Module) -> int:
    """Replace every quantized linear by a dense one holding its dequantized weight (the unquantized twin of a
    quantized model, for comparisons). Returns how many were replaced."""
    names = [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    for name in names:
        model.set_submodule(name, DequantizedLinear.from_quantized(model.get_submodule(name)))
    return len(names)
