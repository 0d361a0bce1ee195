"""``tfbackend perplexity [MODEL]``: what quantization costs, as perplexity on a fixed text.

The text (default ``tfbackend/data/perplexity_text.txt``: plain English prose, about 2,600 tokens for
SmolLM2's tokenizer) is fed through the model in chunks through a paged KV cache, as the engine feeds a long
prompt, and every token is scored given all the text before it. Each variant is a fresh load of MODEL:

- ``unquantized``: the checkpoint's weights dense (a quantized checkpoint's dequantized exactly);
- ``checkpoint``: the checkpoint as it loads, in its own quantized format (only for quantized checkpoints);
- ``fp8``: the unquantized weights quantized as ``--quantization fp8`` does (E4M3 per output channel, clipping
  searched, inputs per token);
- ``fp8-gptq``: the same FP8 format, the weights rounded by GPTQ (``tfbackend/quantization/gptq.py``) and loaded as
  an FP8 checkpoint's (compressed-tensors, channel strategy);
- ``int4``, ``int4-g32``: GPTQ to 4 bits with integer zero points in groups of 128 / 32 input features, loaded as
  a GPTQ checkpoint's layers;
- ``int4-rtn``, ``int4-rtn-g32``: the same formats by plain round to nearest (each group's clipping searched),
  no calibration;
- ``fp8-kv``: the unquantized weights with an FP8 KV cache.

GPTQ is calibrated on another text than the scored one (``tfbackend/data/calibration_text.txt``, or
``--calibration-text``): every layer's inputs from one pass of the unquantized model, or with ``--sequential``
decoder layer by decoder layer, the layers before it already quantized, as GPTQ's reference code does.

The table gives each variant's perplexity and its change against ``unquantized``.
"""

from __future__ import annotations

import argparse
import math
from importlib.resources import files
from pathlib import Path

import torch

from tfbackend.attention import get_attention_backend
from tfbackend.config import DTYPES
from tfbackend.engine.model_files import load_tokenizer
from tfbackend.entrypoints.check import forward_step
from tfbackend.hf_classes import load_hf_config
from tfbackend.kv_cache import KVCache, KVCacheSpec
from tfbackend.quantization.config import (
    FP8_CHANNEL,
    FP8_ONLINE,
    int4_gptq,
    int4_online,
    quantization_method,
)
from tfbackend.quantization.gptq import (
    Calibration,
    gptq_fp8_shards,
    gptq_int4_shards,
)
from tfbackend.quantization.kv_cache import FP8_KV_DTYPE
from tfbackend.quantization.loading import (
    dequantize_linears,
    linear_layers,
    requantize_linears,
)
from tfbackend.registry import MODEL_IMPLS, load_model

VARIANTS = ("unquantized", "checkpoint", "fp8", "fp8-gptq", "int4", "int4-g32", "int4-rtn", "int4-rtn-g32", "fp8-kv")
GPTQ_VARIANTS = ("fp8-gptq", "int4", "int4-g32")
INT4_GROUP_SIZES = {"int4": 128, "int4-g32": 32, "int4-rtn": 128, "int4-rtn-g32": 32}


