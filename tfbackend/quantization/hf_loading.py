"""Quantized checkpoints in the Transformers fallback: the HF model's ``nn.Linear`` layers swapped for ours.

transformers' own quantizers need kernel packages that are often missing (and differ per format), so the
fallback does not hand ``quantization_config`` to transformers: the HF model is built from the config with its
parameters on the meta device, the linears the checkpoint stores quantized are replaced, and the checkpoint's
tensors are streamed in by ``tfbackend.quantization.loading``, dense ones into HF's parameters under their HF
names. ``--quantization fp8`` on a dense checkpoint instead loads it with transformers as usual and quantizes
each linear in place.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from tfbackend.hf_classes import empty_model
from tfbackend.native.weights import checkpoint_tensor_names, iterate_safetensors
from tfbackend.quantization.config import QuantizationMethod
from tfbackend.quantization.kv_cache import is_kv_cache_scale
from tfbackend.quantization.linear import QuantizedLinear
from tfbackend.quantization.loading import LinearSlot, load_tensors, quantized_sinks, replace_linears


def load_quantized_hf_model(
    hf_class: type[PreTrainedModel],
    model_dir: str | Path,
    hf_config,
    dtype: torch.dtype,
    device: torch.device,
    method: QuantizationMethod,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """An ``hf_class`` model on ``device`` whose linears (all but the LM head) are ``method``'s quantized ones;
    ``attn_implementation`` as for ``from_pretrained`` (None: the class's default)."""
    config = copy.deepcopy(hf_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours to apply, not transformers'
    if method.online:
        attention = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
        model = hf_class.from_pretrained(model_dir, config=config, dtype=dtype, device_map=str(device), **attention)
        _quantize_in_place(model, method, dtype, device)
        return model
    model = empty_model(hf_class, config, dtype, attn_implementation)  # tied parameters shared: one fills both
    replace_linears(model, _linear_slots(model), method, checkpoint_tensor_names(model_dir), dtype, device)
    _materialize(model, device)
    sinks = quantized_sinks(model)
    targets: dict = {
        name: (param.data, None)
        for name, param in model.named_parameters()
        if not isinstance(model.get_submodule(name.rpartition(".")[0]), QuantizedLinear)
    }
    targets.update(sinks)
    weights = method.prepare_checkpoint(iterate_safetensors(model_dir), claimed=set(sinks))
    load_tensors(model, targets, weights, skip=_skipped_names(model))
    return model


def _linear_slots(model: PreTrainedModel) -> list[LinearSlot]:
    """Every ``nn.Linear`` but the LM head (the logits stay dense, as in vLLM), under its HF name."""
    lm_head = model.get_output_embeddings()
    return [
        LinearSlot(name, module, [name], [module.out_features])
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not lm_head
    ]


def _quantize_in_place(model: PreTrainedModel, method: QuantizationMethod, dtype: torch.dtype, device) -> None:
    """Quantize the loaded dense linears one by one, freeing each dense weight as its FP8 twin is built."""
    for slot in _linear_slots(model):
        dense = slot.module
        (layer,) = replace_linears(model, [slot], method, None, dtype, device)
        sinks = layer.checkpoint_sinks()
        sinks[f"{slot.module_name}.weight"](dense.weight.data)
        if dense.bias is not None:
            sinks[f"{slot.module_name}.bias"](dense.bias.data)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) every parameter still on the meta device, keeping tied parameters shared."""
    allocated: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in allocated:
                allocated[id(param)] = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
            module._parameters[name] = allocated[id(param)]
    model.to(device)  # buffers (RoPE frequencies, ...) were computed on the CPU


def _skipped_names(model: PreTrainedModel):
    """Checkpoint names that fill nothing but are no error: tied duplicates (``lm_head.weight`` of a tied model),
    buffers, KV-cache scales (the engine reads them) and what the HF class says to ignore."""
    first_names = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first_names
    buffers = {name for name, _ in model.named_buffers()}
    patterns = [re.compile(pattern) for pattern in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return lambda name: (
        name in aliases or name in buffers or is_kv_cache_scale(name) or any(p.search(name) for p in patterns)
    )
