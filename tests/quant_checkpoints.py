"""Tiny quantized checkpoints in each HF format, written from a dense model, and that model dequantized.

FP8 weights are quantized with tfbackend's own ``quantize_weight``; AWQ and GPTQ are packed by loops that follow
the reference packers (AutoAWQ's ``WQLinear_GEMM.from_linear``, AutoGPTQ's ``QuantLinear.pack``) word by word,
independently of the vectorised unpacking under test. Each writer returns, per quantized linear, the weight
its tensors dequantize to, so tests can build the exact dense twin of the quantized checkpoint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import random_prompts
from tfbackend.quantization.fp8 import (
    ActivationScheme,
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
GROUP_SIZE = 128

CT_FP8_CHANNEL = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                    "group_size": None, "block_structure": None},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True},
    }},
    "ignore": ["lm_head"],
}
FORMATS: dict[str, dict] = {
    "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "fp8-tensor-static": {"quant_method": "fp8", "activation_scheme": "static"},
    "fbgemm-fp8": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]},
    "compressed-tensors-fp8": CT_FP8_CHANNEL,
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm"},
    "gptq-act-order": {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "desc_act": True, "sym": False,
                       "checkpoint_format": "gptq"},
}


# How each FP8 format quantizes a linear's input (the static one uses each layer's checkpoint input_scale).
FP8_ACTIVATIONS = {
    "fp8-block": ActivationScheme(group_size=128),
    "fp8-tensor-static": ActivationScheme(dynamic=False),
    "fbgemm-fp8": ActivationScheme(scale_ub=1200.0),
    "compressed-tensors-fp8": ActivationScheme(),
}


def decoder_linears(model: torch.nn.Module) -> list[str]:
    """Module names of the decoder's linear layers (the LM head stays dense in every format)."""
    lm_head = model.get_output_embeddings()
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not lm_head]


def write_quantized(model: torch.nn.Module, directory: Path, fmt: str) -> torch.nn.Module:
    """Save ``model`` quantized in ``fmt`` to ``directory``; return its dequantized twin (a dense HF model)."""
    model.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    twin = copy.deepcopy(model)
    input_absmax = _input_absmax(model) if fmt == "fp8-tensor-static" else {}
    for name in decoder_linears(model):
        weight = tensors.pop(f"{name}.weight")
        quantized, dequantized = _QUANTIZERS[fmt](weight, input_absmax.get(name))
        tensors.update({f"{name}.{leaf}": tensor for leaf, tensor in quantized.items()})
        with torch.no_grad():
            twin.get_submodule(name).weight.copy_(dequantized)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = FORMATS[fmt]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return twin


def emulate_fp8_activations(twin: torch.nn.Module, scheme: ActivationScheme, checkpoint: Path | None = None):
    """Make the dense twin of an FP8 model round each linear's input through FP8 as the format does, so it
    computes exactly what the quantized model computes (a static scheme reads ``input_scale`` from ``checkpoint``)."""
    tensors = load_file(checkpoint / "model.safetensors") if checkpoint is not None else {}
    for name in decoder_linears(twin):
        static = tensors.get(f"{name}.input_scale")

        def round_input(_, args, static=static):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            rounded = dequantize_activation(*quantize_activation(flat, scheme, static), scheme)
            return (rounded.reshape(x.shape).to(x.dtype),)

        twin.get_submodule(name).register_forward_pre_hook(round_input)
    return twin


def fp8_online_twin(model: torch.nn.Module) -> torch.nn.Module:
    """What ``--quantization fp8`` makes of ``model``: per-channel FP8 weights (clipping searched), per-token
    FP8 inputs."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name in decoder_linears(twin):
            weight = twin.get_submodule(name).weight
            weight.copy_(dequantize_weight(*quantize_weight(weight, clip_search=True)))
    return emulate_fp8_activations(twin, ActivationScheme())


@torch.no_grad()
def _input_absmax(model: torch.nn.Module) -> dict[str, float]:
    """Calibration for static activation scales: each linear's largest input on a few random prompts."""
    absmax: dict[str, float] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _, args, name=name: absmax.__setitem__(name, max(absmax.get(name, 0.0), args[0].abs().max().item()))
        )
        for name in decoder_linears(model)
    ]
    for prompt in random_prompts([16, 24], seed=7):
        model(torch.tensor([prompt]))
    for hook in hooks:
        hook.remove()
    return absmax


