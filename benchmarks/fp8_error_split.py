"""Where FP8's perplexity cost comes from: the weights' rounding, the inputs', or both, at several scale grains.

Run from the repository root: ``python3 benchmarks/fp8_error_split.py [MODEL]`` (default: the embedded
SmolLM2-135M-Instruct; float32 on the CPU, a few minutes). Each row is a fresh load of the model whose linear layers
(the LM head excepted) round their weight and/or their input through ``torch.float8_e4m3fn`` with absmax scales,
scored as ``tfbackend perplexity`` scores (same text, same chunks). Fake quantization: it isolates the number
format from the GEMM paths, which ``tfbackend perplexity --variants fp8`` measures.
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
from tfbackend.quantization.loading import dequantize_linears, linear_layers
from tfbackend.registry import load_model

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
Rounding = Callable[[torch.Tensor], torch.Tensor] | None


def fp8_round(x: torch.Tensor, group: int | None = None, tile: int | None = None) -> torch.Tensor:
    """``x`` through E4M3 and back, one absmax scale per row (default), per ``group`` of the last dimension's
    features, or per ``tile`` x ``tile`` block of a matrix."""
    if tile is not None:
        rows, cols = x.shape
        blocks = x.reshape(rows // tile, tile, cols // tile, tile)
        scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12) / FP8_MAX
        return ((blocks / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale).reshape(rows, cols)
    grouped = x.reshape(*x.shape[:-1], -1, group or x.shape[-1])
    scale = grouped.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return ((grouped / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale).reshape(x.shape)


ROWS: list[tuple[str, Rounding, Rounding]] = [
    ("weights per channel", fp8_round, None),
    ("inputs per token", None, fp8_round),
    ("both (per channel, per token)", fp8_round, fp8_round),
    ("weights in groups of 64, inputs per token", lambda w: fp8_round(w, group=64), fp8_round),
    ("weights in groups of 32, inputs per token", lambda w: fp8_round(w, group=32), fp8_round),
    ("weights in 64x64 tiles, inputs in groups of 64", lambda w: fp8_round(w, tile=64), lambda x: fp8_round(x, group=64)),
    ("both in groups of 32", lambda w: fp8_round(w, group=32), lambda x: fp8_round(x, group=32)),
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
