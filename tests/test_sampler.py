"""The sampler against plain references: greedy, seeds, top-k/top-p/min-p, penalties, min_tokens, logprobs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tfbackend.engine.sampler import Sampler, apply_min_p, apply_top_k_top_p
from tfbackend.engine.sequence import Sequence
from tfbackend.sampling_params import SamplingParams

CPU = torch.device("cpu")
EOS = 2
_ids = itertools.count()


def make_seq(params: SamplingParams, prompt=(5, 6, 7), output=(), seed: int | None = None) -> Sequence:
    tokens = list(prompt) + list(output)
    seq = Sequence(next(_ids), "req", 0, tokens, len(prompt), params)
    if seed is not None:
        seq.generator = torch.Generator().manual_seed(seed)
    return seq


def sampler(seed: int = 0) -> Sampler:
    return Sampler(CPU, seed, {EOS})


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------------------ plain references


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def kept_by_top_k_top_p(row: list[float], top_k: int, top_p: float) -> set[int]:
    """Keep the k most likely tokens, then the most likely of those until their mass reaches top_p."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if top_k > 0:
        order = order[:top_k]
    probs = softmax([row[i] for i in order])
    kept, mass = set(), 0.0
    for token, p in zip(order, probs):
        if mass >= top_p:
            break
        kept.add(token)
        mass += p
    return kept


def kept_by_min_p(probs: list[float], min_p: float) -> set[int]:
    return {i for i, p in enumerate(probs) if p >= min_p * max(probs)}


# --------------------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_ignores_the_rng() -> None:
    logits = random_logits(16, 50, seed=1)
    seqs = [make_seq(SamplingParams(temperature=0.0)) for _ in range(16)]
    expected = logits.argmax(dim=-1).tolist()
    assert sampler(0)(logits, seqs).token_ids == expected
    assert sampler(123)(logits, seqs).token_ids == expected


def test_greedy_rows_stay_argmax_next_to_sampled_rows() -> None:
    logits = random_logits(8, 50, seed=2, scale=0.5)  # flat: sampled rows rarely pick the argmax
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, top_p=0.9, top_k=20) for i in range(8)]
    seqs = [make_seq(p) for p in params]
    out = sampler(0)(logits, seqs).token_ids
    argmax = logits.argmax(dim=-1).tolist()
    assert [out[i] for i in range(0, 8, 2)] == [argmax[i] for i in range(0, 8, 2)]
    assert [out[i] for i in range(1, 8, 2)] != [argmax[i] for i in range(1, 8, 2)]


# ----------------------------------------------------------------------------------------------- seeds


def draw(sampler_: Sampler, logits_row: torch.Tensor, seq: Sequence, neighbours: int, steps: int) -> list[int]:
    """``steps`` draws for ``seq`` placed in the middle of a batch with ``neighbours`` unseeded rows."""
    tokens = []
    for step in range(steps):
        others = random_logits(neighbours, logits_row.shape[-1], seed=100 + step)
        half = neighbours // 2
        logits = torch.cat([others[:half], logits_row[None], others[half:]])
        seqs = [make_seq(SamplingParams()) for _ in range(half)] + [seq]
        seqs += [make_seq(SamplingParams()) for _ in range(neighbours - half)]
        tokens.append(sampler_(logits, seqs).token_ids[half])
    return tokens


def test_same_seed_gives_same_tokens_whatever_shares_the_batch() -> None:
    row = random_logits(1, 64, seed=3, scale=0.5)[0]  # flat enough that draws vary
    params = SamplingParams(temperature=1.0, seed=7)
    alone = draw(sampler(0), row, make_seq(params, seed=7), neighbours=0, steps=20)
    crowded = draw(sampler(99), row, make_seq(params, seed=7), neighbours=5, steps=20)
    crowded2 = draw(sampler(5), row, make_seq(params, seed=7), neighbours=2, steps=20)
    assert alone == crowded == crowded2
    assert len(set(alone)) > 5  # it really samples
    other_seed = draw(sampler(0), row, make_seq(SamplingParams(seed=8), seed=8), neighbours=0, steps=20)
    assert other_seed != alone


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = random_logits(6, 64, seed=4, scale=0.5)
    seqs = [make_seq(SamplingParams()) for _ in range(6)]
    reference = sampler(11)
    a = [reference(logits, seqs).token_ids for _ in range(3)]
    assert a[0] != a[1]  # the stream advances between steps
    same, other = sampler(11), sampler(12)
    assert [same(logits, seqs).token_ids for _ in range(3)] == a
    assert [other(logits, seqs).token_ids for _ in range(3)] != a


