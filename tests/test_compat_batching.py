"""How the compat tier batches: prompts that arrive together prefill in left-padded groups (where the load-time
batching check showed padding changes nothing), and attention caches grow in place instead of being copied
every step. Tokens stay identical to HF ``generate`` run on each prompt alone (greedy, float32).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicLayer

from tests.coverage import load_reference
from tests.model_zoo import prompt_token_ids
from tests.tiny_models import hf_greedy
from tfbackend import LLM, SamplingParams
from tfbackend.compat.growing_cache import GrowingLayer
from tfbackend.compat.model import equal_length_groups, padded_prefill_groups


@pytest.fixture(scope="module")
def checkpoint(tiny_decoder_checkpoints):
    return tiny_decoder_checkpoints


def record_forwards(llm: LLM) -> list[tuple[int, int]]:
    """The shape (rows, tokens per row) of every forward of the HF model from now on."""
    shapes: list[tuple[int, int]] = []
    llm.engine.model.hf_model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes


def first_step_then_rest(llm: LLM, prompts: list[list[int]], max_tokens: int):
    """Add every prompt, run the engine to the end; the shapes of the first step's forwards, and the tokens."""
    shapes = record_forwards(llm)
    for index, prompt in enumerate(prompts):
        llm.engine.add_request(str(index), prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    tokens, first_step = {}, None
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            if output.finished:
                tokens[int(output.request_id)] = output.outputs[0].token_ids
        if first_step is None:
            first_step = list(shapes)
    return first_step, [tokens[i] for i in range(len(prompts))]


def test_padded_groups_take_the_longest_prompts_first_within_the_token_limit():
    lengths = {10: 5, 11: 30, 12: 7, 13: 29, 14: 6, 15: 80}
    groups = padded_prefill_groups(lengths, token_limit=64)
    assert groups == [[15], [11, 13], [12, 14, 10]]
    for group in groups[1:]:
        assert len(group) * max(lengths[s] for s in group) <= 64
    assert padded_prefill_groups(lengths, token_limit=1000) == [[15, 11, 13, 12, 14, 10]]


def test_equal_length_groups_need_no_padding():
    assert equal_length_groups({1: 4, 2: 9, 3: 4, 4: 9, 5: 2}) == [[1, 3], [2, 4], [5]]


def test_prompts_of_different_lengths_arriving_together_share_padded_forwards(checkpoint):
    """Longest first, each forward at most as many tokens, padding included, as the step carries (46 here)."""
    directory = checkpoint("bloom")
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=8)
    assert llm.model_impl == "compat" and llm.engine.model.padded_prefill
    prompts = prompt_token_ids([3, 14, 20, 9], seed=11)
    forwards, tokens = first_step_then_rest(llm, prompts, max_tokens=10)
    assert forwards == [(2, 20), (2, 9)]
    assert tokens == hf_greedy(load_reference(directory), prompts, 10)


@pytest.mark.parametrize("model_type", ["mamba2", "falcon_h1"])
def test_padded_prefill_of_state_space_and_hybrid_models(model_type: str, checkpoint):
    """Their conv and SSM states must not see the padding: the batching check proved it, the tokens show it."""
    directory = checkpoint(model_type)
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=8)
    if llm.model_impl != "compat":
        pytest.skip(f"{model_type} runs on the {llm.model_impl} tier with this transformers")
    if not llm.engine.model.padded_prefill:
        pytest.skip(f"{model_type}'s padded prefill differs from its unpadded one with this transformers")
    prompts = prompt_token_ids([21, 3, 14, 19], seed=12)
    forwards, tokens = first_step_then_rest(llm, prompts, max_tokens=9)
    assert forwards == [(2, 21), (2, 14)]
    assert tokens == hf_greedy(load_reference(directory), prompts, 9)


def test_without_padded_prefill_only_prompts_of_equal_length_share_a_forward(checkpoint):
    """The path of a model whose padded prefill failed the batching check (its batched decode passed)."""
    directory = checkpoint("bloom")
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=8)
    llm.engine.model.padded_prefill = False
    prompts = prompt_token_ids([6, 11, 6, 11, 4], seed=13)
    forwards, tokens = first_step_then_rest(llm, prompts, max_tokens=8)
    assert sorted(forwards) == [(1, 4), (2, 6), (2, 11)]
    assert tokens == hf_greedy(load_reference(directory), prompts, 8)


def test_a_model_failing_the_batching_check_prefills_and_decodes_each_sequence_alone(checkpoint):
    """RWKV's batched state update mixes rows: the load-time check finds it, so nothing is padded or batched."""
    directory = checkpoint("rwkv")
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=8)
    if llm.model_impl != "compat":
        pytest.skip(f"rwkv runs on the {llm.model_impl} tier with this transformers")
    model = llm.engine.model
    if model.batched:
        pytest.skip("rwkv's batched forward is row-independent with this transformers")
    assert not model.padded_prefill
    prompts = prompt_token_ids([5, 5, 13], seed=14)
    forwards, tokens = first_step_then_rest(llm, prompts, max_tokens=6)
    assert sorted(forwards) == [(1, 5), (1, 5), (1, 13)]
    assert tokens == hf_greedy(load_reference(directory), prompts, 6)


def test_a_growing_layer_holds_what_a_dynamic_layer_holds_without_copying_each_step():
    torch.manual_seed(0)
    growing, dynamic = GrowingLayer(), DynamicLayer()
    prompt_keys, prompt_values = torch.randn(3, 2, 7, 4), torch.randn(3, 2, 7, 4)
    for layer in (growing, dynamic):
        layer.update(prompt_keys, prompt_values)
    storages = set()
    for _ in range(20):
        keys, values = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        for layer in (growing, dynamic):
            layer.update(keys, values)
        storages.add(growing.keys.untyped_storage().data_ptr())
        assert torch.equal(growing.keys, dynamic.keys) and torch.equal(growing.values, dynamic.values)
    assert len(storages) == 1, "after the first decode step, steps write into the room a buffer has"
    growing.keys = growing.keys.index_select(0, torch.tensor([2, 0]))  # row surgery makes a new tensor
    growing.values = growing.values.index_select(0, torch.tensor([2, 0]))
    dynamic.keys, dynamic.values = dynamic.keys[[2, 0]], dynamic.values[[2, 0]]
    keys, values = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert all(torch.equal(g, d) for g, d in zip(growing.update(keys, values), dynamic.update(keys, values)))


def test_a_trimmed_view_is_not_written_past():
    """Dropping leading padding leaves a view into the old buffer: the next step must copy, not overwrite."""
    layer = GrowingLayer()
    layer.update(torch.randn(2, 1, 5, 3), torch.randn(2, 1, 5, 3))
    layer.update(torch.randn(2, 1, 1, 3), torch.randn(2, 1, 1, 3))
    before = layer.keys.clone()
    layer.keys, layer.values = layer.keys.narrow(2, 2, 4), layer.values.narrow(2, 2, 4)
    new = torch.randn(2, 1, 1, 3)
    keys, _ = layer.update(new, new)
    assert torch.equal(keys, torch.cat([before[:, :, 2:], new], dim=2))
