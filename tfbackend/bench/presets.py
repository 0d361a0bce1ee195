"""Random-weight checkpoints with the exact shapes of real models, for benchmarks that need no real weights.

Speed depends on shapes, not values, so ``llama-3.2-1b`` has Llama-3.2-1B's config (its RoPE scaling too) and
normally distributed bf16 weights; prompts are token ids, since there is no tokenizer. ``tiny-llama`` is the
same architecture at toy size, to exercise the benchmark on a CPU. Each preset is written once into the cache
folder and reused.
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

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": True, "attention_bias": False,
    "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16", "initializer_range": 0.02,
}
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": {**_LLAMA_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072},
    "tiny-llama": {**_LLAMA_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
                   "max_position_embeddings": 1024, "bos_token_id": 1, "eos_token_id": 2,
                   "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": 256},
                   "initializer_range": 0.15},  # wide enough that greedy outputs vary at this size
}
_COMPLETE = ".complete"


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
        save_file(_random_llama_weights(config, seed), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / _COMPLETE).touch()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _random_llama_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, initializer_range) and norm weights of 1, drawn on the GPU when there is one (faster)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
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
    std = config["initializer_range"]
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, device=device).normal_(0.0, std, generator=generator)
        weights[name] = tensor.to(torch.bfloat16).cpu()
    return weights