def builtin_text(name: str) -> str:
    """``perplexity_text.txt`` (scored) or ``calibration_text.txt`` (GPTQ's calibration), shipped in the package."""
    return files("tfbackend").joinpath("data", name).read_text()


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module, token_ids: list[int], dtype: torch.dtype, device: torch.device,
    kv_cache_dtype: torch.dtype | None = None, chunk_size: int = 512, block_size: int = 16,
) -> float:
    """exp(mean negative log-likelihood) of ``token_ids[1:]``, each given all tokens before it."""
    spec = KVCacheSpec(tuple(model.attention_layers()), kv_cache_dtype or dtype, block_size)
    cache = KVCache(spec, -(-len(token_ids) // block_size), device)
    block_table = torch.arange(cache.num_blocks, dtype=torch.int32, device=device)[None]
    backend = get_attention_backend("auto", device)
    targets = torch.tensor(token_ids[1:], device=device)
    total = 0.0
    for start in range(0, len(token_ids) - 1, chunk_size):
        chunk = token_ids[start : min(start + chunk_size, len(token_ids) - 1)]
        logits = forward_step(model, cache, backend, block_table, [chunk], [start]).float()
        log_probs = torch.log_softmax(logits, dim=-1)
        expected = targets[start : start + len(chunk)]
        total -= log_probs.gather(1, expected[:, None]).sum().item()
    return math.exp(total / (len(token_ids) - 1))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "perplexity", help="perplexity on a fixed text, unquantized against quantized variants",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="local HF folder, .gguf file or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all that apply)")
    parser.add_argument("--text", default=None, help="a text file to score (default: the built-in text)")
    parser.add_argument("--calibration-text", default=None,
                        help="a text file GPTQ calibrates on (default: the built-in calibration text)")
    parser.add_argument("--sequential", action="store_true",
                        help="GPTQ calibrates each decoder layer with the layers before it already quantized (one "
                             "model pass per layer) instead of all layers from one pass of the unquantized model")
    parser.add_argument("--act-order", action="store_true",
                        help="GPTQ rounds the inputs with the largest second moments first (int4: stored as g_idx)")
    parser.add_argument("--model-impl", choices=MODEL_IMPLS, default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens fed per step")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the modeling code a checkpoint ships (config.json auto_map)")


def run(args: argparse.Namespace) -> int:
    from tfbackend.model_source import resolve_model

    variants = [variant.strip() for variant in args.variants.split(",") if variant.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ValueError(f"--variants takes {', '.join(VARIANTS)}; got {args.variants!r}")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be positive, got {args.chunk_size}")
    model_dir = resolve_model(args.model)
    hf_config = load_hf_config(model_dir, args.trust_remote_code)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer to encode the text with")
    text = Path(args.text).read_text() if args.text else builtin_text("perplexity_text.txt")
    token_ids = tokenizer(text)["input_ids"]
    if len(token_ids) < 2:
        raise ValueError("the text must encode to at least two tokens")
    context = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    if context is not None and len(token_ids) > context:
        raise ValueError(f"the text is {len(token_ids)} tokens, more than the model's context of {context}: "
                         f"pass a shorter --text")
    checkpoint_method = quantization_method(hf_config)
    if checkpoint_method is None and "checkpoint" in variants:
        variants.remove("checkpoint")  # an unquantized checkpoint is the unquantized variant
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"{model_dir}: {len(token_ids)} tokens, {args.dtype} on {device}; checkpoint: "
          f"{checkpoint_method.describe() if checkpoint_method else 'unquantized'}")

    # GPTQ's calibration: another text than the one scored, as much of it as fits the model's context.
    calibration = Path(args.calibration_text).read_text() if args.calibration_text else builtin_text("calibration_text.txt")
    calibration_ids = tokenizer(calibration)["input_ids"][:context]
    if any(variant in GPTQ_VARIANTS for variant in variants):
        options = [name for name, on in (("sequential", args.sequential), ("act order", args.act_order)) if on]
        print(f"GPTQ calibration: {len(calibration_ids)} tokens{''.join(', ' + option for option in options)}")
    results: dict[str, float] = {}
    for variant in variants:
        model = _load_variant(variant, model_dir, args, dtype, device, calibration_ids)
        kv_dtype = FP8_KV_DTYPE if variant == "fp8-kv" else None
        results[variant] = perplexity(model, token_ids, dtype, device, kv_dtype, args.chunk_size)
        del model  # one model in memory at a time
        _print_row(variant, results)
    return 0


def _load_variant(
    variant: str, model_dir, args: argparse.Namespace, dtype: torch.dtype, device: torch.device,
    calibration_ids: list[int],
) -> torch.nn.Module:
    """A fresh load of the model with the variant's weights."""
    hf_config = load_hf_config(model_dir, args.trust_remote_code)  # fresh: HF loading may annotate it
    model, _ = load_model(model_dir, hf_config, args.model_impl, dtype, device)
    if variant == "checkpoint":
        return model
    dequantize_linears(model)
    if variant in ("unquantized", "fp8-kv"):
        return model
    skip = {getattr(model, "lm_head", None)}  # the logits stay dense, as in every format
    if variant == "fp8":
        requantize_linears(model, FP8_ONLINE, dtype, device, skip)
    elif variant in GPTQ_VARIANTS:
        # requantize_linears replaces the layers in model order: with --sequential, each block is calibrated
        # after the blocks before it were quantized.
        calibration = Calibration(
            model, list(linear_layers(model, skip)),
            lambda: perplexity(model, calibration_ids, dtype, device, chunk_size=len(calibration_ids)),
            sequential=args.sequential,
        )
        def shards(name: str, weight: torch.Tensor, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
            if variant == "fp8-gptq":
                return gptq_fp8_shards(weight, calibration.hessian(name), sizes, args.act_order)
            return gptq_int4_shards(weight, calibration.hessian(name), sizes, INT4_GROUP_SIZES[variant], args.act_order)

        method = FP8_CHANNEL if variant == "fp8-gptq" else int4_gptq(INT4_GROUP_SIZES[variant])
        requantize_linears(model, method, dtype, device, skip, shards)
    else:  # int4 by round to nearest
        requantize_linears(model, int4_online(INT4_GROUP_SIZES[variant]), dtype, device, skip)
    return model


def _print_row(variant: str, results: dict[str, float]) -> None:
    value = results[variant]
    base = results.get("unquantized")
    change = "" if base is None or variant == "unquantized" else f"  {100 * (value / base - 1):+.2f}%"
    print(f"  {variant:<12} perplexity {value:8.4f}{change}")