# ------------------------------------------------------------------------------------- top-k/top-p/min-p


@pytest.mark.parametrize("seed", range(4))
def test_top_k_top_p_mask_matches_reference(seed: int) -> None:
    rows, vocab = 12, 40
    logits = random_logits(rows, vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    top_k = torch.randint(1, vocab + 1, (rows,), generator=gen)
    top_k[0], top_k[1] = vocab, 1  # disabled-equivalent and extreme
    top_p = torch.rand(rows, generator=gen) * 0.95 + 0.05
    top_p[2], top_p[3] = 1.0, 1e-6
    for use_k, use_p in [(True, False), (False, True), (True, True)]:
        out = apply_top_k_top_p(logits.clone(), top_k if use_k else None, top_p if use_p else None)
        for r in range(rows):
            row = logits[r].tolist()
            expected = kept_by_top_k_top_p(row, int(top_k[r]) if use_k else 0, float(top_p[r]) if use_p else 1.0)
            kept = {i for i in range(vocab) if out[r, i] != -math.inf}
            assert kept == expected, (use_k, use_p, r)
            for i in kept:  # kept logits are untouched
                assert out[r, i].item() == row[i]


@pytest.mark.parametrize("top_p,kept", [(0.25, 1), (0.5, 2), (0.5000001, 3), (0.75, 3), (1.0, 4)])
def test_top_p_keeps_a_token_only_while_the_mass_before_it_is_below_top_p(top_p: float, kept: int) -> None:
    logits = torch.zeros(1, 4)  # four tokens of probability exactly 0.25
    out = apply_top_k_top_p(logits, None, torch.tensor([top_p]))
    assert int((out > -math.inf).sum()) == kept


@pytest.mark.parametrize("seed", range(4))
def test_min_p_mask_matches_reference(seed: int) -> None:
    rows, vocab = 12, 40
    probs = torch.softmax(random_logits(rows, vocab, seed=seed), dim=-1)
    min_p = torch.rand(rows, generator=torch.Generator().manual_seed(seed))
    min_p[0], min_p[1] = 0.0, 1.0
    out = apply_min_p(probs.clone(), min_p)
    for r in range(rows):
        expected = kept_by_min_p(probs[r].tolist(), float(min_p[r]))
        assert {i for i in range(vocab) if out[r, i] > 0} == expected
        assert all(out[r, i].item() == probs[r, i].item() for i in expected)
    assert (out[1] > 0).sum() == 1  # min_p=1 keeps only the most likely token


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.8, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.3),
        SamplingParams(temperature=2.0, top_k=8, top_p=0.7, min_p=0.2),
    ],
    ids=["top_k", "top_p", "min_p", "all"],
)
def test_sampled_tokens_always_lie_in_the_kept_set(params: SamplingParams) -> None:
    vocab, rows = 30, 2000
    base = random_logits(1, vocab, seed=5, scale=1.5)[0]
    scaled = (base / params.temperature).tolist()
    kept = kept_by_top_k_top_p(scaled, params.top_k, params.top_p)
    probs = softmax([v if i in kept else -math.inf for i, v in enumerate(scaled)])
    if params.min_p:
        kept &= kept_by_min_p(probs, params.min_p)
        probs = softmax([v if i in kept else -math.inf for i, v in enumerate(scaled)])
    assert 1 < len(kept) < vocab  # the test means something
    seqs = [make_seq(params) for _ in range(rows)]
    drawn = sampler(0)(base.expand(rows, vocab).clone(), seqs).token_ids
    assert set(drawn) <= kept
    assert {t for t in kept if probs[t] > 0.01} <= set(drawn)  # and the kept set is really sampled


def test_temperature_sampling_matches_the_softmax_distribution() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    draws, temperature = 4000, 0.7
    seqs = [make_seq(SamplingParams(temperature=temperature)) for _ in range(draws)]
    tokens = sampler(1234)(logits.expand(draws, 4).clone(), seqs).token_ids
    counts = [tokens.count(t) for t in range(4)]

    def chi_square(probs: list[float]) -> float:
        return sum((c - draws * p) ** 2 / (draws * p) for c, p in zip(counts, probs))

    # 3 degrees of freedom: P(chi2 > 30) ~ 1e-6, while the untempered distribution is ~290 away.
    assert chi_square(softmax((logits / temperature).tolist())) < 30
    assert chi_square(softmax(logits.tolist())) > 100


