"""The base of quantized linear layers: built in place of ``nn.Linear``/``MergedLinear``, filled from the checkpoint.

A ``QuantizedLinear`` is built (on the meta device, with the rest of the model) knowing only its shapes and the
checkpoint names of its shards: one for a plain projection, several for fused ones (q/k/v, gate/up), each with its
own tensors and scales. Loading hands it each checkpoint tensor through ``checkpoint_sinks()``; once every shard
has all its tensors the subclass's ``build`` turns them into the runtime tensors on the target device, so a
checkpoint streams through without ever holding more than one layer's raw tensors.

``forward`` runs the subclass's GPU kernel on CUDA. Elsewhere (CPU, where there are no quantized kernels) it runs
the reference: the exactly dequantized weight times the input in float32; the dequantized weight is cached
on first use, since dequantizing every call would make a CPU decode step an order of magnitude slower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from itertools import accumulate

import torch
import torch.nn as nn


class QuantizedLinear(nn.Module, ABC):
    """``y = x @ W.T + b`` with ``W`` kept quantized; ``output_sizes`` lists the fused shards' output features."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        prefixes: list[str],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        if len(output_sizes) != len(prefixes):
            raise ValueError("a quantized linear needs one checkpoint prefix per output shard")
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.offsets = [0, *accumulate(self.output_sizes)]
        self.prefixes = list(prefixes)
        self.dtype = dtype
        self.target_device = torch.device(device)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
        self._received: list[dict[str, torch.Tensor]] = [{} for _ in output_sizes]
        self._biases_received: set[int] = set()
        self._reference_weight: torch.Tensor | None = None
        self.ready = False

    # ---- what a format defines ---------------------------------------------------------------------------

    @abstractmethod
    def checkpoint_leaves(self) -> dict[str, str]:
        """Checkpoint tensor leaf (``weight_scale_inv``) -> the field it fills (``weight_scale``); every field
        is required, and two leaves naming one field are alternative spellings of it."""

    @abstractmethod
    def build(self, shards: list[dict[str, torch.Tensor]]) -> None:
        """Turn each shard's fields (CPU tensors, as in the checkpoint) into runtime tensors on
        ``self.target_device``; raise ValueError, naming ``self.prefixes``, for anything malformed."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The weight ``[N, K]`` in float32, exactly as the quantized values and scales define it."""

    @abstractmethod
    def apply_gpu(self, x: torch.Tensor) -> torch.Tensor:
        """``x[M, K] @ W.T`` through the GPU kernel, in ``x.dtype``."""

    def apply_reference(self, x: torch.Tensor) -> torch.Tensor:
        """``x[M, K] @ W.T`` in float32 on the exactly dequantized weight."""
        return x.to(torch.float32) @ self.reference_weight().T

    # ---- loading ------------------------------------------------------------------------------------------

    def checkpoint_sinks(self) -> dict[str, Callable[[torch.Tensor], None]]:
        """Every checkpoint tensor name this layer takes -> the function that takes it."""
        sinks: dict[str, Callable[[torch.Tensor], None]] = {}
        for shard, prefix in enumerate(self.prefixes):
            for leaf, field in self.checkpoint_leaves().items():
                sinks[f"{prefix}.{leaf}"] = partial(self._receive, shard, field, leaf)
            if self.bias is not None:
                sinks[f"{prefix}.bias"] = partial(self._receive_bias, shard)
        return sinks

    def missing(self) -> list[str]:
        """What has not arrived, by checkpoint name (alternative spellings joined with ``|``)."""
        fields: dict[str, list[str]] = {}
        for leaf, field in self.checkpoint_leaves().items():
            fields.setdefault(field, []).append(leaf)
        missing = [] if self.ready else [
            "|".join(f"{prefix}.{leaf}" for leaf in leaves)
            for prefix, received in zip(self.prefixes, self._received)
            for field, leaves in fields.items()
            if field not in received
        ]
        if self.bias is not None:
            missing += [f"{p}.bias" for shard, p in enumerate(self.prefixes) if shard not in self._biases_received]
        return missing

    def _receive(self, shard: int, field: str, leaf: str, tensor: torch.Tensor) -> None:
        received = self._received[shard]
        if field in received or self.ready:
            raise ValueError(f"{self.prefixes[shard]}: the checkpoint has {leaf} twice (or two spellings of it)")
        received[field] = tensor
        fields = set(self.checkpoint_leaves().values())
        if all(fields <= set(shard_fields) for shard_fields in self._received):
            with torch.no_grad():
                self.build(self._received)
            self._received = [{} for _ in self.output_sizes]
            self.ready = True

    def _receive_bias(self, shard: int, tensor: torch.Tensor) -> None:
        size = self.output_sizes[shard]
        if tuple(tensor.shape) != (size,):
            raise ValueError(f"{self.prefixes[shard]}.bias has shape {tuple(tensor.shape)}, expected ({size},)")
        with torch.no_grad():
            self.bias.data[self.offsets[shard] : self.offsets[shard + 1]].copy_(tensor)
        self._biases_received.add(shard)

    # ---- running ------------------------------------------------------------------------------------------

    def reference_weight(self) -> torch.Tensor:
        if self._reference_weight is None:
            self._reference_weight = self.dequantize()
        return self._reference_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError(f"{self.prefixes}: quantized weights were never loaded")
        flat = x.reshape(-1, self.in_features)
        out = self.apply_gpu(flat) if flat.is_cuda else self.apply_reference(flat).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        shards = "" if len(self.output_sizes) == 1 else f", shards={self.output_sizes}"
        return f"in_features={self.in_features}, out_features={self.out_features}{shards}, bias={self.bias is not None}"

    def _check_shape(self, shard: int, name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f"{self.prefixes[shard]}.{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
            )


class DequantizedLinear(QuantizedLinear):
    """A dense weight behind the ``QuantizedLinear`` interface (shards, sinks): for weights stored in a format
    without a kernel (e.g. GGUF Q6_K), and as the unquantized twin of a quantized layer in comparisons."""

    def checkpoint_leaves(self) -> dict[str, str]:
        return {"weight": "weight"}

    def build(self, shards: list[dict[str, torch.Tensor]]) -> None:
        for shard, fields in enumerate(shards):
            self._check_shape(shard, "weight", fields["weight"], (self.output_sizes[shard], self.in_features))
        weight = torch.cat([fields["weight"].to(self.dtype) for fields in shards])
        self.weight = nn.Parameter(weight.to(self.target_device), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(torch.float32)

    def apply_gpu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)

    def apply_reference(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)

    @classmethod
    def from_quantized(cls, module: QuantizedLinear) -> DequantizedLinear:
        dense = cls(module.in_features, module.output_sizes, module.prefixes, module.bias is not None,
                    module.dtype, module.target_device)
        weight = module.dequantize()
        for shard in range(len(module.output_sizes)):
            dense._receive(shard, "weight", "weight", weight[module.offsets[shard] : module.offsets[shard + 1]])
        if module.bias is not None:
            for shard in range(len(module.output_sizes)):
                dense._receive_bias(shard, module.bias[module.offsets[shard] : module.offsets[shard + 1]])
        return dense


def loaded_weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights as loaded: its parameters and the buffers of its quantized layers."""
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            tensors.update({id(b): b for b in module.buffers(recurse=False)})
    return sum(t.numel() * t.element_size() for t in tensors.values())
