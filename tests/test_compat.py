"""The compat tier: models outside the attention interface, hybrids and state-space models, continuously batched.

Each model generates exactly what HF ``generate`` generates for each prompt alone (greedy, float32), while
requests arrive at different steps and finish at different lengths, so rows join and leave the running batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.coverage import load_reference
from tests.model_zoo import prompt_token_ids, save_tiny_checkpoint
from tests.tiny_models import hf_greedy
from tfbackend import LLM, SamplingParams

# The families the compat issue names; a type the installed transformers lacks, or that has no tiny form HF
# itself can run, is skipped with the reason.
FAMILIES = (
    "bloom", "falcon", "mpt", "stablelm", "biogpt", "xglm", "codegen", "bart", "mamba", "mamba2", "jamba",
    "bamba", "granitemoehybrid", "falcon_h1", "qwen3_next", "qwen3_5", "recurrent_gemma", "rwkv",
)
# (arrival step, prompt length, max_tokens): staggered arrivals, different finishing steps.
REQUESTS = [(0, 5, 9), (0, 12, 4), (2, 7, 11), (3, 20, 6), (5, 3, 8)]


@pytest.fixture(scope="module")
def checkpoints(tiny_decoder_checkpoints):
    return tiny_decoder_checkpoints


def run_staggered(llm: LLM, prompts: list[list[int]]) -> dict[str, list[int]]:
    engine, tokens, step = llm.engine, {}, 0
    pending = list(enumerate(REQUESTS))
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            index, (_, _, max_tokens) = pending.pop(0)
            engine.add_request(str(index), prompts[index], SamplingParams(temperature=0, max_tokens=max_tokens))
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.outputs[0].token_ids
        step += 1
    return tokens


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rows_join_and_leave_with_hf_identical_tokens(model_type: str, checkpoints):
    directory = checkpoints(model_type)
    prompts = prompt_token_ids([length for _, length, _ in REQUESTS], seed=3)
    reference = load_reference(directory)
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=8)
    if llm.model_impl != "compat":
        pytest.skip(f"{model_type} runs on the {llm.model_impl} tier with this transformers: {llm.model_impl_reason}")
    tokens = run_staggered(llm, prompts)
    for index, (_, _, max_tokens) in enumerate(REQUESTS):
        assert tokens[str(index)] == hf_greedy(reference, [prompts[index]], max_tokens)[0], f"request {index}"
    assert not llm.engine.model.groups, "every finished sequence left the running batch"


def test_compat_reason_says_what_is_off(checkpoints):
    llm = LLM(str(checkpoints("bloom")), dtype="float32", device="cpu", max_model_len=64)
    assert llm.model_impl == "compat"
    assert "AttentionInterface" in llm.model_impl_reason
    assert "no prefix caching or chunked prefill" in llm.model_impl_reason
    assert llm.engine.startup.seconds["warm up"] == 0  # no synthetic steps for a tier that keeps per-sequence state


def test_the_memory_budget_limits_concurrent_sequences(checkpoints):
    """Sequences beyond what the budget holds wait their turn instead of running out of memory."""
    directory = checkpoints("bloom")
    probe = LLM(str(directory), dtype="float32", device="cpu", max_model_len=64)
    per_sequence = probe.engine.model.sequence_state().sequence_bytes(64)
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=64, kv_cache_memory=2 * per_sequence)
    assert llm.engine.scheduler.max_num_seqs == 2
    prompts = prompt_token_ids([4, 6, 8, 5], seed=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=5))
    reference = load_reference(directory)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(reference, prompts, 5)


def test_a_budget_below_one_sequence_is_a_clear_error(checkpoints):
    with pytest.raises(ValueError, match="one sequence of max_model_len=64 needs"):
        LLM(str(checkpoints("bloom")), dtype="float32", device="cpu", max_model_len=64, kv_cache_memory=1024)


def test_compat_can_be_forced_for_an_interface_model(tmp_path: Path):
    save_tiny_checkpoint("llama", tmp_path)
    prompts = prompt_token_ids([6, 9])
    llm = LLM(str(tmp_path), model_impl="compat", dtype="float32", device="cpu", max_model_len=64)
    assert llm.model_impl == "compat" and "forces the compat tier" in llm.model_impl_reason
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=7))
    with torch.inference_mode():
        expected = hf_greedy(load_reference(tmp_path), prompts, 7)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_models_whose_caches_hf_does_not_mask_run_each_sequence_alone(tmp_path: Path):
    """An indexer picking top-k keys among padding, say: derived from transformers' own cache classes."""
    from transformers import AutoConfig

    from tests.model_zoo import causal_lm_types
    from tfbackend.hf_classes import padding_unsafe_layer_types

    for model_type in causal_lm_types():
        try:
            if not padding_unsafe_layer_types(AutoConfig.for_model(model_type)):
                continue
            save_tiny_checkpoint(model_type, tmp_path / model_type)
            reference = load_reference(tmp_path / model_type)
            hf_greedy(reference, [[5, 6, 7]], 2)
        except Exception:  # no tiny form of this type; try the next
            continue
        break
    else:
        pytest.skip("no buildable causal-LM type of this transformers has cache layers HF leaves unmasked")
    llm = LLM(str(tmp_path / model_type), model_impl="compat", dtype="float32", device="cpu", max_model_len=64)
    assert not llm.engine.model.batched
    prompts = prompt_token_ids([4, 9, 6], seed=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=10))
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(reference, prompts, 10)


def test_a_model_keeping_state_on_its_modules_runs_one_sequence_at_a_time(checkpoints):
    """RecurrentGemma's blocks keep their recurrent and conv states as module attributes, outside any cache
    object: sequences in separate forwards would overwrite each other's, so only one may run at a time."""
    directory = checkpoints("recurrent_gemma")
    llm = LLM(str(directory), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=8)
    if llm.model_impl != "compat":
        pytest.skip(f"recurrent_gemma runs on the {llm.model_impl} tier with this transformers")
    assert llm.engine.model.sequence_state().max_sequences == 1
    assert llm.engine.scheduler.max_num_seqs == 1
    prompts = prompt_token_ids([5, 17, 30], seed=0)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    reference = load_reference(directory)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(reference, prompts, 12)


def test_declared_sequence_memory_covers_caches_that_grow_in_place(checkpoints):
    """Admission counts what a sequence really holds, the room its growing caches keep for more tokens included."""
    from tfbackend.compat.state import walk

    llm = LLM(str(checkpoints("bloom")), dtype="float32", device="cpu", max_model_len=64)
    engine = llm.engine
    engine.add_request("long", prompt_token_ids([5], seed=7)[0], SamplingParams(temperature=0, max_tokens=50,
                                                                                ignore_eos=True))
    held = 0
    while engine.has_unfinished_requests():
        engine.step()
        for group in engine.model.groups:
            storages = {id(v.untyped_storage()): v.untyped_storage().nbytes()
                        for _, v in walk(group.state) if isinstance(v, torch.Tensor)}
            held = max(held, sum(storages.values()))
    assert 0 < held <= engine.model.sequence_state().sequence_bytes(5 + 50)
