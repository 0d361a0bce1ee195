"""Tiny random checkpoints of any causal-LM type the installed transformers knows.

``tiny_config(model_type)`` starts from the type's default config and shrinks it, in every nested sub-config, so
that a model of any family builds in a fraction of a second and still exercises what makes it different:

- depth: the kept layers are chosen so that every distinct value of every per-layer pattern (layer types, MLP
  types, index lists such as full-attention layers, ``per_layer_config`` entries, period/offset schedules) survives,
  within each leading, middle or trailing block of layers (dense layers before MoE ones, KV-sharing layers at the
  end); index lists, ``per_layer_config`` keys, schedules and block depths follow the kept layers;
- widths, heads, experts, MLA ranks, state sizes and vocabularies take small values; sliding windows, chunks and
  sparse-attention budgets become shorter than the test prompts (30 tokens); MLA keys stay wider than values; MoE
  keeps 4 experts and routes each token to 2;
- sizes that a config derives from others (``head_dim`` of MLA, ``qk_head_dim`` ...) are left for it to derive
  again, and the relations it only validates are restored: MHA stays MHA, mamba heads x head width = expand x
  hidden, rotary width and multimodal RoPE sections follow the head, expert groups hold two experts each;
- special token ids move to the top of the small vocabulary, one new id per old id across all sub-configs.

Nothing here names a model type except three tables, each entry with why: ``OVERRIDES`` (defaults that cannot build
a model ``generate`` can run), ``TINY_OVERRIDES`` (shrunk sizes the generic rules cannot derive) and
``UNCOVERED_TYPES`` (causal-LM types no tiny model can stand for).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tfbackend.hf_classes import causal_lm_class

VOCAB = 256
NUM_LAYERS = 2
# Token ids at the top of the vocabulary are kept for special tokens; prompts draw from below.
RESERVED_TOP_IDS = 32

HEADS = 4
EXPERTS_PER_TOKEN = 2
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
# Config key -> the small value it takes (only where the default is larger, and never from None).
SMALL_SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embedding_dim", "emb_dim"), 64),
    **dict.fromkeys(
        ("intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "n_inner", "d_ff", "dim_ff",
         "ffn_hidden_size", "intermediate_size_mlp", "dff", "d_inner", "feed_forward_size"), 128),
    **dict.fromkeys(
        ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
         "shared_intermediate_size", "expert_intermediate_size", "moe_shared_expert_intermediate_size",
         "expert_ffn_hidden_size"), 64),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads", "encoder_attention_heads",
         "num_heads", "attention_heads", "swa_num_attention_heads", "num_encoder_attention_heads",
         "num_decoder_attention_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "swa_num_key_value_heads",
                     "kv_n_heads"), 2),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "swa_head_dim", "d_kv", "dim_head", "d_head",
                     "attention_head_size"), 16),
    **dict.fromkeys(EXPERT_COUNT_KEYS, 4),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts"), 1),
    # Experts that return zero (LongCat's "zero experts").
    "zero_expert_num": 2,
    # MLA: keys (nope + rope = 24 wide) deliberately wider than values (16).
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "o_lora_rank": 32, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
                     "max_source_positions", "model_max_length"), 512),
    # Windows shorter than the test prompts, so that they matter.
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_chunk_size", "window_size",
                     "local_attention_window_len", "attention_window_size", "keep_window_size"), 8),
    "local_attention": 16,  # ModernBERT's window spans both sides (8 back).
    **dict.fromkeys(("block_size", "index_block_size"), 16),
    # State-space and linear-attention layers.
    **dict.fromkeys(("state_size", "mamba_d_state", "ssm_state_size", "d_state"), 16),
    **dict.fromkeys(("mamba_n_heads", "n_mamba_heads", "mamba_num_heads", "linear_num_value_heads", "linear_num_heads",
                     "num_linear_heads"), 4),
    **dict.fromkeys(("linear_num_key_heads", "n_groups", "mamba_n_groups", "mamba_ngroups"), 2),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_head_dim"), 16),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 8),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 16),
    **dict.fromkeys(("attention_hidden_size", "lru_width", "mamba_d_ssm"), 64),
    # Per-layer inputs and other side paths (gemma3n and relatives).
    "hidden_size_per_layer_input": 16, "laurel_rank": 8, "vocab_size_per_layer_input": VOCAB,
    **dict.fromkeys(("image_size",), 32), **dict.fromkeys(("patch_size",), 8),
    **dict.fromkeys(("vision_output_dim", "out_hidden_size", "projection_dim", "text_hidden_size",
                     "projector_input_dim", "projector_output_dim", "hidden_size_global"), 64),
    **dict.fromkeys(("mlp_dim",), 128), **dict.fromkeys(("adapter_rank", "hc_lowrank"), 8),
    **dict.fromkeys(("adapter_out_dim",), 64),
    # Sparse-attention indexers: fewer selected tokens than the prompt has.
    **dict.fromkeys(("indexer_n_heads",), HEADS), **dict.fromkeys(("indexer_head_dim",), 16),
    **dict.fromkeys(("indexer_budget",), 8), **dict.fromkeys(("indexer_compress_ratio",), 4),
    **dict.fromkeys(("num_centroids", "codebook_size", "encoder_hash_byte_group_vocab"), VOCAB),
    "num_channels": 3,
}
# Sizes named by their ending, where the exact name is not in SMALL_SIZES (side vocabularies, extra embeddings).
SMALL_SIZE_SUFFIXES: dict[str, int] = {
    "vocab_size": VOCAB, "embed_dim": 32, "embedding_size": 32, "hidden_size": 64, "intermediate_size": 128,
    "_channels": 32, "_channel": 32,
}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
                    "num_decoder_layers", "num_encoder_layers", "num_blocks")
# Depths of a leading or trailing block of layers built unlike the rest (dense layers before the MoE ones, layers
# that reuse an earlier layer's KV cache at the end), and of the middle between them where a config counts it (a
# looped stack): each block keeps at least one layer.
LEADING_BLOCK_KEYS = ("first_k_dense_replace", "num_dense_layers", "max_window_layers", "n_input_layers")
TRAILING_BLOCK_KEYS = ("num_kv_shared_layers", "n_output_layers")
MIDDLE_BLOCK_KEYS = ("n_recurrent_layers",)
# Layer types whose block is one module shared by all layers of the type (Zamba's shared attention): two are kept,
# so that the sharing is exercised (and the tying of the shared weights has a target).
SHARED_LAYER_TYPES = ("hybrid",)
# Names of lists of layer indices (e.g. ``mlp_only_layers``, ``global_attn_indexes``).
INDEX_LIST_MARKERS = ("layer", "indices", "indexes", "idx")
PER_LAYER_CONFIG_KEY = "per_layer_config"
TOKEN_ID_SUFFIXES = ("_token_id", "_token_index", "_token_ids")
# State-space mixers: (expand, heads, head width) keys whose product must equal expand x hidden (or the explicit
# inner width where the config has one).
SSM_HEAD_KEYS = (("expand", "num_heads", "head_dim"), ("mamba_expand", "mamba_n_heads", "mamba_d_head"),
                 ("expand", "mamba_num_heads", "mamba_head_dim"))
SSM_INNER_KEYS = ("mamba_d_ssm",)
# (follower, leader): sizes that the default config keeps equal, kept equal after shrinking (MHA stays MHA; MLA's
# rotary ``head_dim`` stays the rope part of the key).
TIED_SIZES = (
    ("num_key_value_heads", "num_attention_heads"), ("swa_num_key_value_heads", "swa_num_attention_heads"),
    ("head_dim", "qk_rope_head_dim"), ("word_embed_proj_dim", "hidden_size"), ("adapter_in_dim", "hidden_size"),
    ("adapter_input_size", "hidden_size"),
)
ROTARY_WIDTH_KEYS = ("rotary_dim",)
EXPERT_GROUP_KEYS = ("n_group", "num_expert_group")
# Routed experts per token: always EXPERTS_PER_TOKEN, also in top-1 families (Llama 4), so that every MoE mixes.
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k_experts", "moe_k", "moe_top_k")

# Configs whose defaults cannot build a model (or one that ``generate`` can run), merged into the default config
# (and into each sub-config of that model type) before shrinking, with why.
OVERRIDES: dict[str, dict] = {
    # Defaults have no attention layer at all, and HF ``generate`` cannot start from a cache of mamba layers only:
    # put attention layers among the mamba ones, as the released checkpoints do.
    "bamba": {"attn_layer_indices": [9, 18, 27]},
    "granitemoehybrid": {"layer_types": ["full_attention" if i % 8 == 7 else "linear_attention" for i in range(32)]},
    # Default ``rope_parameters`` are empty, but the model reads them per layer type: sliding layers with RoPE and
    # full-attention layers without (NoPE), Cohere2-style; the sections split the rotary frequencies of a 128 head
    # (the model's own fallback is a version-dependent 64-frequency split).
    "cohere_compass_text": {
        "layer_types": ["full_attention" if i % 4 == 3 else "sliding_attention" for i in range(40)],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0,
                                                  "mrope_section": [24, 20, 20]},
                            "full_attention": None},
    },
    # HF ``generate`` sizes its cache from the top config's ``num_hidden_layers``, which BLT's lacks: give it the
    # deepest stack's (the global transformer's).
    "blt": {"num_hidden_layers": 25},
    # Defaults leave the routed top-k unset (None): DeepSeek-V2-Lite's.
    "deepseek_v2": {"num_experts_per_tok": 6},
    # The layer pattern is run-length coded in ``attention_types``, which the generic per-layer rules do not read.
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2},
    # The layout is serialised as (attention, mlp) block pairs, which the config halves on load: give it per layer.
    "dory": {"num_hidden_layers": 36, "n_input_layers": 8, "n_recurrent_layers": 20, "n_output_layers": 8,
             "layer_types": ["full_attention" if i % 4 == 3 else "sliding_attention" for i in range(36)]},
    # The indexed-attention layers always build the QSA indexer, whose sizes default to None.
    "qwen4_exp_text": {"indexer_n_heads": 16, "indexer_kv_heads": 1, "indexer_head_dim": 128,
                       "indexer_budget": 2048, "indexer_compress_ratio": 4},
    # The attention widths are stored, but derived (2 x hidden) when left None: let the config derive them.
    "zamba": {"attention_hidden_size": None, "attention_head_dim": None},
    # The LM head refuses to build unless the config says decoder.
    "reformer": {"is_decoder": True},
    # Adapters are chosen per language; the model refuses input without a default language.
    "xmod": {"default_language": "en_XX"},
    # The serialised ``num_hidden_layers`` counts cache slots (stack depth x cycles); let the config derive it from
    # the (shrunk) stack depth.
    "hrm_text": {"num_layers_per_stack": None, "num_hidden_layers": 16},
    # The attention reads ``attn_config.rope_theta``, which the default attention config lacks, and clamps with
    # ``clip_qkv``, which defaults to None; the default MoE routes top-1, DBRX routes top-4 of 16.
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0},
             "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4}},
    # Defaults put attention in every layer (no short-conv layer at all): use LFM2-1.2B's layout.
    "lfm2": {"num_hidden_layers": 16, "layer_types": None, "full_attn_idxs": [2, 5, 8, 10, 12, 14]},
    # Defaults leave ``layer_types`` unset, which the model indexes: short-conv layers with attention every 4th.
    "lfm2_moe": {"num_hidden_layers": 24,
                 "layer_types": ["full_attention" if i % 4 == 2 else "conv" for i in range(24)]},
    # Defaults leave the experts unset (None) and would build no MoE block.
    "dots1": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1},
}

# Sizes of the shrunk config that the generic rules cannot derive, merged into it after shrinking, with why.
TINY_OVERRIDES: dict[str, dict] = {
    # The config rounds the query/key width up to a multiple of 64 but the model does not: hidden x qk_dim_factor
    # (0.5) must be a multiple of 64.
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},
    # ZAYA's router supports top-1 routing only.
    "zaya": {"num_experts_per_tok": 1},
    # Sliding layers need head_dim = their qk_nope_head_dim (24, per-layer) + qk_rope_head_dim (8).
    "dots3_note_text": {"head_dim": 32},
}

# Causal-LM types that no tiny model can stand for (transformers 5.17 to 5.24), with why.
UNCOVERED_TYPES: dict[str, str] = {
    **dict.fromkeys(
        ("gemma4_assistant", "gemma4_unified_assistant"),
        "a speculative-decoding drafter that reads the target model's KV cache (all its layers are KV-shared): "
        "it cannot generate on its own"),
    **dict.fromkeys(
        ("musicgen", "musicgen_melody"),
        "AutoModelForCausalLM maps the composite config to the decoder class, which cannot be built from it (and "
        "AutoModelForCausalLM refuses the decoder sub-config); its tokens are multi-codebook audio frames"),
    "gemma3n": "its vision tower is a timm model (needs timm and PIL, not project dependencies); the text model is "
               "covered as gemma3n_text",
}


def causal_lm_types() -> list[str]:
    """Every model type the installed transformers maps to a causal-LM class."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _is_sub_config(value) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sub_config_class(parent_class: type, key: str, sub_config: dict) -> type | None:
    declared = parent_class.sub_configs.get(key) if parent_class else None
    if declared is not None and declared is not AutoConfig:
        return declared
    return CONFIG_MAPPING.get(sub_config["model_type"])


