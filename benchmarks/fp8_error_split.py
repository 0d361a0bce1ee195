"""Where FP8's perplexity cost comes from: the weights' rounding, the inputs', or both, at several scale grains.

Run from the repository root: ``python3 benchmarks/fp8_error_split.py [MODEL]`` (default: the embedded
SmolLM2-135M-Instruct; float32 on the CPU, a few minutes). Each row is a fresh load of the model whose linear
layers (the LM head excepted) round their weight and/or their input through E4M3 with absmax scales (the
quantizers of ``tfbackend/quantization/fp8.py``, without the clipping search), scored as ``tfbackend perplexity``
scores (same text, same chunks). Fake quantization: it isolates the number format from the GEMM paths, which
``tfbackend perplexity --variants fp8`` measures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from tfbackend.engine.model_files import load_tokenizer
from tfbackend.entrypoints.perplexity import builtin_text, perplexity
from tfbackend.hf_classes import load_hf_config
from tfbackend.model_source import resolve_model
from tfbackend.quantization.fp8 import (
    ActivationScheme,
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
)
from tfbackend.quantization.loading import dequantize_linears, linear_layers
from tfbackend.registry import load_model

Rounding = Callable[[torch.Tensor], torch.Tensor] | None


def weights_through_fp8(block: tuple[int, int] | None = None) -> Rounding:
    """A weight through E4M3 and back: absmax scales per output channel, or per ``block`` (rows, features)."""
    return lambda weight: dequantize_weight(*quantize_weight(weight, block)).to(weight.dtype)


def inputs_through_fp8(group_size: int | None = None) -> Rounding:
    """A layer's input through E4M3 and back: absmax scales per token, or per ``group_size`` features of a token."""
    scheme = ActivationScheme(group_size=group_size)

    def rounded(x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        return dequantize_activation(*quantize_activation(tokens, scheme), scheme).to(x.dtype).reshape(x.shape)

    return rounded


ROWS: list[tuple[str, Rounding, Rounding]] = [
    ("weights per channel", weights_through_fp8(), None),
    ("inputs per token", None, inputs_through_fp8()),
    ("both (per channel, per token)", weights_through_fp8(), inputs_through_fp8()),
    ("weights in groups of 64, inputs per token", weights_through_fp8((1, 64)), inputs_through_fp8()),
    ("weights in groups of 32, inputs per token", weights_through_fp8((1, 32)), inputs_through_fp8()),
    ("weights in 64x64 tiles, inputs in groups of 64", weights_through_fp8((64, 64)), inputs_through_fp8(64)),
    ("both in groups of 32", weights_through_fp8((1, 32)), inputs_through_fp8(32)),
]


def score(model_dir: Path, token_ids: list[int], weights: Rounding, inputs: Rounding) -> float:
    model, _ = load_model(model_dir, load_hf_config(model_dir), "auto", torch.float32, torch.device("cpu"))
    dequantize_linears(model)  # a quantized checkpoint's exact dense twin, as the "unquantized" variant
    for layer in linear_layers(model, {getattr(model, "lm_head", None)}).values():
        if weights is not None:
            layer.weight.data = weights(layer.weight.data)
        if inputs is not None:
            layer.register_forward_pre_hook(lambda module, args, round_input=inputs: (round_input(args[0]),))
    return perplexity(model, token_ids, torch.float32, torch.device("cpu"), None, 512)


def main() -> None:
    model_dir = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)
    token_ids = load_tokenizer(model_dir)(builtin_text("perplexity_text.txt"))["input_ids"]
    base = score(model_dir, token_ids, None, None)
    print(f"{'unquantized':48} {base:8.4f}")
    for name, weights, inputs in ROWS:
        value = score(model_dir, token_ids, weights, inputs)
        print(f"{name:48} {value:8.4f}  {100 * (value / base - 1):+.2f}%", flush=True)


if __name__ == "__main__":
    main()
