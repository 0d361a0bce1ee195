"""BlockManager: block tables, reference counts and prefix caching, specified on hand-built sequences."""

from __future__ import annotations

import itertools

import pytest

from tfbackend.engine import block_manager as block_manager_module
from tfbackend.engine.block_manager import BlockManager
from tfbackend.engine.sequence import Sequence
from tfbackend.sampling_params import SamplingParams

BS = 4  # block size used throughout
_ids = itertools.count()


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "req", 0, list(tokens), len(tokens), SamplingParams())


def compute(bm: BlockManager, seq: Sequence, num_new: int | None = None) -> None:
    """What the engine does for one scheduled chunk: blocks for it, then mark it computed and cached."""
    num_new = seq.num_tokens - seq.num_computed_tokens if num_new is None else num_new
    assert bm.allocate(seq, num_new)
    seq.num_computed_tokens += num_new
    bm.cache_full_blocks(seq)


def ref_counts(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm.blocks]


def check_accounting(bm: BlockManager, live: list[Sequence]) -> None:
    """Each block's ref count is the number of live tables holding it; free blocks are exactly those at 0."""
    holders = [0] * bm.num_blocks
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), "a table holds a block twice"
        for block_id in seq.block_table:
            holders[block_id] += 1
    assert ref_counts(bm) == holders
    assert set(bm.free) == {i for i, n in enumerate(holders) if n == 0}


# ------------------------------------------------------------------------------------------- allocation