@functools.cache
def _base_keys() -> frozenset[str]:
    return frozenset(PreTrainedConfig().to_dict())


@functools.cache
def _bookkeeping_keys() -> frozenset[str]:
    """Keys that ``to_dict`` writes but no config field holds (``_name_or_path``, ``output_attentions`` ...)."""
    fields = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    return frozenset(_base_keys() - fields - {"model_type"})


@functools.cache
def _derived_keys(config_class: type | None) -> frozenset[str]:
    """Keys that the config class computes from its fields (in its default dict, but neither a field nor an alias
    of one): left out of the shrunk dict so that the config derives them again from the shrunk sizes."""
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return frozenset()
    try:
        default = config_class().to_dict()
    except (ValueError, TypeError):  # defaults that do not validate on their own
        return frozenset()
    fields = {field.name for field in dataclasses.fields(config_class)}
    aliases = set(getattr(config_class, "attribute_map", {}).values())
    return frozenset(default.keys() - fields - aliases - _base_keys() - {PER_LAYER_CONFIG_KEY})


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if both_dicts else value
    return merged


def _with_overrides(config: dict, table: dict[str, dict]) -> dict:
    """The config with the table's entry for its model type merged in, and so in each of its sub-configs."""
    config = _merge(config, table.get(config.get("model_type"), {}))
    return {key: _with_overrides(value, table) if _is_sub_config(value) else value for key, value in config.items()}


