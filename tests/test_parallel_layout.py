"""How a model is split over ranks, decided without starting any process: head and layer splits, the HF
tensor-parallel plans (given or inferred) and the reasons a layout is refused, engine options that cannot work."""

from __future__ import annotations

import pytest
import torch.nn as nn
from tests.model_zoo import tiny_config
from tests.tiny_models import make_config

from tfbackend.adapter import TransformersForCausalLM
from tfbackend.config import EngineConfig
from tfbackend.distributed import CommGroup, ParallelContext, use_parallel
from tfbackend.distributed.hf_parallel import _tensor_parallel_plan
from tfbackend.distributed.layers import HeadSplit
from tfbackend.distributed.pipeline import stage_layers
from tfbackend.native.llama import LlamaForCausalLM


def ranks(tp: int = 1, pp: int = 1, tp_rank: int = 0, pp_rank: int = 0) -> ParallelContext:
    """A rank's context as models see it at load (no process groups needed to decide a layout)."""
    return ParallelContext(world_size=tp * pp, tp=CommGroup(rank=tp_rank, size=tp), pp_rank=pp_rank, pp_size=pp)


def test_heads_split_evenly_and_kv_heads_replicate_below_the_rank_count():
    assert [HeadSplit.of(8, 4, CommGroup(r, 2)) for r in range(2)] == [
        HeadSplit(8, 4, q_start=0, num_q=4, kv_start=0, num_kv=2),
        HeadSplit(8, 4, q_start=4, num_q=4, kv_start=2, num_kv=2),
    ]
    # One KV head per pair of ranks: each rank holds the head its query heads read.
    splits = [HeadSplit.of(8, 2, CommGroup(r, 4)) for r in range(4)]
    assert [(s.q_start, s.num_q, s.kv_start, s.num_kv) for s in splits] == [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1),
                                                                            (6, 2, 1, 1)]
    with pytest.raises(ValueError, match="6 attention heads cannot be split evenly over 4"):
        HeadSplit.of(6, 2, CommGroup(0, 4))
    with pytest.raises(ValueError, match="3 key/value heads can be neither split nor replicated evenly over 2"):
        HeadSplit.of(6, 3, CommGroup(0, 2))


def test_stages_split_layers_evenly_with_the_remainder_last():
    assert [stage_layers(10, stage, 3) for stage in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    assert [stage_layers(4, stage, 2) for stage in range(2)] == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError, match="2 decoder layers cannot be split into 3 pipeline stages"):
        stage_layers(2, 0, 3)


def test_native_llama_declares_only_its_own_kv_heads_and_layers():
    config = make_config("llama", num_key_value_heads=1, num_hidden_layers=3)
    with use_parallel(ranks(tp=2, pp=2, tp_rank=1, pp_rank=1)):
        model = LlamaForCausalLM(config)
    # Stage 1 of 2 holds layers 1 and 2 of 3; the single KV head is replicated, one per rank.
    assert [(layer.num_kv_heads, layer.head_dim) for layer in model.attention_layers()] == [(1, 16), (1, 16)]
    assert model.model.stage_layers == range(1, 3)
    assert model.model.layers[1].self_attn.qkv_proj.weight.shape == (32 + 16 + 16, 64)  # 2 of 4 query heads
    assert not hasattr(model.model, "embed_tokens") and model.lm_head is not None


@pytest.mark.parametrize("tp", [3])
def test_native_llama_refuses_heads_that_do_not_divide(tp):
    with use_parallel(ranks(tp=tp)):
        assert "4 attention heads cannot be split evenly over 3" in LlamaForCausalLM.supports(make_config("llama"))


def test_fallback_follows_the_models_plan():
    model = _empty_hf_model(make_config("mixtral"))
    plan = _tensor_parallel_plan(model)
    assert plan["model.layers.*.self_attn.q_proj"] == "colwise"
    assert plan["model.layers.*.mlp.experts"] == "moe_tp_experts"
    assert "lm_head" not in plan  # the vocabulary is split by its own rule


def test_fallback_infers_a_plan_from_standard_names():
    model = _empty_hf_model(make_config("gpt2"))  # GPT-2 declares no plan
    assert _tensor_parallel_plan(model) == {
        **{f"transformer.h.{i}.attn.c_attn": "fused_qkv" for i in range(2)},
        **{f"transformer.h.{i}.attn.c_proj": "rowwise" for i in range(2)},
        **{f"transformer.h.{i}.mlp.c_fc": "colwise" for i in range(2)},
        **{f"transformer.h.{i}.mlp.c_proj": "rowwise" for i in range(2)},
    }


def test_fallback_refuses_what_it_cannot_split():
    class Odd(nn.Module):  # no plan, no standard names
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no tensor-parallel plan .* and no standard projection names"):
        _tensor_parallel_plan(Odd())
    with use_parallel(ranks(tp=3)):
        assert "4 attention heads cannot be split evenly over 3" in TransformersForCausalLM.supports(make_config("llama"))
        # GPT-BigCode fuses q with one shared K and V head: not GPT-2's three equal parts.
        assert "not three projections" in TransformersForCausalLM.supports(tiny_config("gpt_bigcode"))
    with use_parallel(ranks(pp=2)):
        assert "no pipeline-parallel plan" in TransformersForCausalLM.supports(make_config("gpt2"))


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be positive"),
    (dict(tensor_parallel_size=3, nnodes=2, master_port=1234), "3 ranks cannot be spread evenly over 2 nodes"),
    (dict(tensor_parallel_size=2, nnodes=2), "several nodes need a --master-port"),
    (dict(tensor_parallel_size=2, nnodes=2, node_rank=2, master_port=1234), r"node_rank must be in \[0, 2\)"),
    (dict(tensor_parallel_size=2, device="cuda:1"), "names one GPU"),
])
def test_bad_parallel_options_fail_validation(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options).validate()


def _empty_hf_model(config) -> nn.Module:
    import torch
    from tfbackend.hf_classes import causal_lm_class

    with torch.device("meta"):
        return causal_lm_class(config)._from_config(config)
