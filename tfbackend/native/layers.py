"""Building blocks shared by native ports, and their base class.

Every layer reproduces the arithmetic of the Hugging Face code it replaces, in the same dtype and order,
so a native port matches the Transformers fallback to float rounding, not merely "closely".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn as nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tfbackend.distributed import current_parallel
from tfbackend.distributed.layers import CheckpointView, ColumnParallelLinear, Take
from tfbackend.model_interface import CausalLM
from tfbackend.native.weights import checkpoint_tensor_names, iterate_safetensors
from tfbackend.quantization.config import quantization_method
from tfbackend.quantization.kv_cache import is_kv_cache_scale
from tfbackend.quantization.linear import QuantizedLinear
from tfbackend.quantization.loading import DENSE_LINEARS, LinearSlot, load_tensors, quantized_sinks, replace_linears


class RMSNorm(nn.Module):
    """RMSNorm that also adds the residual stream first, so decoder layers thread one ``residual`` along.

    ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``; with ``residual=None`` it
    returns ``(norm(x), x)``. Like HF, the statistics are taken in float32 and the weight is applied
    after casting back to the input dtype.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), x


SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class RotaryEmbedding(nn.Module):
    """RoPE with cos/sin cached for every position; a step gathers its rows at ``positions`` on the device.

    Inverse frequencies and the cos/sin scale (YaRN's mscale) come from transformers' ``ROPE_INIT_FUNCTIONS``
    for the config's ``rope_parameters``, so scaling variants are HF's by construction. The cache is
    ``(p * inv_freq).cos() * scale`` in float32, stored in the model dtype: what HF computes per step.

    Dynamic NTK: HF recomputes ``inv_freq`` for ``seq_len = max(position_ids) + 1`` whenever that exceeds
    ``max_position_embeddings`` and rotates the step's new tokens with it (cached keys keep theirs). We
    rotate each token at position p with ``inv_freq(seq_len=p + 1)``: identical for positions below
    ``max_position_embeddings`` and for every token HF decodes one at a time, but not for prompt tokens
    beyond that limit, which HF rotates with the whole prompt's frequencies (a batch-dependent result, and
    HF's grown frequencies also outlive the call that grew them). The cache then extends to
    ``max_position_embeddings * factor``, for callers that go past the engine's ``max_model_len`` cap.
    """

    def __init__(self, hf_config, head_dim: int):
        super().__init__()
        self.hf_config = hf_config
        self.head_dim = head_dim
        rope_parameters = hf_config.rope_parameters
        self.rope_type = rope_parameters["rope_type"]
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"native RoPE supports rope_type in {SUPPORTED_ROPE_TYPES}, the checkpoint asks for "
                f"{self.rope_type!r}: use model_impl='transformers'"
            )
        self.max_positions = hf_config.max_position_embeddings
        if self.rope_type == "dynamic":
            self.max_positions = int(self.max_positions * rope_parameters["factor"])
        self.register_buffer("cos_cache", torch.empty(self.max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin_cache", torch.empty(self.max_positions, head_dim // 2), persistent=False)
        if not self.cos_cache.is_meta:  # a model built on the meta device computes it after ``to_empty``
            self.init_buffers()

    def _inverse_frequencies(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """``[1 or max_positions, head_dim / 2]`` inverse frequencies and the cos/sin scale."""
        config = self.hf_config
        if self.rope_type == "default":  # HF keeps this one in each modeling file, not in ROPE_INIT_FUNCTIONS
            base = config.rope_parameters["rope_theta"]
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
            return (1.0 / base**exponents)[None], 1.0
        init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, scale = init_fn(config, device)
        if inv_freq.shape[-1] * 2 != self.head_dim:
            raise ValueError(f"partial rotary embeddings are not supported (rotary dim {inv_freq.shape[-1] * 2})")
        inv_freq = inv_freq[None]
        if self.rope_type == "dynamic":
            original = config.max_position_embeddings
            # An int64 tensor seq_len, as HF's forward passes it, so the arithmetic is HF's step for step.
            seq_lens = torch.arange(original + 1, self.max_positions + 1, device=device)[:, None]
            beyond, _ = init_fn(config, device, seq_len=seq_lens)
            inv_freq = torch.cat([inv_freq.expand(original, -1), beyond])
        return inv_freq, scale

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the cache in place: at construction, and after ``to_empty`` left it uninitialised."""
        device = self.cos_cache.device
        inv_freq, scale = self._inverse_frequencies(device)
        freqs = torch.arange(self.max_positions, device=device).float()[:, None] * inv_freq
        self.cos_cache.copy_(freqs.cos() * scale)
        self.sin_cache.copy_(freqs.sin() * scale)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions[T]`` -> ``(cos, sin)``, each ``[T, 1, head_dim / 2]`` to broadcast over heads."""
        return self.cos_cache[positions].unsqueeze(1), self.sin_cache[positions].unsqueeze(1)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x[T, H, D]`` in HF's "rotate_half" layout: dims i and i + D/2 form one rotated pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MergedLinear(nn.Linear):
    """Several projections of one input as one matmul (q/k/v, gate/up), while checkpoints store them apart.

    ``shards`` maps each checkpoint projection name, in output order, to its number of output features.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_names = list(shards)
        self.output_sizes = list(shards.values())
        self.offsets = [0, *accumulate(self.output_sizes)]

    def checkpoint_views(self, module_name: str, leaf: str, param: torch.Tensor) -> Iterator[CheckpointView]:
        """``(checkpoint tensor name, the rows of param it loads into, None)`` for weight or bias."""
        parent = module_name.rpartition(".")[0]
        for name, offset, size in zip(self.shard_names, self.offsets, self.output_sizes):
            yield _dotted(parent, name, leaf), param.data.narrow(0, offset, size), None


class NativeCausalLM(CausalLM):
    """Base of native ports: meta-device construction and strict loading on top of the model contract.

    A subclass builds its modules in ``__init__(hf_config)`` under the names of the HF checkpoint
    (``model.layers.0.self_attn...``), using ``MergedLinear`` where HF has separate projections, and
    implements ``supports(hf_config)`` (which configs it reproduces exactly), ``forward(input_ids[T],
    positions[T]) -> hidden[T, H]`` (after the final norm; attention through
    ``tfbackend.attention.paged_attention``), ``compute_logits(hidden[N, H]) -> [N, V]`` and
    ``attention_layers()`` (the KV layout of each ``paged_attention`` call, by its ``layer_idx``).
    """

    @classmethod
    def load(
        cls, model_dir: str | Path, hf_config, dtype: torch.dtype, device: torch.device, quantization: str | None = None
    ) -> NativeCausalLM:
        """Build without allocating (meta), allocate once in ``dtype`` on ``device``, stream the weights in.

        Linear layers the checkpoint stores quantized (its ``quantization_config``), or all of them for
        ``quantization="fp8"`` on an unquantized checkpoint, become ``tfbackend.quantization`` layers first.
        """
        method = quantization_method(hf_config, quantization)
        with torch.device("meta"):
            model = cls(hf_config)
        if method is not None:
            if current_parallel().tp.size > 1:
                raise ValueError(
                    f"{method.name} linear layers are not split over tensor-parallel ranks yet: run quantized "
                    f"models with tensor_parallel_size=1"
                )
            names = None if method.online else checkpoint_tensor_names(model_dir)
            replace_linears(model, list(model.linear_slots()), method, names, dtype, device)
        model = model.to(dtype=dtype).to_empty(device=device)
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                module.init_buffers()
        # Dense parameters copy what they load, so they can read the mapped files in place; quantized layers
        # may keep a checkpoint tensor as it is, so theirs are read into tensors of their own.
        weights = iterate_safetensors(model_dir, views=method is None)
        if method is not None:
            weights = method.prepare_checkpoint(weights, claimed=set(quantized_sinks(model)))
        model.load_weights(weights)
        return model.eval().requires_grad_(False)

    def linear_slots(self) -> Iterator[LinearSlot]:
        """The linear layers quantization may replace, with their checkpoint names: all but the LM head, whose
        weight ``compute_logits`` reads (and which it shares with the embedding when tied)."""
        for name, module in self.named_modules():
            if name == "lm_head" or not isinstance(module, DENSE_LINEARS):
                continue
            parent = name.rpartition(".")[0]
            if isinstance(module, ColumnParallelLinear):
                prefixes = [name if s.name is None else _dotted(parent, s.name) for s in module.slices]
                yield LinearSlot(name, module, prefixes, module.output_sizes)
            elif isinstance(module, MergedLinear):
                prefixes = [_dotted(parent, shard) for shard in module.shard_names]
                yield LinearSlot(name, module, prefixes, module.output_sizes)
            else:
                yield LinearSlot(name, module, [name], [module.out_features])

    def skips_checkpoint_tensor(self, name: str) -> bool:
        """Checkpoint tensors that are neither loaded nor reported as unexpected."""
        # RoPE frequencies are derived (saved by some old exports); KV-cache scales are the engine's to read.
        return name.endswith("rotary_emb.inv_freq") or is_kv_cache_scale(name)

    def checkpoint_targets(self) -> dict[str, tuple[torch.Tensor, Take | None] | Callable[[torch.Tensor], None]]:
        """Every checkpoint tensor the model needs -> the parameter (or rows of a merged one) it fills and what
        to cut from the tensor first (a tensor-parallel rank's slice; None: all of it), or the sink of the
        quantized layer that takes it.

        A module that fills its parameters from other checkpoint names, or from slices, says so with a
        ``checkpoint_views(module_name, leaf, param)`` method yielding ``(name, view, take)``.
        """
        targets: dict[str, tuple[torch.Tensor, Take | None] | Callable[[torch.Tensor], None]] = {}
        for module_name, module in self.named_modules():
            if isinstance(module, QuantizedLinear):
                targets.update(module.checkpoint_sinks())
                continue
            views = getattr(module, "checkpoint_views", None)
            for leaf, param in module.named_parameters(recurse=False):
                if views is None:
                    targets[_dotted(module_name, leaf)] = (param.data, None)
                else:
                    targets.update((name, (view, take)) for name, view, take in views(module_name, leaf, param))
        return targets

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model; raise unless every parameter is filled by a known tensor."""
        load_tensors(self, self.checkpoint_targets(), weights, self.skips_checkpoint_tensor)


def _dotted(*parts: str) -> str:
    return ".".join(part for part in parts if part)