# ---------------------------------------------------------------------------------------------- depth


def _layer_count(config: dict) -> int | None:
    return next((config[key] for key in LAYER_COUNT_KEYS if _is_int(config.get(key))), None)


def _index_list_keys(config: dict, num_layers: int) -> list[str]:
    return [
        key for key, value in config.items()
        if any(marker in key for marker in INDEX_LIST_MARKERS) and not key.endswith(TOKEN_ID_SUFFIXES)
        and isinstance(value, list) and value and all(_is_int(i) and 0 <= i < num_layers for i in value)
        and value == sorted(set(value))
    ]


def _period_keys(config: dict) -> list[tuple[str, str]]:
    return [
        (key, key[: -len("period")] + "offset") for key, value in config.items()
        if key.endswith("_period") and _is_int(value) and value > 0
        and _is_int(config.get(key[: -len("period")] + "offset"))
    ]


def _cyclic_pattern_length(config: dict, num_layers: int) -> int:
    """Layers needed to show every entry of a pattern that repeats over the depth (e.g. recurrent, recurrent,
    attention)."""
    needed = 0
    for value in config.values():
        if (isinstance(value, list) and 1 < len(value) < num_layers and all(isinstance(v, str) for v in value)
                and len(set(value)) > 1):
            needed = max(needed, max(value.index(v) for v in value) + 1)
    return needed