def test_allocation_grows_block_table_exactly_as_needed() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10, 16)))  # 6 prompt tokens
    compute(bm, seq, 3)  # chunked prefill: 3 tokens -> 1 block
    assert len(seq.block_table) == 1
    compute(bm, seq, 3)  # 6 tokens -> 2 blocks
    assert len(seq.block_table) == 2
    for step in range(10):  # decode one token at a time
        seq.token_ids.append(100 + step)
        compute(bm, seq, 1)
        assert len(seq.block_table) == -(-seq.num_computed_tokens // BS)
        assert bm.num_used_blocks == len(seq.block_table)
    assert seq.num_computed_tokens == 16 and len(seq.block_table) == 4
    check_accounting(bm, [seq])


def test_allocate_of_zero_new_tokens_within_the_last_block_takes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq([1, 2, 3])
    compute(bm, seq)
    before = list(seq.block_table)
    assert bm.allocate(seq, 0)
    seq.token_ids.append(4)
    assert bm.allocate(seq, 1)  # the 4th token still fits the first block
    assert seq.block_table == before


def test_fresh_blocks_have_ref_count_one_and_freeing_returns_every_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    seqs = [make_seq([s] * n) for s, n in [(1, 5), (2, 9), (3, 1)]]
    for seq in seqs:
        compute(bm, seq)
    assert [len(s.block_table) for s in seqs] == [2, 3, 1]
    assert bm.num_used_blocks == 6 and bm.num_free_blocks == 4
    assert all(bm.blocks[b].ref_count == 1 for s in seqs for b in s.block_table)
    check_accounting(bm, seqs)
    for i, seq in enumerate(seqs):
        bm.free_sequence(seq)
        assert seq.block_table == [] and seq.num_hashed_blocks == 0
        check_accounting(bm, seqs[i + 1 :])
    assert bm.num_free_blocks == bm.num_blocks and bm.num_used_blocks == 0
    assert all(count == 0 for count in ref_counts(bm))


def test_allocate_returns_false_without_side_effects_when_full() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    holder = make_seq(list(range(8)))
    compute(bm, holder)  # 2 of 3 blocks used
    seq = make_seq(list(range(50, 59)))  # 9 tokens need 3 blocks, only 1 free
    snapshot = (ref_counts(bm), list(bm.free), dict(bm.cached))
    assert not bm.can_allocate(seq, 9)
    assert not bm.allocate(seq, 9)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert (ref_counts(bm), list(bm.free), dict(bm.cached)) == snapshot

    # A sequence that already holds blocks and needs two more than it has: also refused untouched.
    grower = make_seq([7, 7, 7])
    assert bm.can_allocate(grower, 3) and bm.allocate(grower, 3)
    grower.num_computed_tokens = 3
    grower.token_ids += [8] * 6  # 9 tokens now need 3 blocks, it has 1 and none is free
    table = list(grower.block_table)
    snapshot = (ref_counts(bm), list(bm.free), dict(bm.cached))
    assert not bm.can_allocate(grower, 6)
    assert not bm.allocate(grower, 6)
    assert grower.block_table == table
    assert (ref_counts(bm), list(bm.free), dict(bm.cached)) == snapshot
    assert bm.can_allocate(grower, 1)  # the 4th token fits its own block


def test_can_allocate_agrees_with_allocate() -> None:
    for free_blocks in range(4):
        for num_tokens in range(1, 14):
            bm = BlockManager(num_blocks=free_blocks, block_size=BS)
            seq = make_seq([1] * num_tokens)
            expected = bm.can_allocate(seq, num_tokens)
            assert expected == (-(-num_tokens // BS) <= free_blocks)
            assert bm.allocate(seq, num_tokens) == expected


# --------------------------------------------------------------------------------------- prefix caching


def test_same_prefix_shares_the_full_blocks() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(20, 30))  # 10 tokens: 2 full blocks + 2 tokens
    first = make_seq(prompt)
    compute(bm, first)
    second = make_seq(prompt + [99, 98])
    bm.match_prefix(second)
    assert second.block_table == first.block_table[:2]
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    assert second.num_hashed_blocks == 2
    assert [bm.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    compute(bm, second)  # only its own tail gets new blocks
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    check_accounting(bm, [first, second])

    bm.free_sequence(first)  # the shared blocks survive: the second sequence still holds them
    assert [bm.blocks[b].ref_count for b in second.block_table[:2]] == [1, 1]
    check_accounting(bm, [second])
    bm.free_sequence(second)
    assert bm.num_used_blocks == 0


def test_prefix_match_always_leaves_the_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(40, 52))  # exactly 3 full blocks
    compute(bm, make_seq(prompt))
    same = make_seq(prompt)
    bm.match_prefix(same)
    # The third block holds the last token, whose logits are needed: it is not taken from the cache.
    assert len(same.block_table) == 2 and same.num_computed_tokens == 8
    one_more = make_seq(prompt + [1])
    bm.match_prefix(one_more)
    assert len(one_more.block_table) == 3 and one_more.num_computed_tokens == 12
    single = make_seq(prompt[:4])
    bm.match_prefix(single)
    assert single.block_table == [] and single.num_computed_tokens == 0


def test_only_computed_full_blocks_are_cached() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(60, 70))
    partial = make_seq(prompt)
    compute(bm, partial, 6)  # one full block computed, the second half-way
    assert len(bm.cached) == 1
    probe = make_seq(prompt)
    bm.match_prefix(probe)
    assert probe.block_table == partial.block_table[:1]


def test_chain_hash_ties_a_block_to_its_position() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    compute(bm, make_seq(a + b + [9]))
    assert len(bm.cached) == 2
    # Block content b is cached, but as the block after a; at position 0 it is a different block.
    moved = make_seq(b + a + [9])
    bm.match_prefix(moved)
    assert moved.block_table == [] and moved.num_computed_tokens == 0
    # After a different first block, the same second block content does not match either.
    other_parent = make_seq([0, 0, 0, 0] + b + [9])
    bm.match_prefix(other_parent)
    assert other_parent.block_table == []


def test_freed_cached_blocks_are_found_until_reused() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    prompt = list(range(80, 89))  # 2 full blocks + 1
    first = make_seq(prompt)
    compute(bm, first)
    cached_blocks = first.block_table[:2]
    bm.free_sequence(first)
    assert bm.num_used_blocks == 0

    # Never-used blocks are handed out before freed ones, so the cache survives unrelated allocations.
    unrelated = make_seq([7] * 8)
    compute(bm, unrelated)
    assert not set(unrelated.block_table) & set(cached_blocks)
    again = make_seq(prompt)
    bm.match_prefix(again)
    assert again.block_table == cached_blocks and again.num_computed_tokens == 8
    assert all(bm.blocks[b].ref_count == 1 and b not in bm.free for b in cached_blocks)
    check_accounting(bm, [unrelated, again])


def test_eviction_reuses_a_freed_sequences_tail_first() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    prompt = list(range(100, 112)) + [1]  # 3 full blocks + 1 token, of which 3 blocks fit the cache
    first = make_seq(prompt[:12])
    compute(bm, first)
    table = list(first.block_table)
    bm.free_sequence(first)
    # Needing one block takes the last block of the freed sequence; its first two blocks stay cached.
    taker = make_seq([5, 5])
    compute(bm, taker)
    assert taker.block_table == [table[2]]
    probe = make_seq(prompt)
    bm.match_prefix(probe)
    assert probe.block_table == table[:2] and probe.num_computed_tokens == 8


def test_a_reused_block_is_not_a_hit_for_its_old_content() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    prompt = [11, 12, 13, 14, 15]
    first = make_seq(prompt)
    compute(bm, first)
    bm.free_sequence(first)
    thief = make_seq([21, 22, 23, 24, 25, 26, 27, 28])  # takes both blocks and overwrites them
    compute(bm, thief)
    assert sorted(thief.block_table) == [0, 1]  # every block, including the two cached ones
    thief_table = list(thief.block_table)
    bm.free_sequence(thief)
    probe = make_seq(prompt)
    bm.match_prefix(probe)
    assert probe.block_table == [] and probe.num_computed_tokens == 0
    # The new content is what is found now.
    probe2 = make_seq([21, 22, 23, 24, 25, 26, 27, 28, 29])
    bm.match_prefix(probe2)
    assert probe2.block_table == thief_table


def test_a_hash_collision_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager_module, "chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=4, block_size=BS)
    compute(bm, make_seq([1, 2, 3, 4, 5]))
    probe = make_seq([6, 7, 8, 9, 10])  # same (constant) hash, different tokens
    bm.match_prefix(probe)
    assert probe.block_table == [] and probe.num_computed_tokens == 0
    genuine = make_seq([1, 2, 3, 4, 5])
    bm.match_prefix(genuine)
    assert len(genuine.block_table) == 1


def test_disabled_prefix_caching_never_shares() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(10))
    first = make_seq(prompt)
    compute(bm, first)
    second = make_seq(prompt)
    bm.match_prefix(second)
    assert second.block_table == [] and second.num_computed_tokens == 0
    compute(bm, second)
    assert not set(first.block_table) & set(second.block_table)
    assert bm.cached == {}
    bm.free_sequence(first)
    third = make_seq(prompt)
    bm.match_prefix(third)
    assert third.block_table == []
