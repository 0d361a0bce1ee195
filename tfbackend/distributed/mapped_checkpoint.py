"""An HF model whose parameters view its safetensors files in place: what a rank of a multi-rank fallback cuts.

transformers loads a checkpoint by copying every tensor, so each rank of a tensor-parallel fallback used to
hold the whole model in host memory before keeping its share: Llama-3.1-70B at TP=4 spent 64 s of a 125 s
start loading, in turns that host memory could hold (27 s over the mapped files: `docs/benchmarks.md`, sixth
and seventh sessions). Here the model is built with its parameters on the meta device
(``hf_classes.empty_model``), then each parameter becomes a tensor over the file's bytes, memory-mapped
copy-on-write: nothing is read until used, and cutting the model then copies only this rank's slices (a
column slice's pages, a row slice's strided bytes) from the page cache that every rank shares, straight into
the layers it builds on the device.

Only for checkpoints whose tensors are exactly the model's state by name, in floating dtypes, and models that
keep no module in float32 on purpose: anything transformers would rename, convert, cast selectively or drop
is loaded by transformers instead (``map_checkpoint`` returns None).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from tfbackend.hf_classes import empty_model
from tfbackend.native.weights import MappedFiles, safetensors_files, tensor_entries

# The stored dtypes mapped: floating ones (a model's state; anything else is transformers' to interpret)
_FLOATING = {"BF16", "F16", "F32"}


def map_checkpoint(hf_class: type, hf_config, model_dir: str | Path, dtype: torch.dtype,
                   attn_implementation: str) -> tuple[nn.Module, set[int]] | None:
    """``hf_class`` built for ``hf_config`` with every parameter and persistent buffer viewing the checkpoint in
    ``model_dir`` (cast to ``dtype`` where stored otherwise: a copy), and the storages that view the files (for
    ``detach_from_files``); None where transformers must load it (see the module docstring)."""
    try:
        files = safetensors_files(model_dir)
    except FileNotFoundError:  # a checkpoint in another format (PyTorch .bin): transformers reads it
        return None
    model = empty_model(hf_class, hf_config, dtype, attn_implementation)
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        return None
    persistent = set(model.state_dict())
    aliases: dict[int, list[str]] = {}  # a tensor -> every name it has (tied weights have several)
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in persistent:
            aliases.setdefault(id(tensor), []).append(name)
    entries = tensor_entries(files)
    stored = [next((name for name in names if name in entries), None) for names in aliases.values()]
    every_name = {name for names in aliases.values() for name in names}
    if None in stored or not set(entries) <= every_name or any(e.dtype not in _FLOATING for e in entries.values()):
        return None  # a tensor the checkpoint lacks, or one the model does not have: transformers decides
    mapped = MappedFiles()
    for names, name in zip(aliases.values(), stored):
        tensor = mapped.tensor(entries[name])
        tensor = tensor if tensor.dtype == dtype else tensor.to(dtype)
        parameter = nn.Parameter(tensor, requires_grad=False)
        for alias in names:  # the same object under every name: tied weights stay tied
            module_name, _, leaf = alias.rpartition(".")
            module = model.get_submodule(module_name)
            if leaf in module._parameters:
                module._parameters[leaf] = parameter
            else:
                module._buffers[leaf] = tensor
    model.eval().requires_grad_(False)
    return model, mapped.storages


def detach_from_files(model: nn.Module, storages: set[int]) -> None:
    """Copy whatever still views the checkpoint files (``storages``: on the CPU, the parts a rank keeps whole),
    so the model no longer depends on them (a file replaced while serving would take the mapped pages along)."""
    copies: dict[int, torch.Tensor] = {}  # tied weights stay one tensor
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is None or tensor.untyped_storage().data_ptr() not in storages:
                    continue
                if id(tensor) not in copies:
                    copy = tensor.detach().clone()
                    is_parameter = isinstance(tensor, nn.Parameter)
                    copies[id(tensor)] = nn.Parameter(copy, requires_grad=False) if is_parameter else copy
                tensors[name] = copies[id(tensor)]
