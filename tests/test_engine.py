"""LLMEngine end to end on a tiny random Llama checkpoint (CPU, float32, Transformers fallback).

The checkpoint ships no tokenizer, so prompts are token ids and outputs carry no text. A second copy of the
checkpoint declares the first greedy token of PROMPT its EOS, to test EOS and min_tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tests.tiny_models import make_checkpoint, random_prompts

from tfbackend.config import EngineConfig
from tfbackend.engine.llm_engine import LLMEngine
from tfbackend.outputs import RequestOutput
from tfbackend.sampling_params import SamplingParams

PROMPT = [5, 6, 7, 8, 9]
BLOCK_SIZE = 4
MAX_MODEL_LEN = 64
BYTES_PER_BLOCK = BLOCK_SIZE * 2 * (16 + 16) * 4 * 2  # tokens * kv heads * (k + v head dims) * fp32 * layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint("llama", path)
    return path


@pytest.fixture(scope="module")
def greedy_reference(checkpoint) -> list[int]:
    engine = make_engine(checkpoint)
    out = run(engine, {"r": (PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))})
    return out["r"].outputs[0].token_ids


@pytest.fixture(scope="module")
def eos_checkpoint(checkpoint, greedy_reference, tmp_path_factory) -> Path:
    """The same weights, with the first greedy token of PROMPT declared as EOS."""
    path = tmp_path_factory.mktemp("tiny-llama-eos")
    for item in checkpoint.iterdir():
        shutil.copy(item, path / item.name)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((path / name).read_text())
        data["eos_token_id"] = greedy_reference[0]
        (path / name).write_text(json.dumps(data))
    return path


def make_engine(path: Path, num_blocks: int = 64, **overrides) -> LLMEngine:
    config = dict(
        model=str(path),
        model_impl="transformers",
        device="cpu",
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory=num_blocks * BYTES_PER_BLOCK,
    )
    config.update(overrides)
    engine = LLMEngine(EngineConfig(**config))
    assert engine.block_manager.num_blocks == num_blocks
    return engine


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params, stream=False)
    finished = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            assert output.finished and output.request_id not in finished
            finished[output.request_id] = output
    assert set(finished) == set(requests)
    assert engine.stats().num_kv_blocks_used == 0
    return finished


def test_abort_mid_generation_frees_blocks_and_others_finish(checkpoint) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    prompts = random_prompts([10, 7, 12, 9], seed=3)
    solo = [run(make_engine(checkpoint), {"x": (p, greedy)})["x"].outputs[0].token_ids for p in prompts]

    # 3 sequences of ~30 tokens fill the 24 blocks; 8 tokens a step split the prompts into chunks.
    engine = make_engine(checkpoint, num_blocks=24, max_num_seqs=3, max_num_batched_tokens=8)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy, stream=True)
    engine.step()  # r0: 8 of 10 prompt tokens
    engine.step()  # r0: the last 2, and its first token; r1: 6 of 7 prompt tokens
    r1 = engine.requests["r1"].seqs[0]
    assert 0 < r1.num_computed_tokens < r1.num_prompt_tokens and r1.block_table
    for _ in range(4):
        engine.step()
    assert engine.stats().num_running == 3 and engine.stats().num_waiting == 1
    assert r1.num_output_tokens > 0
    engine.abort_request("r1")  # running, mid-generation
    engine.abort_request("r3")  # still waiting
    engine.abort_request("r3")  # twice: ignored
    engine.abort_request("never-added")
    assert r1.finish_reason == "abort" and r1.block_table == []
    assert engine.stats().num_running == 2 and engine.stats().num_waiting == 0
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id in ("r0", "r2")  # nothing more is reported for aborted requests
            if output.finished:
                finished[output.request_id] = output.outputs[0]
    assert {rid: out.token_ids for rid, out in finished.items()} == {"r0": solo[0], "r2": solo[2]}
    assert all(out.finish_reason == "length" for out in finished.values())
    stats = engine.stats()
    assert stats.num_kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert engine.block_manager.num_free_blocks == 24


def test_abort_mid_prefill_frees_its_blocks(checkpoint) -> None:
    engine = make_engine(checkpoint, max_num_batched_tokens=8)
    engine.add_request("long", random_prompts([30], seed=5)[0], SamplingParams(max_tokens=4))
    engine.step()
    seq = engine.requests["long"].seqs[0]
    assert seq.num_computed_tokens == 8 and engine.stats().num_kv_blocks_used == 2
    engine.abort_request("long")
    assert engine.stats().num_kv_blocks_used == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_preemption_under_block_pressure_keeps_outputs_exact(checkpoint) -> None:
    prompt = PROMPT * 3  # 15 tokens: 3 full blocks to share
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference = run(make_engine(checkpoint), {"r": (prompt, greedy)})["r"].outputs[0].token_ids
    engine = make_engine(checkpoint, num_blocks=16)  # one max-length sequence; five of 27 tokens do not fit
    out = run(engine, {f"r{i}": (prompt, greedy) for i in range(5)})
    assert engine.stats().num_preemptions > 0
    assert all(o.outputs[0].token_ids == reference for o in out.values())
    # Prompt tokens served from the cache: never more than the prompt's full blocks (a preempted sequence
    # finding its own blocks again does not count), and the last one admitted did find the shared prompt.
    assert all(o.num_cached_tokens <= 12 for o in out.values())
    assert out["r4"].num_cached_tokens == 12


def test_n_with_seed_is_reproducible_across_engines(checkpoint) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    first = run(make_engine(checkpoint, seed=0), {"s": (PROMPT, params)})["s"]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    completions = [c.token_ids for c in first.outputs]
    assert all(len(c) == 8 for c in completions)
    assert len({tuple(c) for c in completions}) == 3  # three different samples
    # Another engine, another engine seed, other requests sharing the batch: the same three completions.
    engine = make_engine(checkpoint, seed=99)
    neighbours = {f"o{i}": (p, SamplingParams(temperature=1.0, max_tokens=5)) for i, p in
                  enumerate(random_prompts([6, 11], seed=4))}
    second = run(engine, {"o-first": neighbours.pop("o0"), "s": (PROMPT, params), **neighbours})["s"]
    assert [c.token_ids for c in second.outputs] == completions
    other_seed = SamplingParams(n=3, temperature=1.0, seed=1235, max_tokens=8, ignore_eos=True)
    third = run(make_engine(checkpoint), {"s": (PROMPT, other_seed)})["s"]
    assert [c.token_ids for c in third.outputs] != completions


def test_stop_token_ids_finish_with_stop_reason(checkpoint, greedy_reference) -> None:
    stop_id = greedy_reference[2]
    assert stop_id not in greedy_reference[:2]
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id], ignore_eos=True)
    out = run(make_engine(checkpoint), {"r": (PROMPT, params)})["r"].outputs[0]
    assert out.token_ids == greedy_reference[:3]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_max_tokens_finishes_with_length(checkpoint, greedy_reference) -> None:
    out = run(make_engine(checkpoint), {"r": (PROMPT, SamplingParams(temperature=0.0, max_tokens=5))})["r"]
    assert out.outputs[0].token_ids == greedy_reference[:5]
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].stop_reason is None
    assert out.prompt_token_ids == PROMPT and out.prompt is None


def test_eos_stops_and_min_tokens_holds_it_back(eos_checkpoint, greedy_reference) -> None:
    eos = greedy_reference[0]
    engine = make_engine(eos_checkpoint)
    assert engine.eos_token_ids == {eos}
    out = run(engine, {"r": (PROMPT, SamplingParams(temperature=0.0, max_tokens=10))})["r"].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None

    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4)
    out = run(make_engine(eos_checkpoint), {"r": (PROMPT, params)})["r"].outputs[0]
    assert len(out.token_ids) > 4 and eos not in out.token_ids[:4]
    # Once allowed, EOS (still the favourite of this model here) ends the sequence.
    assert out.token_ids[-1] == eos and eos not in out.token_ids[:-1]
    assert out.finish_reason == "stop" and out.stop_reason is None

    ignore = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = run(make_engine(eos_checkpoint), {"r": (PROMPT, ignore)})["r"].outputs[0]
    assert out.token_ids == greedy_reference[:6] and out.finish_reason == "length"


def test_token_prompts_without_tokenizer_give_empty_text(checkpoint) -> None:
    engine = make_engine(checkpoint)
    assert engine.tokenizer is None
    out = run(engine, {"r": (PROMPT, SamplingParams(temperature=0.0, max_tokens=4))})["r"]
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("text", "hello", SamplingParams())
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request("stop", PROMPT, SamplingParams(stop=["x"]))
    assert not engine.has_unfinished_requests()


def test_prompt_too_long_is_rejected_clearly(checkpoint) -> None:
    engine = make_engine(checkpoint)
    too_long = f"prompt has {MAX_MODEL_LEN} tokens.*maximum context length is {MAX_MODEL_LEN}"
    with pytest.raises(ValueError, match=too_long):
        engine.add_request("long", [5] * MAX_MODEL_LEN, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        engine.add_request("vocab", [5, 256], SamplingParams())
    # Ids the sampler would index with are checked up front, so one request cannot fail a whole step.
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 256\)"):
        engine.add_request("stop", [5], SamplingParams(stop_token_ids=[256], min_tokens=2))
    with pytest.raises(ValueError, match="logprobs must be at most the vocabulary size 256"):
        engine.add_request("logprobs", [5], SamplingParams(logprobs=257))
    assert not engine.has_unfinished_requests()
    # The longest allowed prompt generates exactly one token, up to max_model_len.
    out = run(engine, {"r": ([5] * (MAX_MODEL_LEN - 1), SamplingParams(temperature=0.0, max_tokens=10))})["r"]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"


def test_logprobs_match_the_hf_model(checkpoint) -> None:
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=1.0, seed=5, max_tokens=6, logprobs=2, ignore_eos=True)
    out = run(make_engine(checkpoint), {"r": (PROMPT, params)})["r"].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT + out.token_ids])
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    ranks_seen = set()
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = reference[len(PROMPT) - 1 + i]
        top2 = row.topk(2).indices.tolist()
        assert token in entry  # the sampled token is always included
        assert set(entry) == set(top2) | {token}
        for t, logprob in entry.items():
            assert logprob.logprob == pytest.approx(row[t].item(), abs=1e-4)
            assert logprob.rank == 1 + int((row > row[t]).sum())
            assert logprob.decoded_token is None  # no tokenizer
        ranks_seen.add(entry[token].rank)
    assert max(ranks_seen) > 2  # some sampled token lay outside the top 2 and was added to the dict


# ------------------------------------------------------------------------------- text, with a real tokenizer


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer files (so it generates real text)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    path = tmp_path_factory.mktemp("tiny-llama-text")
    make_checkpoint("llama", path, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(path)
    return path


def test_text_and_stop_strings_through_the_engine(text_checkpoint) -> None:
    engine = make_engine(text_checkpoint, num_blocks=40)
    tokenizer = engine.tokenizer
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    free = run(engine, {"r": ("Once upon a time", base)})["r"]
    assert free.prompt == "Once upon a time"
    ids = free.outputs[0].token_ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert free.outputs[0].text == text and len(text) > 20

    # A stop string made of the end of one generated token and the start of a later one.
    pieces = [tokenizer.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
    boundary = next(i for i in range(3, len(ids) - 2) if len(pieces[i]) - len(pieces[i - 1]) >= 2
                    and "\ufffd" not in pieces[i + 2])
    start = len(pieces[boundary]) - 1
    stop = text[start : len(pieces[boundary + 1]) + 1]
    assert text.find(stop) == start  # its first occurrence
    for stream, include in [(False, False), (True, False), (True, True)]:
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                include_stop_str_in_output=include)
        engine.add_request("s", "Once upon a time", params, stream=stream)
        while engine.has_unfinished_requests():
            outputs = engine.step()
        out = outputs[-1].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.token_ids == ids[: boundary + 3]  # finished the step the stop string's last char arrived
        assert out.text == (text[: start + len(stop)] if include else text[:start])
    assert engine.stats().num_kv_blocks_used == 0


def test_a_config_without_a_position_limit_takes_max_model_len_from_the_user():
    """XLNet-style configs say max_position_embeddings=-1 (relative positions): no limit, so one must be given."""
    from transformers import PretrainedConfig

    from tfbackend.engine.model_files import max_model_len

    config = PretrainedConfig(max_position_embeddings=-1)
    assert max_model_len(config, 4096) == 4096
    with pytest.raises(ValueError, match="pass max_model_len"):
        max_model_len(config, None)
    assert max_model_len(PretrainedConfig(max_position_embeddings=512), None) == 512
    with pytest.raises(ValueError, match="exceeds"):
        max_model_len(PretrainedConfig(max_position_embeddings=512), 1024)
