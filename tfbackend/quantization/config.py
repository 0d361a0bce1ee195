"""Which quantized linears a checkpoint needs: its HF ``quantization_config`` (or ``--quantization fp8``) parsed.

Supported: ``fp8`` (transformers' fine-grained FP8 and vLLM/AutoFP8 exports: per-tensor, per-channel or block
scales), ``fbgemm_fp8`` (per-channel), ``compressed-tensors`` with float8 weights and activations, ``awq`` (gemm
version) and ``gptq`` with 4 bits, and ``gguf`` (GGUF files as ``tfbackend.model_source`` converts them). Anything
else is refused at load with a message saying what is supported.

Which linears are quantized is read off the checkpoint's tensor names (a layer with a weight scale, or a
``qweight``), not from the config's ignore lists, whose pattern syntax differs per format: a layer the config
calls quantized but the checkpoint stores dense loads dense, and fused projections must agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from tfbackend.quantization.fp8 import ActivationScheme
from tfbackend.quantization.fp8_linear import Fp8Format, Fp8Linear
from tfbackend.quantization.gguf import QWEIGHT, GGUFLinear, dequantize_unclaimed
from tfbackend.quantization.int4 import Int4Format, Int4Linear
from tfbackend.quantization.linear import QuantizedLinear

# Values of --quantization: the checkpoint formats (to insist on one), and fp8, which also quantizes a
# bf16/fp32 checkpoint at load.
QUANTIZATION_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors", "awq", "gptq", "gguf")
FP8_CHECKPOINT_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")


@dataclass(frozen=True)
class QuantizationMethod:
    """A parsed quantization config: makes the quantized linears and recognises quantized checkpoint tensors."""

    name: str  # the checkpoint's quant_method; "fp8" also for online quantization
    fp8: Fp8Format | None = None
    int4: Int4Format | None = None
    gguf: bool = False

    @property
    def online(self) -> bool:
        """Dense weights are quantized while loading."""
        return (self.fp8 is not None and self.fp8.online) or (self.int4 is not None and self.int4.online)

    def describe(self) -> str:
        if self.online and self.fp8 is not None:
            return "fp8 (weights quantized at load, per channel with searched clipping; activations per token)"
        if self.online:
            return f"int4 (weights rounded at load, groups of {self.int4.group_size}, zero points, searched clipping)"
        if self.fp8 is not None:
            weights = f"{self.fp8.weight_block[0]}x{self.fp8.weight_block[1]} blocks" if self.fp8.weight_block else \
                "per-tensor or per-channel scales"
            act = self.fp8.activation
            group = f" and {act.group_size} features" if act.group_size else ""
            activations = f"per token{group}" if act.dynamic else "static"
            return f"{self.name} (FP8 weights, {weights}; activations {activations})"
        if self.int4 is not None:
            return f"{self.name} (int4 weights, groups of {self.int4.group_size})"
        return "gguf (Q8_0/Q4_1/Q4_K kept quantized, other types dequantized)"

    def quantized_prefixes(self, checkpoint_names: Iterable[str]) -> set[str] | None:
        """Checkpoint module names whose weights are stored quantized; None: every linear (online quantization)."""
        if self.online:
            return None
        if self.fp8 is not None:
            leaves = set(self.fp8.scale_leaves)
        else:
            leaves = {QWEIGHT}
        return {prefix for prefix, _, leaf in (name.rpartition(".") for name in checkpoint_names) if leaf in leaves}

    def make_linear(
        self, in_features: int, output_sizes: list[int], prefixes: list[str], bias: bool,
        dtype: torch.dtype, device: torch.device,
    ) -> QuantizedLinear:
        args = (in_features, output_sizes, prefixes, bias, dtype, device)
        if self.fp8 is not None:
            return Fp8Linear(*args, self.fp8)
        if self.int4 is not None:
            return Int4Linear(*args, self.int4)
        return GGUFLinear(*args)

    def prepare_checkpoint(
        self, weights: Iterable[tuple[str, torch.Tensor]], claimed: set[str]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors as the model's targets take them (``claimed``: names quantized layers take)."""
        if self.gguf:
            return dequantize_unclaimed(weights, claimed)
        return iter(weights)


FP8_ONLINE = QuantizationMethod("fp8", fp8=Fp8Format(ActivationScheme(), online=True))
# FP8 weights per channel with dynamic per-token activations, as a compressed-tensors checkpoint (channel
# strategy) loads: how ``tfbackend perplexity`` loads the weights its GPTQ rounds to FP8.
FP8_CHANNEL = QuantizationMethod("compressed-tensors", fp8=Fp8Format(ActivationScheme()))


def int4_gptq(group_size: int) -> QuantizationMethod:
    """A GPTQ checkpoint's layers (``checkpoint_format: gptq_v2``, with ``g_idx``): how ``tfbackend perplexity``
    loads the weights its GPTQ rounds to 4 bits."""
    return QuantizationMethod("gptq", int4=Int4Format("gptq", group_size, has_g_idx=True))


def int4_online(group_size: int) -> QuantizationMethod:
    """4-bit round to nearest at load (not a checkpoint format: ``tfbackend perplexity``'s uncalibrated
    yardstick for GPTQ)."""
    return QuantizationMethod("int4", int4=Int4Format("gptq", group_size, online=True))