def _per_layer_columns(config: dict, num_layers: int) -> list[list]:
    """Every per-layer pattern of the config, as one value per layer."""
    index_lists = _index_list_keys(config, num_layers)
    columns = [value for key, value in config.items()
               if isinstance(value, list) and len(value) == num_layers and key not in index_lists]
    columns += [[i in config[key] for i in range(num_layers)] for key in index_lists]
    columns += [[i % config[period] == config[offset] for i in range(num_layers)]
                for period, offset in _period_keys(config)]
    overrides = {int(i): entry for i, entry in (config.get(PER_LAYER_CONFIG_KEY) or {}).items()}
    if overrides:
        columns.append([json.dumps(overrides.get(i), sort_keys=True) for i in range(num_layers)])
    return columns


def _blocks(config: dict, num_layers: int) -> list[range]:
    """The depth cut into a leading block, the middle and a trailing block (each only where the config has one)."""
    lead = max([config[key] for key in LEADING_BLOCK_KEYS if _is_int(config.get(key))] + [0])
    trail = max([config[key] for key in TRAILING_BLOCK_KEYS if _is_int(config.get(key))] + [0])
    lead, trail = min(lead, num_layers), min(trail, num_layers - min(lead, num_layers))
    bounds = [0, lead, num_layers - trail, num_layers]
    return [range(start, stop) for start, stop in itertools.pairwise(bounds) if stop > start]


