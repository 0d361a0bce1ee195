"""Tiny random checkpoints of any causal-LM type the installed transformers knows.

``tiny_config(model_type)`` starts from the type's default config and shrinks every size it recognises
(widths, depths, heads, experts, MLA ranks, windows, vocabulary), in every nested sub-config, so that a model of
any family builds in a fraction of a second and still exercises what makes it different: per-layer patterns are
resampled so each distinct layer type survives, sliding windows become shorter than the test prompts, K and V
widths of MLA stay different. Nothing here names a model type except ``OVERRIDES``, for the few configs whose
defaults contradict the generic rules.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 256
NUM_LAYERS = 2
# Token ids at the top of the vocabulary are kept for special tokens; prompts draw from below.
RESERVED_TOP_IDS = 32

# Config key -> the small value it takes (only where the default is larger, and never from None).
SMALL_SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim"), 64),
    **dict.fromkeys(
        ("intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "n_inner", "d_ff", "dim_ff",
         "ffn_hidden_size", "intermediate_size_mlp", "dff"), 128),
    **dict.fromkeys(
        ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
         "shared_intermediate_size", "expert_intermediate_size"), 64),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads", "encoder_attention_heads",
         "num_heads", "attention_heads", "swa_num_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "swa_head_dim", "d_kv", "dim_head"), 16),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k_experts", "moe_k"), 2),
    # MLA: keys (nope + rope = 24 wide) deliberately wider than values (16).
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "o_lora_rank": 32, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
                     "max_source_positions", "model_max_length"), 512),
    # Windows shorter than the test prompts, so that they matter.
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_chunk_size", "window_size",
                     "local_attention_window_len"), 8),
    # State-space and linear-attention layers.
    **dict.fromkeys(("state_size", "mamba_d_state", "ssm_state_size", "d_state"), 16),
    **dict.fromkeys(("mamba_n_heads", "linear_num_value_heads", "linear_num_heads", "num_linear_heads"), 4),
    **dict.fromkeys(("linear_num_key_heads",), 2),
    **dict.fromkeys(("mamba_d_head", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"), 16),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 8),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 16),
    **dict.fromkeys(("attention_hidden_size", "lru_width"), 64),
    # Per-layer inputs and other side paths (gemma3n and relatives).
    "hidden_size_per_layer_input": 16, "laurel_rank": 8, "vocab_size_per_layer_input": VOCAB,
    **dict.fromkeys(("image_size",), 32), **dict.fromkeys(("patch_size",), 8),
    **dict.fromkeys(("vision_output_dim", "out_hidden_size", "projection_dim", "text_hidden_size"), 64),
    "num_channels": 3,
}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers")
TOKEN_ID_SUFFIXES = ("_token_id", "_token_index", "_token_ids")

# The few types whose defaults contradict the generic rules (key -> value for the top-level config).
OVERRIDES: dict[str, dict] = {}


def causal_lm_types() -> list[str]:
    """Every model type the installed transformers maps to a causal-LM class."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _is_sub_config(value) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _resample(values: list, new_layers: int) -> list:
    """A per-layer list cut to ``new_layers`` entries that keeps every distinct value it had."""
    kept = list(values[:new_layers])
    distinct = [v for i, v in enumerate(values) if v not in values[:i]]
    missing = [v for v in distinct if v not in kept]
    for slot, value in zip(range(new_layers - 1, -1, -1), missing):
        kept[slot] = value
    return kept


def _num_layers_needed(config: dict) -> int:
    """Enough layers that every distinct entry of a per-layer pattern survives (at least NUM_LAYERS)."""
    old = next((config[key] for key in LAYER_COUNT_KEYS if isinstance(config.get(key), int)), None)
    needed = NUM_LAYERS
    if old is None:
        return needed
    for value in config.values():
        if isinstance(value, list) and len(value) == old > 0:
            needed = max(needed, len([v for i, v in enumerate(value) if v not in value[:i]]))
    return min(needed, old)


def _shrink(config: dict) -> dict:
    config = copy.deepcopy(config)
    old_layers = next((config[key] for key in LAYER_COUNT_KEYS if isinstance(config.get(key), int)), None)
    new_layers = _num_layers_needed(config)
    for key, value in list(config.items()):
        if _is_sub_config(value):
            config[key] = _shrink(value)
        elif key in LAYER_COUNT_KEYS and isinstance(value, int):
            config[key] = min(value, new_layers)
        elif key in SMALL_SIZES and isinstance(value, int) and not isinstance(value, bool):
            config[key] = min(value, SMALL_SIZES[key])
        elif key == "vocab_size" and isinstance(value, int):
            config[key] = VOCAB
        elif isinstance(value, list) and old_layers and len(value) == old_layers and new_layers < old_layers:
            config[key] = _resample(value, new_layers)
    if config.get("num_key_value_heads") and config.get("num_attention_heads"):
        config["num_key_value_heads"] = min(config["num_key_value_heads"], config["num_attention_heads"])
    if "qk_head_dim" in config and "qk_nope_head_dim" in config and "qk_rope_head_dim" in config:
        config["qk_head_dim"] = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    for key in ("max_window_layers", "first_k_dense_replace", "num_kv_shared_layers"):
        if isinstance(config.get(key), int) and new_layers:
            config[key] = min(config[key], new_layers // 2)
    _remap_token_ids(config)
    return config


def _remap_token_ids(config: dict) -> None:
    """Special token ids beyond the small vocabulary move to its reserved top, distinct from each other."""
    next_id = VOCAB - 1
    for key, value in config.items():
        if not key.endswith(TOKEN_ID_SUFFIXES):
            continue
        ids = value if isinstance(value, list) else [value]
        if all(not isinstance(i, int) or i < VOCAB - RESERVED_TOP_IDS for i in ids):
            continue
        remapped = []
        for i in ids:
            if isinstance(i, int) and i >= VOCAB - RESERVED_TOP_IDS:
                i, next_id = next_id, next_id - 1
            remapped.append(i)
        config[key] = remapped if isinstance(value, list) else remapped[0]


@functools.cache
def _default_config_dict(model_type: str) -> dict:
    return AutoConfig.for_model(model_type).to_dict()


def tiny_config(model_type: str, **overrides):
    """The type's default config with every size shrunk (see the module docstring)."""
    shrunk = _shrink(_default_config_dict(model_type))
    shrunk.update(OVERRIDES.get(model_type, {}))
    shrunk.update(overrides)
    config_class = type(AutoConfig.for_model(model_type))
    return config_class.from_dict(shrunk)


def build_tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 random model of the type, with weights wide enough that greedy decoding is not a tie-break."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    return model


def save_tiny_checkpoint(model_type: str, directory: Path, seed: int = 0, **overrides) -> None:
    build_tiny_model(model_type, seed, **overrides).save_pretrained(directory)


def load_reference(directory: Path) -> torch.nn.Module:
    """The checkpoint reloaded from disk, as HF would serve it: the ground truth for parity."""
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def prompt_token_ids(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB - RESERVED_TOP_IDS, (n,), generator=generator).tolist() for n in lengths]