def quantization_method(hf_config, requested: str | None = None) -> QuantizationMethod | None:
    """Parse ``hf_config.quantization_config``; ``requested`` is ``--quantization`` (None: the checkpoint's)."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {requested!r}")
    raw = getattr(hf_config, "quantization_config", None)
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict()
    if not raw:
        if requested is None:
            return None
        if requested == "fp8":
            return FP8_ONLINE
        raise ValueError(
            f"quantization={requested!r} names a checkpoint format, but this checkpoint has no quantization_config; "
            f"only 'fp8' quantizes an unquantized checkpoint while loading"
        )
    method = raw.get("quant_method")
    if requested is not None and requested != method and not (requested == "fp8" and method in FP8_CHECKPOINT_METHODS):
        raise ValueError(
            f"the checkpoint is quantized with {method!r}, which quantization={requested!r} does not match; "
            f"leave quantization unset to load the checkpoint's own format"
        )
    parsers = {
        "fp8": _parse_fp8,
        "fbgemm_fp8": _parse_fbgemm_fp8,
        "compressed-tensors": _parse_compressed_tensors,
        "awq": _parse_awq,
        "gptq": _parse_gptq,
        "gguf": lambda raw: QuantizationMethod("gguf", gguf=True),
    }
    if method not in parsers:
        raise ValueError(
            f"unsupported quantization_config quant_method {method!r}; tfbackend loads {sorted(parsers)} "
            f"(compressed-tensors with float8 weights only)"
        )
    return parsers[method](raw)


def _parse_fp8(raw: dict) -> QuantizationMethod:
    """transformers' FineGrainedFP8Config (``weight_scale_inv``) and vLLM/AutoFP8 exports (``weight_scale``)."""
    block = raw.get("weight_block_size")
    block = tuple(block) if block is not None else None
    if block is not None and (len(block) != 2 or min(block) <= 0):
        raise ValueError(f"fp8 weight_block_size must be two positive integers, got {raw.get('weight_block_size')}")
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"fp8 activation_scheme must be dynamic or static, got {scheme!r}")
    if scheme == "static" and block is not None:
        raise ValueError("fp8 with block scales and a static activation scheme is not supported")
    activation = ActivationScheme(dynamic=scheme == "dynamic", group_size=block[1] if block else None)
    fmt = Fp8Format(
        activation, block, scale_leaves=("weight_scale_inv", "weight_scale"),
        input_scale_leaves=("input_scale", "activation_scale"),
    )
    return QuantizationMethod("fp8", fp8=fmt)


def _parse_fbgemm_fp8(raw: dict) -> QuantizationMethod:
    """FBGEMM FP8 (e.g. Meta's Llama-3.1 FP8 exports): per-channel weights, per-token activations capped at
    ``activation_scale_ub``."""
    activation = ActivationScheme(dynamic=True, scale_ub=raw.get("activation_scale_ub"))
    return QuantizationMethod("fbgemm_fp8", fp8=Fp8Format(activation))


def _parse_compressed_tensors(raw: dict) -> QuantizationMethod:
    """llm-compressor's format, float8 schemes only: weights per tensor / channel / block, activations dynamic per
    token (or per group) or static per tensor."""
    groups = list((raw.get("config_groups") or {}).values())
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    schemes = {_describe_group(group) for group in groups}
    if len(schemes) != 1:
        raise ValueError(f"compressed-tensors checkpoints mixing schemes are not supported: {sorted(schemes)}")
    group = groups[0]
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ValueError(
            f"compressed-tensors with {weights.get('num_bits')}-bit {weights.get('type')} weights is not supported; "
            f"tfbackend loads its float8 (FP8 W8A8) schemes"
        )
    if inputs is None or inputs.get("type") != "float" or inputs.get("num_bits") != 8:
        raise ValueError("compressed-tensors FP8 weights without FP8 input activations (W8A16) are not supported")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise ValueError(f"compressed-tensors float8 weight strategy {strategy!r} is not supported")
    block = tuple(weights["block_structure"]) if strategy == "block" else None
    input_strategy, dynamic = inputs.get("strategy"), bool(inputs.get("dynamic"))
    if dynamic and input_strategy == "token":
        activation = ActivationScheme(dynamic=True)
    elif dynamic and input_strategy == "group":
        activation = ActivationScheme(dynamic=True, group_size=inputs.get("group_size"))
    elif not dynamic and input_strategy == "tensor":
        activation = ActivationScheme(dynamic=False)
    else:
        raise ValueError(
            f"compressed-tensors input activations {'dynamic' if dynamic else 'static'} per {input_strategy} are not "
            f"supported (dynamic per token or group, or static per tensor)"
        )
    return QuantizationMethod("compressed-tensors", fp8=Fp8Format(activation, block))


def _describe_group(group: dict) -> str:
    keys = ("num_bits", "type", "strategy", "block_structure", "dynamic", "group_size")
    sides = ("weights", "input_activations")
    return " ".join(f"{side}:{[(group.get(side) or {}).get(key) for key in keys]}" for side in sides)


def _parse_int4_common(raw: dict, method: str) -> int:
    if raw.get("bits") != 4:
        raise ValueError(f"{method} with {raw.get('bits')} bits is not supported; tfbackend loads 4-bit checkpoints")
    group_size = raw.get("group_size", 128)
    if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0 or group_size % 8):
        raise ValueError(f"{method} group_size must be -1 or a positive multiple of 8, got {group_size}")
    return group_size


def _parse_awq(raw: dict) -> QuantizationMethod:
    group_size = _parse_int4_common(raw, "awq")
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported; tfbackend loads the gemm packing")
    if not raw.get("zero_point", True):
        raise ValueError("AWQ without zero points is not supported")
    return QuantizationMethod("awq", int4=Int4Format("awq", group_size))


def _parse_gptq(raw: dict) -> QuantizationMethod:
    group_size = _parse_int4_common(raw, "gptq")
    checkpoint_format = raw.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported (gptq, gptq_v2)")
    fmt = Int4Format("gptq", group_size, zero_minus_one=checkpoint_format == "gptq", has_g_idx=True)
    return QuantizationMethod("gptq", int4=fmt)
