"""The engine's run-ahead mode (step N+1 queued before step N's tokens reach the host) against plain steps.

Run-ahead is the CUDA default; here it is forced on a CPU, where both modes must produce the same tokens and
logprobs: greedy and seeded sampling, stop tokens seen a step late, penalties (which wait for the previous
step), preemption under a tiny KV cache, prefix-cache hits, streaming and aborts.
"""

from __future__ import annotations

import pytest
from tests.tiny_models import make_checkpoint, random_prompts

from tfbackend import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", path)
    return path


def run(model_dir, run_ahead: bool, prompts, params, **engine) -> list:
    llm = LLM(str(model_dir), model_impl="transformers", **engine)
    llm.engine.run_ahead = run_ahead
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [
        [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in output.outputs] for output in outputs
    ]


CASES = {
    "greedy": (SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), {}),
    "seeded-n2-logprobs": (SamplingParams(temperature=0.9, top_p=0.9, top_k=40, n=2, seed=7, max_tokens=10,
                                          logprobs=3, ignore_eos=True), {}),
    "stop-tokens-min-tokens": (SamplingParams(temperature=1.0, seed=3, max_tokens=16, min_tokens=2,
                                              stop_token_ids=list(range(3, 120))), {}),
    "penalties": (SamplingParams(temperature=0.8, seed=5, max_tokens=10, repetition_penalty=1.3,
                                 frequency_penalty=0.4, ignore_eos=True), {}),
    "preemption-chunked": (SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                           dict(kv_cache_memory=16 * 8192, max_num_batched_tokens=16)),  # 16 blocks: preempts
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_ahead_matches_plain_steps(model_dir, case):
    params, engine = CASES[case]
    prompts = random_prompts([5, 12, 23, 9, 40, 17])
    prompts.append(prompts[2][:20] + [7, 8])  # shares a prefix with prompt 2: a prefix-cache hit
    assert run(model_dir, True, prompts, params, **engine) == run(model_dir, False, prompts, params, **engine)


def test_run_ahead_streams_and_aborts(model_dir):
    llm = LLM(str(model_dir), model_impl="transformers")
    llm.engine.run_ahead = True
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(random_prompts([6, 9, 11])):
        engine.add_request(str(i), prompt, params, stream=True)
    seen: dict[str, list[list[int]]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = output.outputs[0].token_ids
            assert all(t >= 0 for t in tokens), "a placeholder leaked into an output"
            seen.setdefault(output.request_id, []).append(tokens)
        steps += 1
        if steps == 3:
            engine.abort_request("1")
    assert set(seen) == {"0", "1", "2"}
    assert len(seen["0"][-1]) == len(seen["2"][-1]) == 8
    assert len(seen["1"][-1]) < 8
    for history in seen.values():  # each streamed output extends the one before by one token
        assert all(b[: len(a)] == a and len(b) == len(a) + 1 for a, b in zip(history, history[1:]))
