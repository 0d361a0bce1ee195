"""The hardware floor counts what a step must do: every weight of a dense model, only the reachable experts of a
mixture of experts (which ``bench`` rows would otherwise show above 100% of the floor)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from tfbackend.bench.floor import Hardware, ModelCost

HIDDEN, VOCAB, EXPERTS, PER_TOKEN = 8, 16, 4, 2
HW = Hardware("test", bandwidth=1e9, matmul_rate=1e12)


def _checkpoint(tmp_path, names_and_shapes):
    save_file({name: torch.zeros(shape) for name, shape in names_and_shapes}, str(tmp_path / "model.safetensors"))
    return tmp_path


def _moe_tensors(stacked: bool):
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN)),
             ("model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
             ("model.layers.0.mlp.gate.weight", (EXPERTS, HIDDEN)),
             ("model.layers.0.mlp.shared_experts.up_proj.weight", (HIDDEN, HIDDEN))]
    if stacked:
        return names + [("model.layers.0.mlp.experts.gate_up_proj", (EXPERTS, 2 * HIDDEN, HIDDEN)),
                        ("model.layers.0.mlp.experts.down_proj", (EXPERTS, HIDDEN, HIDDEN))]
    return names + [(f"model.layers.0.mlp.experts.{e}.{proj}.weight", (HIDDEN, HIDDEN))
                    for e in range(EXPERTS) for proj in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
def test_a_token_multiplies_only_its_experts_and_a_step_reads_only_those_it_can_reach(tmp_path, stacked):
    config = AutoConfig.for_model("olmoe", hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=2,
                                  vocab_size=VOCAB, num_experts=EXPERTS,
                                  num_experts_per_tok=PER_TOKEN, tie_word_embeddings=False)
    cost = ModelCost.from_checkpoint(_checkpoint(tmp_path, _moe_tensors(stacked)), config, [], weight_bytes=1000)
    expert_params = EXPERTS * 3 * HIDDEN * HIDDEN
    dense_params = HIDDEN * HIDDEN + EXPERTS * HIDDEN + HIDDEN * HIDDEN  # q, router, shared expert
    assert cost.token_params == dense_params + expert_params * PER_TOKEN // EXPERTS
    share = expert_params / (expert_params + dense_params + 2 * VOCAB * HIDDEN)
    # One token reaches PER_TOKEN of the experts; many tokens reach (nearly) all of them.
    assert cost.weight_bytes_read(1) == pytest.approx(1000 * (1 - share * (1 - PER_TOKEN / EXPERTS)))
    assert cost.weight_bytes_read(256) == pytest.approx(1000)
    assert cost.phase_seconds(HW, 1, 1, 0, 0, 0, 0) < cost.phase_seconds(HW, 1, 256, 0, 0, 0, 0)


def test_a_dense_model_reads_every_weight_every_step(tmp_path):
    config = AutoConfig.for_model("llama", hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=2,
                                  vocab_size=VOCAB, tie_word_embeddings=False)
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN)),
               ("model.layers.0.mlp.up_proj.weight", (4 * HIDDEN, HIDDEN))]
    cost = ModelCost.from_checkpoint(_checkpoint(tmp_path, tensors), config, [], weight_bytes=1000)
    assert cost.token_params == 4 * HIDDEN * HIDDEN
    assert cost.weight_bytes_read(1) == cost.weight_bytes_read(256) == 1000