def _kept_layers(config: dict, num_layers: int) -> list[int]:
    """Indices of the layers to keep: in each block, the first layer showing each value of each pattern."""
    columns = _per_layer_columns(config, num_layers)
    kept: set[int] = set()
    for block in _blocks(config, num_layers):
        in_block: list[int] = []
        for column in columns:
            for i in block:
                wanted = 2 if column[i] in SHARED_LAYER_TYPES else 1
                if sum(column[i] == column[j] for j in in_block) < wanted:
                    in_block.append(i)
        kept.update(in_block or [block.start])
    wanted = max(NUM_LAYERS, _cyclic_pattern_length(config, num_layers))
    for i in range(num_layers):
        if len(kept) >= wanted:
            break
        kept.add(i)
    return sorted(kept)


def _period_offset(column: list[bool]) -> tuple[int, int]:
    """The smallest (period, offset) whose schedule gives this column."""
    for period in range(1, len(column) + 1):
        for offset in range(period):
            if column == [i % period == offset for i in range(len(column))]:
                return period, offset
    raise ValueError(f"no period/offset schedule gives {column}")


def _shrink_depth(config: dict) -> None:
    num_layers = _layer_count(config)
    if not num_layers:
        return
    kept = _kept_layers(config, num_layers)
    if len(kept) >= num_layers:
        return
    index_lists = _index_list_keys(config, num_layers)
    for key in index_lists:
        config[key] = [new for new, old in enumerate(kept) if old in config[key]]
    for period, offset in _period_keys(config):
        column = [i % config[period] == config[offset] for i in kept]
        config[period], config[offset] = _period_offset(column)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == num_layers and key not in index_lists:
            config[key] = [value[i] for i in kept]
    if config.get(PER_LAYER_CONFIG_KEY):
        overrides = {int(i): entry for i, entry in config[PER_LAYER_CONFIG_KEY].items()}
        config[PER_LAYER_CONFIG_KEY] = {str(new): overrides[old] for new, old in enumerate(kept) if old in overrides}
    for key in LEADING_BLOCK_KEYS:
        if _is_int(config.get(key)):
            config[key] = sum(1 for i in kept if i < config[key])
    for key in TRAILING_BLOCK_KEYS:
        if _is_int(config.get(key)):
            config[key] = sum(1 for i in kept if i >= num_layers - config[key])
    for key in MIDDLE_BLOCK_KEYS:
        if _is_int(config.get(key)):
            config[key] = len(kept) - sum(config[k] for k in LEADING_BLOCK_KEYS + TRAILING_BLOCK_KEYS
                                          if _is_int(config.get(k)))
    for key in LAYER_COUNT_KEYS:
        if _is_int(config.get(key)):
            config[key] = min(config[key], len(kept))


