"""Tensor and pipeline parallelism on CPU (gloo, one process per rank) generate what one process generates.

Greedy float32 decoding of tiny random checkpoints, a batch of prompts in 4-token blocks with chunked prefill:
the tokens must equal those of a single-process engine and of HF ``generate`` (which a single-process engine
matches, see test_fallback_parity.py and test_native_llama.py), and each rank's KV cache must hold only its
own heads (or, replicated, the one KV head its query heads read) and its own stage's layers.
"""

from __future__ import annotations

import pytest
from tests.parallel_runs import (
    NEW_TOKENS,
    compiled_forward_difference,
    generate,
    prompts_below,
    saved_forward_difference,
)
from tests.tiny_models import hf_greedy, make_checkpoint

from tfbackend.distributed.launch import run_spmd
from tfbackend.distributed.rendezvous import Rendezvous, free_port

# name -> (model_type, checkpoint overrides, expected KV heads per rank at TP=2)
NATIVE = {
    "llama": ("llama", {}, 1),  # 2 KV heads: one each
    # One KV head for two ranks: replicated. A vocabulary that two ranks cannot split evenly: padded.
    "qwen3-replicated-kv": ("qwen3", dict(num_key_value_heads=1, vocab_size=251), 1),
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_tensor_parallel_matches_one_process(name, tmp_path):
    model_type, overrides, kv_heads = NATIVE[name]
    hf_model = make_checkpoint(model_type, tmp_path, **overrides)
    prompts = prompts_below(overrides.get("vocab_size", 256))
    one, _ = generate(tmp_path, prompts, model_impl="native")
    two, specs = generate(tmp_path, prompts, run_ahead=True, model_impl="native", tensor_parallel_size=2)
    assert two == one == hf_greedy(hf_model, prompts, NEW_TOKENS)
    assert [[layer.num_kv_heads for layer in spec.layers] for spec in specs] == [[kv_heads] * 2] * 2


# name -> (model_type, checkpoint overrides, expected KV heads per rank at TP=2)
FALLBACK = {
    # Softcaps, sliding windows shorter than the prompts; untied, since Gemma's scaled embeddings would make a
    # tied head echo the last token (the vocabulary split of a tied head runs in gpt2).
    "gemma2": ("gemma2", dict(tie_word_embeddings=False), 1),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    decoder_sparse_step=1), 1),  # experts split by the plan's packed styles
    "gpt2": ("gpt2", {}, 2),  # no plan: inferred from GPT-2's fused c_attn (4 heads, no grouped KV)
    "opt": ("opt", {}, 2),  # no plan: q/k/v/out_proj inferred, and OPT's view by num_heads follows
}


@pytest.mark.parametrize("name", sorted(FALLBACK))
def test_fallback_tensor_parallel_matches_hf(name, tmp_path):
    model_type, overrides, kv_heads = FALLBACK[name]
    hf_model = make_checkpoint(model_type, tmp_path, **overrides)
    prompts = prompts_below(256)
    tokens, specs = generate(tmp_path, prompts, model_impl="transformers", tensor_parallel_size=2)
    assert tokens == hf_greedy(hf_model, prompts, NEW_TOKENS)
    assert any(len(set(t)) > 1 for t in tokens), "every prompt repeats one token: a weak test"
    assert all(layer.num_kv_heads == kv_heads for spec in specs for layer in spec.layers)


@pytest.mark.parametrize("model_impl", ["native", "transformers"])
def test_pipeline_stages_match_hf(model_impl, tmp_path):
    # Tied embeddings: the native last stage reads the embedding into its own LM head.
    hf_model = make_checkpoint("llama", tmp_path, num_hidden_layers=3, tie_word_embeddings=True)
    prompts = prompts_below(256)
    tokens, specs = generate(tmp_path, prompts, model_impl=model_impl, pipeline_parallel_size=2)
    assert tokens == hf_greedy(hf_model, prompts, NEW_TOKENS)
    assert [len(spec.layers) for spec in specs] == [1, 2]  # 3 layers: stage 1 takes the remainder


def test_tensor_parallel_within_pipeline_stages(tmp_path):
    hf_model = make_checkpoint("mixtral", tmp_path, num_hidden_layers=2)
    prompts = prompts_below(256)
    tokens, specs = generate(tmp_path, prompts, run_ahead=True, model_impl="transformers", tensor_parallel_size=2,
                             pipeline_parallel_size=2)
    assert tokens == hf_greedy(hf_model, prompts, NEW_TOKENS)
    assert [[layer.num_kv_heads for layer in spec.layers] for spec in specs] == [[1]] * 4


def test_check_compares_implementations_under_tensor_parallelism(tmp_path, capsys):
    from tfbackend.entrypoints.cli import main

    make_checkpoint("llama", tmp_path)
    assert main(["check", str(tmp_path), "-tp", "2", "--max-tokens", "4"]) == 0
    assert "verdict: MATCH" in capsys.readouterr().out



@pytest.mark.parametrize("model_type, model_impl", [("llama", "native"), ("mixtral", "transformers")])
def test_tensor_parallel_model_compiles_as_one_graph(model_type, model_impl, tmp_path, monkeypatch):
    """What CUDA graphs capture on a GPU is the compiled forward: with its all-reduces (and, for the MoE, the
    experts' output hook) it must trace as one graph and compute what the eager model computes."""
    make_checkpoint(model_type, tmp_path)
    rendezvous = Rendezvous("127.0.0.1", free_port(), 2, 1, 1, "cpu")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the ranks compile afresh
    assert run_spmd(compiled_forward_difference, (tmp_path, model_impl), rendezvous) < 1e-4


def test_tensor_parallel_compiled_forward_saves_and_loads_per_rank(tmp_path, monkeypatch):
    """Each rank saves its share's compiled forward (its all-reduces inside) and a second start loads it."""
    make_checkpoint("llama", tmp_path)
    rendezvous = Rendezvous("127.0.0.1", free_port(), 2, 1, 1, "cpu")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert run_spmd(saved_forward_difference, (tmp_path, "native"), rendezvous) < 1e-4