def _fp8_block(weight, _):
    q, grid = quantize_weight(weight, block=(128, 128))
    return {"weight": q, "weight_scale_inv": grid.scale}, dequantize_weight(q, grid)


def _fp8_tensor_static(weight, input_absmax):
    q, grid = quantize_weight(weight, block=tuple(weight.shape))  # one block: a per-tensor scale
    input_scale = torch.tensor(1.25 * input_absmax / 448.0)  # headroom above the calibration's largest input
    return {"weight": q, "weight_scale": grid.scale.reshape(()), "input_scale": input_scale}, dequantize_weight(q, grid)


def _fp8_channel(weight, _):
    q, grid = quantize_weight(weight)
    return {"weight": q, "weight_scale": grid.scale}, dequantize_weight(q, grid)


def _int4_rtn(weight: torch.Tensor, group_rows: torch.Tensor, min_zero: int = 0):
    """Asymmetric round-to-nearest over input rows grouped by ``group_rows[k]``: codes [K, N], zeros and fp16
    scales [G, N], and the dequantized weight [N, K]."""
    w = weight.T.float()  # [K, N]
    num_groups = int(group_rows.max()) + 1
    lo = torch.stack([w[group_rows == g].amin(0) for g in range(num_groups)]).clamp(max=0)
    hi = torch.stack([w[group_rows == g].amax(0) for g in range(num_groups)]).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-6).half()
    zeros = torch.round(-lo / scales.float()).clamp(min_zero, 15).to(torch.int32)
    s, z = scales.float()[group_rows], zeros[group_rows]
    codes = torch.clamp(torch.round(w / s) + z, 0, 15).to(torch.int32)
    return codes, zeros, scales, ((codes - z) * s).T


def _awq(weight, _):
    in_features = weight.shape[1]
    codes, zeros, scales, dequantized = _int4_rtn(weight, torch.arange(in_features) // GROUP_SIZE)
    return {"qweight": _awq_pack(codes), "qzeros": _awq_pack(zeros), "scales": scales}, dequantized


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ: word ``col`` of a row holds columns ``col * 8 + order_map[i]`` in bits ``4i``."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int32)
    for col in range(values.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + AWQ_PACK_ORDER[i]] << (i * 4)
    return packed


def _gptq_act_order(weight, _):
    """GPTQ with desc_act: rows are quantized in a permuted order, so g_idx is not k // group_size."""
    in_features = weight.shape[1]
    order = torch.randperm(in_features, generator=torch.Generator().manual_seed(in_features))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // GROUP_SIZE).to(torch.int32)
    # GPTQ's format cannot store a zero point of 0 (it would wrap to 16), as its own quantizer never makes one.
    codes, zeros, scales, dequantized = _int4_rtn(weight, g_idx.long(), min_zero=1)
    qweight = torch.zeros(in_features // 8, codes.shape[1], dtype=torch.int32)
    for row in range(in_features // 8):  # AutoGPTQ: word j holds input rows 8j .. 8j + 7, row 8j + i in bits 4i
        for i in range(8):
            qweight[row] |= codes[row * 8 + i] << (4 * i)
    stored_zeros = zeros - 1  # the original GPTQ format stores zero points minus one
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int32)
    for col in range(zeros.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= (stored_zeros[:, col * 8 + i] & 0xF) << (4 * i)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, dequantized


_QUANTIZERS = {
    "fp8-block": _fp8_block,
    "fp8-tensor-static": _fp8_tensor_static,
    "fbgemm-fp8": _fp8_channel,
    "compressed-tensors-fp8": _fp8_channel,
    "awq": _awq,
    "gptq-act-order": _gptq_act_order,
}