# ---------------------------------------------------------------------------------------------- widths


def _small(key: str, value):
    """The small value of a size (elementwise for a per-layer list of sizes)."""
    if isinstance(value, list):
        return [_small(key, v) for v in value]
    if not _is_int(value):
        return value
    if key == "vocab_size":
        return VOCAB
    if key in SMALL_SIZES:
        return min(value, SMALL_SIZES[key])
    suffix = next((suffix for suffix in SMALL_SIZE_SUFFIXES if key.endswith(suffix)), None)
    return min(value, SMALL_SIZE_SUFFIXES[suffix]) if suffix else value


def _shrink_per_layer_overrides(config: dict, default: dict) -> None:
    """Per-layer overrides keep their ratio to the global size (e.g. global-attention heads twice as wide)."""
    for entry in (config.get(PER_LAYER_CONFIG_KEY) or {}).values():
        old_entry = dict(entry)
        for key, value in old_entry.items():
            old, new = default.get(key), config.get(key)
            if _is_int(value) and _is_int(old) and _is_int(new) and old > 0:
                entry[key] = max(1, round(value * new / old))
            else:
                entry[key] = _small(key, value)
        _restore_ties(entry, old_entry)


def _head_width(config: dict) -> int | None:
    if _is_int(config.get("head_dim")):
        return config["head_dim"]
    hidden = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if _is_int(config.get(k))), None)
    heads = next((config[k] for k in ("num_attention_heads", "n_head") if _is_int(config.get(k))), None)
    return hidden // heads if hidden and heads else None


def _restore_ties(config: dict, default: dict) -> None:
    for follower, leader in TIED_SIZES:
        if _is_int(config.get(follower)) and _is_int(config.get(leader)):
            if default.get(follower) == default.get(leader):
                config[follower] = config[leader]
            elif follower.endswith("key_value_heads"):
                config[follower] = math.gcd(config[follower], config[leader])


