"""Random-weight checkpoints with the exact shapes of real models, for benchmarks that need no real weights.

Speed depends on shapes, not values, so ``llama-3.2-1b`` has Llama-3.2-1B's config (its RoPE scaling too) and
normally distributed bf16 weights; prompts are token ids, since there is no tokenizer. ``tiny-llama`` is the
same architecture at toy size, to exercise the benchmark on a CPU. Each preset is written once into the cache
folder and reused. ``llama-3.1-8b`` and ``llama-3.1-70b`` are the tensor-parallel benchmarks' shapes (70B: 141 GB
of weights, one GPU cannot hold it); ``qwen3-0.6b``, ``gemma2-2b``, ``olmoe-1b-7b`` (64 experts) and
``qwen3-30b-a3b`` (128 experts, 61 GB) cover other architectures, the last three on the Transformers fallback.

The tensors are those the installed transformers' model class declares for the config (built on the meta
device, so nothing is allocated), under its own parameter names, which its loader reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from tfbackend.hf_classes import causal_lm_class, load_hf_config
from tfbackend.model_source import default_cache_dir
from tfbackend.native.weights import SAFETENSORS_INDEX

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": True, "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16", "initializer_range": 0.02,
}
_LLAMA31_ROPE = {**_LLAMA3_ROPE, "factor": 8.0}
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": {**_LLAMA_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072},
    # Tensor-parallel shapes: 8B on one or two GPUs, 70B (141 GB in bf16) only on several.
    "llama-3.1-8b": {**_LLAMA_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_scaling": _LLAMA31_ROPE, "tie_word_embeddings": False},
    "llama-3.1-70b": {**_LLAMA_COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                      "max_position_embeddings": 131072, "rope_scaling": _LLAMA31_ROPE,
                      "tie_word_embeddings": False},
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": True, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16", "initializer_range": 0.02,
    },
    "gemma2-2b": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "vocab_size": 256000, "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
        "attention_bias": False, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "torch_dtype": "bfloat16", "initializer_range": 0.02,
    },
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "norm_topk_prob": False, "vocab_size": 50304, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False,
        "clip_qkv": None, "tie_word_embeddings": False, "eos_token_id": 50279, "pad_token_id": 1,
        "torch_dtype": "bfloat16", "initializer_range": 0.02,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "attention_bias": False, "tie_word_embeddings": False, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16", "initializer_range": 0.02,
    },
    "tiny-llama": {**_LLAMA_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
                   "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
                   "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": 256},
                   "initializer_range": 0.15},  # wide enough that greedy outputs vary at this size
}
_COMPLETE = ".complete"
_SHARD_BYTES = 5 << 30


def random_checkpoint(preset: str, cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The folder of ``preset``'s random checkpoint, written on first use."""
    if preset not in PRESETS:
        raise ValueError(f"unknown random-weights preset {preset!r}; choose from {sorted(PRESETS)}")
    target = (cache_dir or default_cache_dir()) / "random-weights" / f"{preset}-seed{seed}"
    if not (target / _COMPLETE).is_file():
        write_random_checkpoint(PRESETS[preset], target, seed)
    return target


def write_random_checkpoint(config: dict, target: Path, seed: int = 0) -> None:
    """Write ``config`` and random weights for it to ``target`` (replaced whole, so a crash leaves nothing)."""
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_random_weights(_parameter_shapes(tmp), config["initializer_range"], seed, tmp)
        (tmp / _COMPLETE).touch()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parameter_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter the installed transformers' model class has for the config in
    ``model_dir`` (a tied output embedding appears once, under the input embedding's name)."""
    hf_config = load_hf_config(model_dir)
    with torch.device("meta"):
        model = causal_lm_class(hf_config)(hf_config)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def _write_random_weights(shapes: dict[str, tuple[int, ...]], std: float, seed: int, directory: Path) -> None:
    """Matrices ~ N(0, std), vectors (norm weights, biases) of 1, drawn on the GPU when there is one (faster), in
    shards of at most ``_SHARD_BYTES`` (so a 70B checkpoint never sits whole in host memory) with an index."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files = 0

    def flush() -> None:
        nonlocal shard, files
        files += 1
        name = f"model-{files:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard = {}

    for name, shape in shapes.items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, device=device).normal_(0.0, std, generator=generator).to(torch.bfloat16).cpu()
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > _SHARD_BYTES:
            flush()
        shard[name] = tensor
    flush()
    total = sum((directory / name).stat().st_size for name in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
