"""The model zoo shrinks any default config to a tiny model that keeps what makes its family different.

Facts about each family (its layer patterns, its MLA widths, its experts) are read from the installed
transformers' default configs, never hard-coded, so these tests hold for any transformers 5.x.
"""

from __future__ import annotations

import pytest
import torch

from tests.model_zoo import (
    TOKEN_ID_SUFFIXES,
    VOCAB,
    _kept_layers,
    build_tiny_model,
    causal_lm_types,
    default_config_dict,
    load_reference,
    prompt_token_ids,
    save_tiny_checkpoint,
    tiny_config,
)

PROMPT_LENGTH = 30
MAX_PARAMETERS = 2_000_000


def _types_present(*model_types: str) -> list[str]:
    return [model_type for model_type in model_types if model_type in causal_lm_types()]


# Dense, MLA + MoE, hybrid linear attention, KV-sharing, multimodal composite, state space.
REPRESENTATIVE_TYPES = _types_present("llama", "deepseek_v3", "qwen3_next", "gemma3n_text", "gemma3", "mamba2")


@pytest.mark.parametrize("model_type", REPRESENTATIVE_TYPES)
def test_representative_types_build_tiny_and_generate(model_type):
    model = build_tiny_model(model_type)
    assert sum(param.numel() for param in model.parameters()) < MAX_PARAMETERS
    ids = torch.tensor(prompt_token_ids([PROMPT_LENGTH]))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, PROMPT_LENGTH + 3)
    assert int(out.max()) < VOCAB


@pytest.mark.parametrize("model_type", _types_present("llama", "mllama"))
def test_saved_checkpoint_reloads_to_the_same_greedy_output(model_type, tmp_path):
    """mllama's causal-LM class saves only its text sub-config, whose config type no auto class maps."""
    ids = torch.tensor(prompt_token_ids([PROMPT_LENGTH]))
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 3, "do_sample": False}
    save_tiny_checkpoint(model_type, tmp_path)
    expected = build_tiny_model(model_type).generate(ids, **kwargs)
    assert torch.equal(load_reference(tmp_path).generate(ids, **kwargs), expected)


def _per_layer_patterns(config: dict) -> dict[str, list]:
    """Lists with one entry per layer that repeat entries (layer types, MLP types, NoPE flags ...)."""
    num_layers = config.get("num_hidden_layers")
    return {
        key: value for key, value in config.items()
        if isinstance(value, list) and len(value) == num_layers and len({str(v) for v in value}) < num_layers
    }


@pytest.mark.parametrize("model_type", _types_present("gemma3_text", "qwen3_next", "llama4_text", "kimi_linear"))
def test_shrinking_keeps_each_distinct_entry_of_every_per_layer_pattern(model_type):
    default = default_config_dict(model_type)
    tiny = tiny_config(model_type).to_dict()
    patterns = _per_layer_patterns(default)
    assert patterns, f"{model_type} has no per-layer pattern to check"
    assert tiny["num_hidden_layers"] < default["num_hidden_layers"]
    for key, values in patterns.items():
        assert len(tiny[key]) == tiny["num_hidden_layers"]
        assert {str(v) for v in tiny[key]} == {str(v) for v in values}, key


def test_kv_sharing_keeps_every_layer_type_on_both_sides_of_the_shared_boundary():
    if "gemma3n_text" not in causal_lm_types():
        pytest.skip("no gemma3n in this transformers")
    default = default_config_dict("gemma3n_text")
    tiny = tiny_config("gemma3n_text")
    first_shared = tiny.num_hidden_layers - tiny.num_kv_shared_layers
    assert tiny.num_kv_shared_layers > 0
    assert set(tiny.layer_types[:first_shared]) == set(tiny.layer_types[first_shared:]) == set(default["layer_types"])


def test_mla_keeps_keys_wider_than_values_and_rope_head_dim_in_step():
    config = tiny_config("deepseek_v3")
    assert config.qk_nope_head_dim + config.qk_rope_head_dim != config.v_head_dim
    assert config.head_dim == config.qk_rope_head_dim
    assert config.num_key_value_heads == config.num_attention_heads


@pytest.mark.parametrize("model_type", _types_present("mixtral", "llama4_text"))
def test_moe_keeps_several_experts_and_routes_each_token_to_two(model_type):
    """Also where the family routes top-1 (Llama 4), so that every tiny MoE mixes experts."""
    config = tiny_config(model_type)
    assert config.num_local_experts >= 4
    assert config.num_experts_per_tok == 2


def test_windows_are_shorter_than_the_prompts():
    assert tiny_config("mistral").sliding_window < PROMPT_LENGTH
    assert tiny_config("gemma3_text").sliding_window < PROMPT_LENGTH


def test_layer_index_lists_follow_the_kept_layers():
    config = tiny_config("lfm2")
    assert config.full_attn_idxs == [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    assert set(config.layer_types) == {"conv", "full_attention"}


def _token_ids(config: dict) -> list[int]:
    ids = []
    for key, value in config.items():
        if isinstance(value, dict):
            ids += _token_ids(value)
        elif isinstance(key, str) and key.endswith(TOKEN_ID_SUFFIXES):
            ids += [i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)]
    return ids


@pytest.mark.parametrize("model_type", _types_present("qwen3_5", "gemma3", "phi4_multimodal"))
def test_special_token_ids_of_every_sub_config_fit_the_small_vocabulary(model_type):
    assert any(i >= VOCAB for i in _token_ids(default_config_dict(model_type)))
    ids = _token_ids(tiny_config(model_type).to_dict())
    assert ids and all(0 <= i < VOCAB for i in ids)


# ------------------------------------------------------------------------ depth selection on synthetic configs


def test_kept_layers_show_each_pattern_value_within_each_block():
    pattern = ["sliding", "sliding", "sliding", "full"] * 4
    config = {"num_hidden_layers": 16, "layer_types": pattern, "first_k_dense_replace": 2}
    kept = _kept_layers(config, 16)
    assert [pattern[i] for i in kept if i < 2] == ["sliding"]  # the dense block has only sliding layers
    assert {pattern[i] for i in kept if i >= 2} == {"sliding", "full"}


def test_kept_layers_keep_two_layers_of_a_shared_block_type():
    pattern = ["mamba", "mamba", "hybrid"] * 4
    kept = _kept_layers({"num_hidden_layers": 12, "layers_block_type": pattern}, 12)
    assert [pattern[i] for i in kept].count("hybrid") == 2


def test_kept_layers_cover_a_pattern_that_repeats_over_the_depth():
    kept = _kept_layers({"num_hidden_layers": 26, "block_types": ["recurrent", "recurrent", "attention"]}, 26)
    assert kept == [0, 1, 2]
