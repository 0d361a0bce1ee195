"""The Transformers fallback through our paged KV cache generates exactly what HF `generate` generates.

Greedy decoding in float32 on tiny random checkpoints of many families, with several prompts of different
lengths in one batch, blocks of 4 tokens (sequences cross many blocks) and a token budget that splits
prompts into chunks. Each family exercises something HF passes to attention: sliding windows, softcaps,
sinks, q/k norms, qkv bias, partial rotary, learned positions, MoE.
"""

from __future__ import annotations

import pytest

from tests.tiny_models import FAMILIES, hf_greedy, make_checkpoint, random_prompts
from tfbackend import LLM, SamplingParams

PROMPT_LENGTHS = [5, 13, 30, 2]
NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)


def run_engine(model_dir, prompts, **engine_kwargs):
    kwargs = dict(
        model_impl="transformers", dtype="float32", device="cpu", block_size=4,
        max_num_batched_tokens=24, max_model_len=128,
    )
    kwargs.update(engine_kwargs)
    llm = LLM(str(model_dir), **kwargs)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return llm, [out.outputs[0].token_ids for out in outputs]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_greedy_matches_hf_generate(model_type, tmp_path):
    hf_model = make_checkpoint(model_type, tmp_path)
    prompts = random_prompts(PROMPT_LENGTHS)
    llm, tokens = run_engine(tmp_path, prompts)
    assert llm.model_impl == "transformers"
    assert tokens == hf_greedy(hf_model, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return directory, make_checkpoint("llama", directory)


def kv_bytes_for_tokens(num_tokens: int) -> int:
    # tiny llama: 2 layers x 2 KV heads x head_dim 16 x (K + V) x 4 bytes
    return num_tokens * 2 * 2 * 16 * 2 * 4


def test_same_tokens_when_preemption_is_forced(llama):
    model_dir, hf_model = llama
    prompts = random_prompts(PROMPT_LENGTHS)
    # 40 blocks of 4 tokens: less than the 4 sequences need together (~110 tokens + growth).
    llm, tokens = run_engine(model_dir, prompts, kv_cache_memory=kv_bytes_for_tokens(160))
    assert llm.engine.stats().num_preemptions > 0
    assert tokens == hf_greedy(hf_model, prompts, NEW_TOKENS)
    assert llm.engine.stats().num_kv_blocks_used == 0


def test_shared_prefix_hits_the_cache_and_keeps_tokens(llama):
    model_dir, hf_model = llama
    shared = random_prompts([24], seed=7)[0]
    tails = random_prompts([3, 6, 1], seed=8)
    prompts = [shared + tail for tail in tails]
    llm, _ = run_engine(model_dir, prompts[:1])
    # The first request has finished, so its full blocks are cached; the next ones reuse them.
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], GREEDY)
    assert [out.num_cached_tokens for out in outputs] == [24, 24]
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 48
    assert [out.outputs[0].token_ids for out in outputs] == hf_greedy(hf_model, prompts[1:], NEW_TOKENS)


def test_prefix_cache_disabled_computes_everything(llama):
    model_dir, _ = llama
    prompt = random_prompts([24], seed=7)[0]
    llm, _ = run_engine(model_dir, [prompt, prompt], enable_prefix_caching=False)
    assert llm.engine.stats().prefix_cache_hits == 0


def test_abort_frees_every_block(llama):
    model_dir, _ = llama
    llm = LLM(str(model_dir), model_impl="transformers", dtype="float32", device="cpu", block_size=4, max_model_len=128)
    engine = llm.engine
    for i, prompt in enumerate(random_prompts([9, 17, 4])):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.stats().num_kv_blocks_used > 0
    engine.abort_request("1")
    while engine.has_unfinished_requests():
        finished = [out for out in engine.step() if out.finished]
        assert all(out.request_id != "1" for out in finished)
    assert engine.stats().num_kv_blocks_used == 0
