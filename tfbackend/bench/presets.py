"""Random-weight checkpoints with the exact shapes of real models, for benchmarks that need no real weights.

Speed depends on shapes, not values, so ``llama-3.2-1b`` has Llama-3.2-1B's config (its RoPE scaling too) and
normally distributed bf16 weights; prompts are token ids, since there is no tokenizer. ``tiny-llama`` is the
same architecture at toy size, to exercise the benchmark on a CPU. Each preset is written once into the cache
folder and reused. ``llama-3.1-8b`` and ``llama-3.1-70b`` are the tensor-parallel benchmarks' shapes (70B: 141 GB
of weights, one GPU cannot hold it).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

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
    if (target / _COMPLETE).is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        config = PRESETS[preset]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_random_llama_weights(config, seed, tmp)
        (tmp / _COMPLETE).touch()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_random_llama_weights(config: dict, seed: int, directory: Path) -> None:
    """Weights ~ N(0, initializer_range) and norm weights of 1, drawn on the GPU when there is one (faster),
    in shards of at most ``_SHARD_BYTES`` (so a 70B checkpoint never sits whole in host memory) with an index."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    std = config["initializer_range"]
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

    for name, shape in _llama_shapes(config).items():
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


def _llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_size, kv_size = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (q_size, hidden),
            prefix + "self_attn.k_proj.weight": (kv_size, hidden),
            prefix + "self_attn.v_proj.weight": (kv_size, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q_size),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes
