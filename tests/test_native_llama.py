"""The native Llama-family port against the Transformers fallback and HF generate, on tiny random checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tests.tiny_models import hf_greedy, make_config, random_prompts
from transformers import AutoConfig, AutoModelForCausalLM

from tfbackend import LLM, SamplingParams
from tfbackend.entrypoints.check import compare, run_greedy
from tfbackend.kv_cache import KVCacheSpec
from tfbackend.native.llama import LlamaForCausalLM
from tfbackend.native.weights import iterate_safetensors
from tfbackend.registry import load_model

CPU = torch.device("cpu")
MIXED_LENGTHS = [5, 12, 23]
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32, rope_theta=10000.0)

# name -> (model_type, config overrides, prompt lengths). EOS is disabled so every run decodes all tokens.
CASES: dict[str, tuple[str, dict, list[int]]] = {
    "llama": ("llama", {}, MIXED_LENGTHS),
    "llama-llama3-tied-bias": ("llama", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                             attention_bias=True, mlp_bias=True), MIXED_LENGTHS),
    "llama-yarn": ("llama", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                      original_max_position_embeddings=64)), MIXED_LENGTHS),
    "llama-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0)),
                     MIXED_LENGTHS),
    # Decoding runs past max_position_embeddings=16. The fallback rescales RoPE by the longest sequence of a
    # step, so its logits equal the native port's (and single-sequence HF's) only when prompts are aligned.
    "llama-dynamic": ("llama", dict(max_position_embeddings=16,
                                    rope_parameters=dict(rope_type="dynamic", factor=4.0, rope_theta=10000.0)),
                      [12, 12, 12]),
    "mistral-window": ("mistral", dict(sliding_window=8), MIXED_LENGTHS),
    "qwen2-window-tied": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                        tie_word_embeddings=True), MIXED_LENGTHS),
    "qwen3-qknorm": ("qwen3", dict(head_dim=32, attention_bias=True), MIXED_LENGTHS),
}


@dataclass
class Case:
    name: str
    path: Path
    hf_model: torch.nn.Module
    prompts: list[list[int]]


def save_checkpoint(model_type: str, directory: Path, **overrides) -> torch.nn.Module:
    """A random float32 checkpoint where every tensor, norms and biases included, is non-trivial."""
    config = make_config(model_type, eos_token_id=None, bos_token_id=None, pad_token_id=None, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm weights around 1 and random biases, so a misplaced norm or bias changes the logits.
            if "norm" in name:
                param.normal_(1.0, 0.2)
            else:
                param.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> Case:
    model_type, overrides, lengths = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_checkpoint(model_type, path, **overrides)
    return Case(request.param, path, hf_model, random_prompts(lengths))


def load(path: Path, model_impl: str):
    model, _ = load_model(path, AutoConfig.from_pretrained(path), model_impl, torch.float32, CPU)
    return model


def test_logits_match_fallback(case: Case):
    runs = []
    for impl in ("native", "transformers"):
        model = load(case.path, impl)
        runs.append(run_greedy(model, case.prompts, max_tokens=8, dtype=torch.float32, device=CPU, block_size=4))
    result = compare(runs[0], runs[1], atol=1e-4)
    assert result.prefill_max_diff <= 1e-4 and result.decode_max_diff <= 1e-4, result
    assert result.first_divergence == [None] * len(case.prompts)


def test_greedy_matches_hf_generate_through_llm(case: Case):
    """Mixed batch, chunked prefill (8 tokens a step), 4-token blocks and a KV budget that forces preemption."""
    if case.name == "llama-dynamic":
        pytest.skip("the engine caps max_model_len at max_position_embeddings, below which dynamic NTK is plain "
                    "RoPE; test_dynamic_rope_past_max_positions_matches_hf covers what lies beyond")
    spec = KVCacheSpec(tuple(load(case.path, "native").attention_layers()), torch.float32, block_size=4)
    llm = LLM(model=str(case.path), dtype="float32", device="cpu", block_size=4, max_model_len=64,
              max_num_batched_tokens=8, max_num_seqs=4, kv_cache_memory=24 * spec.bytes_per_block, seed=0)
    assert llm.model_impl == "native", llm.model_impl_reason
    prompts = [{"prompt_token_ids": prompt} for prompt in case.prompts]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    assert llm.engine.stats().num_preemptions > 0
    assert [out.outputs[0].token_ids for out in outputs] == hf_greedy(case.hf_model, case.prompts, 32)


def test_dynamic_rope_past_max_positions_matches_hf(tmp_path: Path):
    """HF rescales dynamic NTK RoPE per decode step; the native port's per-position cache does the same."""
    model_type, overrides, _ = CASES["llama-dynamic"]
    save_checkpoint(model_type, tmp_path, **overrides)
    prompts = random_prompts([5, 16, 11])  # every prompt within max_position_embeddings=16, decoding past it
    model = load(tmp_path, "native")
    run = run_greedy(model, prompts, max_tokens=32, dtype=torch.float32, device=CPU, block_size=4)
    # HF's rotary module keeps its grown frequencies across generate calls (a prompt of exactly
    # max_position_embeddings does not reset them), so each prompt gets a fresh HF model.
    expected = [hf_greedy(AutoModelForCausalLM.from_pretrained(tmp_path), [prompt], 32)[0] for prompt in prompts]
    assert run.tokens.tolist() == expected


def test_sharded_checkpoint_loads(tmp_path: Path):
    hf_model = save_checkpoint("qwen2", tmp_path / "full")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    full = load(tmp_path / "full", "native")
    sharded = load(tmp_path / "sharded", "native")
    for (name, a), b in zip(full.state_dict().items(), sharded.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_weights_reports_missing_and_unexpected(tmp_path: Path):
    save_checkpoint("llama", tmp_path)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(tmp_path))
    weights = dict(iterate_safetensors(tmp_path))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored, as HF does
    del weights["model.layers.1.self_attn.k_proj.weight"]
    weights["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        model.load_weights(weights.items())
    message = str(error.value)
    assert "missing ['model.layers.1.self_attn.k_proj.weight']" in message
    assert "unexpected ['model.layers.0.self_attn.qkv_proj.weight']" in message

    weights = dict(iterate_safetensors(tmp_path))
    weights["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\)"):
        model.load_weights(weights.items())


def test_tied_checkpoint_with_stored_lm_head_loads(tmp_path: Path):
    save_checkpoint("llama", tmp_path, tie_word_embeddings=True)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(tmp_path))
    weights = dict(iterate_safetensors(tmp_path))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    model.load_weights(weights.items())
    assert model.lm_head is None