# ------------------------------------------------------------------------------------------ penalties


def test_penalties_match_hand_computed_values() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 3.0, -2.0, 0.5], [1.0, 2.0, -1.0, 3.0, -2.0, 0.5]])
    # prompt [1, 4], output [2, 3, 3]
    penalised = make_seq(
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        prompt=[1, 4],
        output=[2, 3, 3],
    )
    plain = make_seq(SamplingParams(), prompt=[1, 4], output=[2, 3, 3])
    out = sampler().apply_penalties(logits, [penalised, plain])
    expected = [
        1.0,  # token 0: never seen
        2.0 / 2,  # token 1: in the prompt, positive -> divided; no presence/frequency (prompt only)
        -1.0 * 2 - 0.5 - 0.25 * 1,  # token 2: once in the output, negative -> multiplied
        3.0 / 2 - 0.5 - 0.25 * 2,  # token 3: twice in the output
        -2.0 * 2,  # token 4: in the prompt, negative -> multiplied
        0.5,  # token 5: never seen
    ]
    assert out[0].tolist() == pytest.approx(expected)
    assert out[1].tolist() == logits[1].tolist()  # a row without penalties is untouched


def test_presence_and_frequency_alone_ignore_the_prompt() -> None:
    logits = torch.zeros(1, 5)
    seq = make_seq(SamplingParams(presence_penalty=-1.0, frequency_penalty=1.0), prompt=[0, 0, 1], output=[1, 1, 4])
    out = sampler().apply_penalties(logits, [seq])
    assert out[0].tolist() == pytest.approx([0.0, -2.0 + 1.0, 0.0, 0.0, -1.0 + 1.0])


# ----------------------------------------------------------------------------------------- min_tokens


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached() -> None:
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 4] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7])
    for produced, expected in [(0, 4), (2, 4), (3, EOS)]:
        seq = make_seq(params, output=[9] * produced)
        assert sampler()(logits, [seq]).token_ids == [expected]
    # With ignore_eos, EOS is an ordinary token and is not blocked; stop ids still are.
    ignore = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7], ignore_eos=True)
    assert sampler()(logits, [make_seq(ignore)]).token_ids == [EOS]
    logits[0, EOS] = 0.0
    assert sampler()(logits, [make_seq(ignore)]).token_ids == [4]


def test_min_tokens_holds_for_sampled_rows_too() -> None:
    rows = 500
    logits = torch.zeros(rows, 6)
    logits[:, EOS] = 3.0
    seqs = [make_seq(SamplingParams(temperature=1.0, min_tokens=1)) for _ in range(rows)]
    assert EOS not in sampler()(logits, seqs).token_ids
    seqs = [make_seq(SamplingParams(temperature=1.0, min_tokens=1), output=[1]) for _ in range(rows)]
    assert EOS in sampler()(logits, seqs).token_ids


# ------------------------------------------------------------------------------------------- logprobs


def test_logprobs_are_those_of_the_raw_logits() -> None:
    rows, vocab = 6, 20
    logits = random_logits(rows, vocab, seed=6)
    logits[5, 3] = logits[5].max() + 1.0  # the raw argmax of the last row is an output token...
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=0.7, top_k=4, logprobs=5, repetition_penalty=1.8, seed=3),
        SamplingParams(temperature=1.0),  # no logprobs requested
        SamplingParams(temperature=1.5, logprobs=2, min_p=0.1),
        SamplingParams(temperature=0.0, logprobs=1, presence_penalty=2.0),  # ...that its penalty rules out
    ]
    seqs = [make_seq(p, prompt=list(range(10)), output=[3, 4]) for p in params]
    out = sampler(0)(logits, seqs)
    reference = torch.log_softmax(logits.double(), dim=-1)
    for r, (seq, token) in enumerate(zip(seqs, out.token_ids)):
        if seq.params.logprobs is None:
            assert out.logprobs[r] is None
            continue
        chosen, rank, top_ids, top_values = out.logprobs[r]
        row = reference[r].tolist()
        assert chosen == pytest.approx(row[token], abs=1e-5)
        assert rank == 1 + sum(v > row[token] for v in row)
        k = seq.params.logprobs
        order = sorted(range(vocab), key=lambda i: -row[i])[:k]
        assert top_ids == order
        assert top_values == pytest.approx([row[i] for i in order], abs=1e-5)
    # The penalised greedy row picked the raw runner-up: logprobs describe the raw distribution.
    assert out.token_ids[5] != 3 and out.logprobs[5][1] == 2