def _scale_rope_sections(rope_parameters, factor: float) -> None:
    """Multimodal RoPE sections (``mrope_section``, in the parameters or per layer type) split the rotary
    frequencies of a head: they keep their proportions and sum to the narrower head's."""
    if not isinstance(rope_parameters, dict):
        return
    sections = rope_parameters.get("mrope_section")
    if isinstance(sections, list) and all(_is_int(v) for v in sections):
        total = max(len(sections), round(sum(sections) * factor))
        scaled = [v * total // sum(sections) for v in sections]
        scaled[0] += total - sum(scaled)
        rope_parameters["mrope_section"] = scaled
    for value in rope_parameters.values():
        _scale_rope_sections(value, factor)


def _restore_relations(config: dict, default: dict) -> None:
    """Relations between sizes that the defaults satisfy and independent shrinking may break."""
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if "head_dim" in config and config["head_dim"] is None and _is_int(heads) and _is_int(hidden):
        config["head_dim"] = hidden // heads
    if "num_key_value_heads" in config and config["num_key_value_heads"] is None and _is_int(heads):
        config["num_key_value_heads"] = heads
    _restore_ties(config, default)
    if "qk_head_dim" in config and _is_int(config.get("qk_nope_head_dim")) and _is_int(config.get("qk_rope_head_dim")):
        config["qk_head_dim"] = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    for key, value in config.items():
        # A split of the hidden width (e.g. axial position-embedding factors) keeps its proportions.
        old_hidden = default.get("hidden_size")
        if (isinstance(value, list) and len(value) > 1 and all(_is_int(v) for v in value) and _is_int(hidden)
                and _is_int(old_hidden) and sum(default[key]) == old_hidden != hidden):
            config[key] = [v * hidden // old_hidden for v in default[key]]
    old_head, new_head = _head_width(default), _head_width(config)
    if old_head and new_head:
        for key in ROTARY_WIDTH_KEYS:
            if _is_int(config.get(key)):
                config[key] = max(2, config[key] * new_head // old_head // 2 * 2)
        _scale_rope_sections(config.get("rope_parameters"), new_head / old_head)
    for expand, num_heads, head_width in SSM_HEAD_KEYS:
        if all(_is_int(config.get(key)) for key in (expand, num_heads, head_width)) and _is_int(hidden):
            inner = next((config[k] for k in SSM_INNER_KEYS if _is_int(config.get(k))), config[expand] * hidden)
            config[head_width] = inner // config[num_heads]
    experts = next((config[k] for k in EXPERT_COUNT_KEYS if _is_int(config.get(k))), None)
    for key in TOP_K_KEYS:
        if _is_int(config.get(key)) and config[key] >= 1:
            config[key] = min(EXPERTS_PER_TOKEN, experts or EXPERTS_PER_TOKEN)
    for group in EXPERT_GROUP_KEYS:
        if _is_int(config.get(group)) and experts:
            # At least two experts per group (group routing scores a group by its top two), half the groups kept.
            config[group] = max(1, min(config[group], experts // 2))
            if _is_int(config.get("topk_group")):
                config["topk_group"] = max(1, min(config["topk_group"], config[group] // 2))


def _remap_token_ids(config: dict, remapped: dict[int, int]) -> None:
    """Special token ids beyond the small vocabulary move to its reserved top: one new id per old id, in the
    config and all its sub-configs (so that e.g. the image token of the top config and the text config agree)."""
    def new_id(old):
        if not _is_int(old) or old < VOCAB - RESERVED_TOP_IDS:
            return old
        return remapped.setdefault(old, VOCAB - 1 - len(remapped))

    for key, value in config.items():
        if _is_sub_config(value):
            _remap_token_ids(value, remapped)
        elif key.endswith(TOKEN_ID_SUFFIXES):
            config[key] = [new_id(i) for i in value] if isinstance(value, list) else new_id(value)


def _shrink(default: dict, config_class: type | None) -> dict:
    derived = _derived_keys(config_class)
    config = {key: copy.deepcopy(value) for key, value in default.items() if key not in derived}
    for key, value in config.items():
        if _is_sub_config(value):
            shrunk = _shrink(value, _sub_config_class(config_class, key, value))
            # Some composite configs build their sub-configs from these dicts as keyword arguments.
            config[key] = {k: v for k, v in shrunk.items() if k not in _bookkeeping_keys()}
    _shrink_depth(config)
    # A config may store a size under its own name and map the common one to it (``attribute_map``).
    common_names = {own: common for common, own in getattr(config_class, "attribute_map", {}).items()}
    for key, value in config.items():
        common = common_names.get(key)
        config[key] = _small(common if key not in SMALL_SIZES and common in SMALL_SIZES else key, value)
    _restore_relations(config, default)
    _shrink_per_layer_overrides(config, default)
    return config


# ---------------------------------------------------------------------------------------------- public


def _config_class(model_type: str) -> type:
    return CONFIG_MAPPING[model_type]


@functools.cache
def _default_config_json(model_type: str) -> str:
    return json.dumps(_config_class(model_type)().to_dict())


def default_config_dict(model_type: str) -> dict:
    """The type's default config as a dict, with ``OVERRIDES`` applied."""
    return _with_overrides(json.loads(_default_config_json(model_type)), OVERRIDES)


def tiny_config(model_type: str, **overrides):
    """The type's default config with every size shrunk (see the module docstring)."""
    config_class = _config_class(model_type)
    shrunk = _with_overrides(_shrink(default_config_dict(model_type), config_class), TINY_OVERRIDES)
    _remap_token_ids(shrunk, {})
    return config_class.from_dict(_merge(shrunk, overrides))


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
    """The checkpoint reloaded from disk, as HF would serve it: the ground truth for parity. The class is found as
    tfbackend finds it: the causal-LM class of a multimodal type keeps only its text sub-config, whose config type no
    auto class maps."""
    hf_class = causal_lm_class(AutoConfig.from_pretrained(directory))
    return hf_class.from_pretrained(directory, dtype=torch.float32).eval()


def prompt_token_ids(lengths: Sequence[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB - RESERVED_TOP_IDS, (n,), generator=generator).tolist() for n in lengths]
