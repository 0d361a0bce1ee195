"""Scheduler invariants, checked on hand-built cases and on randomized simulations of the engine loop.

No model: a "step" advances ``num_computed_tokens`` by what was scheduled and, for sequences whose chunk
reached their end, appends a random token and maybe finishes them, as ``LLMEngine.step`` does. A fake KV
store records, per cache slot, which prefix of tokens its K/V would encode, so the simulation also checks
that every sequence only ever reads K/V of its own prefix (prefix caching and block reuse included).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from tfbackend.engine.block_manager import BlockManager
from tfbackend.engine.scheduler import Scheduler
from tfbackend.engine.sequence import Sequence, SequenceStatus
from tfbackend.sampling_params import SamplingParams


def make_seq(seq_id: int, prompt: list[int], max_tokens: int) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Sequence(seq_id, f"r{seq_id}", 0, list(prompt), len(prompt), params)


@dataclass
class Sim:
    """The engine loop around a Scheduler, with invariant checks after every schedule()."""

    num_blocks: int
    block_size: int
    max_num_seqs: int
    budget: int
    prefix_caching: bool = True
    seed: int = 0
    stop_prob: float = 0.0
    step_no: int = 0
    kv: dict[int, tuple[int, ...]] = field(default_factory=dict)  # slot -> prefix of tokens it encodes
    finished: dict[int, int] = field(default_factory=dict)  # seq_id -> step it finished
    arrived: dict[int, int] = field(default_factory=dict)  # seq_id -> step it was added
    all_seqs: list[Sequence] = field(default_factory=list)
    preempted_total: int = 0

    def __post_init__(self) -> None:
        self.bm = BlockManager(self.num_blocks, self.block_size, self.prefix_caching)
        self.sched = Scheduler(self.bm, self.max_num_seqs, self.budget)
        self.rng = random.Random(self.seed)

    def add(self, seq: Sequence) -> None:
        self.sched.add(seq)
        self.arrived[seq.seq_id] = self.step_no
        self.all_seqs.append(seq)

    def step(self) -> None:
        sched, bm = self.sched, self.bm
        running_before = list(sched.running)
        batch = sched.schedule()
        self.step_no += 1
        self.check_invariants(batch, running_before)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            self.check_reads_own_prefix(seq)
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new):
                slot = seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
                self.kv[slot] = tuple(seq.token_ids[: pos + 1])
            seq.num_computed_tokens += num_new
            bm.cache_full_blocks(seq)
        for seq in batch.seqs:
            if seq.num_computed_tokens == seq.num_tokens:  # this chunk reached the end: a token is sampled
                seq.token_ids.append(self.rng.randrange(3, 40))
                if seq.num_output_tokens >= seq.params.max_tokens or self.rng.random() < self.stop_prob:
                    sched.finish(seq)
                    self.finished[seq.seq_id] = self.step_no

    def check_reads_own_prefix(self, seq: Sequence) -> None:
        for pos in range(seq.num_computed_tokens):
            slot = seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
            assert self.kv.get(slot) == tuple(seq.token_ids[: pos + 1]), (
                f"seq {seq.seq_id} would read stale K/V at position {pos}"
            )

    def check_invariants(self, batch, running_before: list[Sequence]) -> None:
        sched, bm = self.sched, self.bm
        # Token budget and batch size.
        assert batch.num_tokens <= self.budget
        assert all(n >= 1 for n in batch.num_new_tokens)
        assert len(sched.running) <= self.max_num_seqs
        assert len(batch.seqs) == len(set(map(id, batch.seqs))) <= self.max_num_seqs
        # Only running sequences are scheduled, and all of them when the budget allows.
        assert all(seq.status is SequenceStatus.RUNNING and seq in sched.running for seq in batch.seqs)
        if batch.num_tokens < self.budget:
            assert len(batch.seqs) == len(sched.running)
        # Blocks cover computed + new tokens exactly.
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            assert seq.num_computed_tokens + num_new <= seq.num_tokens
            assert len(seq.block_table) == bm.blocks_needed(seq.num_computed_tokens + num_new)
        # Waiting sequences hold no blocks; only running ones do.
        for seq in sched.waiting:
            assert seq.status is SequenceStatus.WAITING
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        # Every block's ref count is the number of running tables holding it; a block held by several
        # sequences is a full prefix-cache block whose tokens all of them share at the same position.
        holders: dict[int, list[tuple[Sequence, int]]] = {}
        for seq in sched.running:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for index, block_id in enumerate(seq.block_table):
                holders.setdefault(block_id, []).append((seq, index))
        for block in bm.blocks:
            owners = holders.get(block.block_id, [])
            assert block.ref_count == len(owners)
            assert (block.block_id in bm.free) == (not owners)
            if len(owners) > 1:
                assert self.prefix_caching and block.hash is not None
                contents = {
                    tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size]) for seq, i in owners
                }
                assert contents == {block.token_ids} and len({i for _, i in owners}) == 1
        # FCFS: running is in arrival order, waiting too, and everything running arrived before anything
        # waiting (a preempted sequence goes back to the front of the queue).
        running_ids = [s.seq_id for s in sched.running]
        waiting_ids = [s.seq_id for s in sched.waiting]
        assert running_ids == sorted(running_ids) and waiting_ids == sorted(waiting_ids)
        if running_ids and waiting_ids:
            assert running_ids[-1] < waiting_ids[0]
        # Preemption: the victims were the newest running sequences and restart from 0 at the queue's front.
        if batch.num_preempted:
            self.preempted_total += batch.num_preempted
            still = [s for s in running_before if s in sched.running]
            victims = [s for s in running_before if s not in sched.running and not s.is_finished]
            assert len(victims) == batch.num_preempted
            assert running_before == still + victims  # the newest ones, in order
            assert list(sched.waiting)[: len(victims)] == victims
            assert all(v.num_computed_tokens == 0 and v.block_table == [] for v in victims)
            # No admission in a step that preempted.
            assert all(s in running_before for s in batch.seqs)


# ------------------------------------------------------------------------------------- hand-built cases


def test_chunked_prefill_respects_the_budget_and_decodes_go_first() -> None:
    sim = Sim(num_blocks=32, block_size=4, max_num_seqs=4, budget=8)
    sim.add(make_seq(0, list(range(3, 23)), 3))  # 20-token prompt
    batch = sim.sched.schedule()
    assert batch.num_new_tokens == [8]
    sim.sched.running[0].num_computed_tokens += 8
    batch = sim.sched.schedule()
    assert batch.num_new_tokens == [8]
    sim.sched.running[0].num_computed_tokens += 8
    sim.add(make_seq(1, [5, 6, 7, 8, 9], 3))
    batch = sim.sched.schedule()  # the rest of the first prompt, then as much of the second as fits
    assert [s.seq_id for s in batch.seqs] == [0, 1] and batch.num_new_tokens == [4, 4]


def test_fcfs_admission_does_not_skip_a_head_that_does_not_fit() -> None:
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=64)
    sim.add(make_seq(0, [3] * 8, 5))  # 2 blocks
    sim.add(make_seq(1, [4] * 12, 5))  # 3 blocks: does not fit next to seq 0
    sim.add(make_seq(2, [5] * 2, 5))  # 1 block: would fit, but must not overtake seq 1
    batch = sim.sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [0]
    assert [s.seq_id for s in sim.sched.waiting] == [1, 2]
    assert sim.bm.num_used_blocks == 2


def test_max_num_seqs_limits_admission() -> None:
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, budget=64)
    for i in range(4):
        sim.add(make_seq(i, [3 + i] * 3, 5))
    batch = sim.sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [0, 1]
    assert len(sim.sched.waiting) == 2


def test_preemption_frees_the_newest_which_restarts_from_zero_at_the_front() -> None:
    # 4 blocks of 2 tokens; two 3-token prompts take 2 blocks each, so the first decode that crosses a
    # block boundary has no block left.
    sim = Sim(num_blocks=4, block_size=2, max_num_seqs=4, budget=64)
    sim.add(make_seq(0, [3, 4, 5], 5))
    sim.add(make_seq(1, [6, 7, 8], 5))
    sim.add(make_seq(2, [9], 5))
    sim.step()  # admits 0 and 1; no block left for 2
    assert [s.seq_id for s in sim.sched.running] == [0, 1]
    sim.step()  # 4th tokens fit the second blocks
    seq0, seq1 = sim.sched.running
    assert seq1.num_computed_tokens == 4
    sim.step()  # 5th token of seq 0 needs a new block: seq 1, the newest, is preempted
    assert sim.sched.running == [seq0] and seq0.num_computed_tokens == 5
    assert [s.seq_id for s in sim.sched.waiting] == [1, 2]
    assert seq1.num_computed_tokens == 0 and seq1.block_table == [] and seq1.status is SequenceStatus.WAITING
    assert sim.sched.num_preemptions == 1 and seq1.num_output_tokens == 2  # generated tokens are kept
    while sim.sched.has_unfinished():
        sim.step()
    assert sim.finished[0] < sim.finished[1]
    assert sim.bm.num_used_blocks == 0


def test_a_running_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest() -> None:
    sim = Sim(num_blocks=4, block_size=2, max_num_seqs=4, budget=64)
    seq0, seq1 = make_seq(0, [3, 4], 3), make_seq(1, [5, 6, 7], 3)
    sim.add(seq0)
    sim.add(seq1)
    sim.step()  # seq 0 takes 1 block, seq 1 takes 2
    sim.step()  # seq 0 takes the last block for its 3rd token; seq 1's 4th fits its 2nd block
    assert sim.bm.num_free_blocks == 0
    batch = sim.sched.schedule()  # seq 1's 5th token needs a block: it is the newest, so it yields
    assert batch.seqs == [seq0] and batch.num_preempted == 1
    assert sim.sched.running == [seq0] and list(sim.sched.waiting) == [seq1]
    assert seq1.num_computed_tokens == 0 and seq1.block_table == []


def test_prefix_cache_hits_share_blocks_between_running_sequences() -> None:
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=4, budget=64)
    prompt = list(range(3, 14))  # 11 tokens: 2 full blocks
    sim.add(make_seq(0, prompt, 4))
    sim.step()
    sim.add(make_seq(1, prompt + [20], 4))
    batch = sim.sched.schedule()
    seq0, seq1 = sim.sched.running
    assert seq1.num_cached_tokens == 8 and seq1.block_table[:2] == seq0.block_table[:2]
    assert batch.num_new_tokens == [1, 12 - 8]
    assert [sim.bm.blocks[b].ref_count for b in seq0.block_table[:2]] == [2, 2]
    assert sim.bm.prefix_hits == 8 and sim.bm.prefix_queries == 11 + 12


def test_num_cached_tokens_counts_prompt_hits_at_first_admission_only() -> None:
    # 8 blocks of 2. Seq 1 shares seq 0's two full prompt blocks, runs one token behind it, and is
    # preempted when seq 0 needs a 6th block; seq 0 then finishes, and seq 1, readmitted, finds its own
    # computed blocks (prompt and generated tokens) in the cache. Those are not prompt tokens served
    # from the cache: what it reports is what it found when first scheduled.
    sim = Sim(num_blocks=8, block_size=2, max_num_seqs=4, budget=64)
    prompt = [3, 4, 5, 6, 7]
    seq0, seq1 = make_seq(0, prompt, 7), make_seq(1, prompt, 7)
    sim.add(seq0)
    sim.step()
    sim.add(seq1)
    sim.step()
    assert seq1.num_cached_tokens == 4 and sim.bm.prefix_hits == 4
    for _ in range(5):
        sim.step()
    assert sim.finished == {0: 7} and seq1.num_preemptions == 1 and seq0.num_preemptions == 0
    sim.step()
    assert sim.sched.running == [seq1] and sim.bm.prefix_hits == 4 + 8  # readmitted with 8 tokens found
    assert seq1.num_cached_tokens == 4
    while sim.sched.has_unfinished():
        sim.step()
    assert seq1.num_cached_tokens == 4


# -------------------------------------------------------------------------------- randomized simulations


SIM_CASES = [
    # (num_blocks, block_size, max_num_seqs, budget, prefix_caching, num_seqs, stop_prob, arrivals_per_step)
    (12, 4, 4, 16, True, 30, 0.05, 3),  # tight blocks: many preemptions
    (40, 2, 8, 7, True, 40, 0.1, 2),  # small, odd budget: lots of chunked prefill
    (10, 4, 3, 64, False, 25, 0.0, 5),  # no prefix caching
    (30, 8, 16, 32, True, 40, 0.02, 40),  # everything arrives at once
    (8, 4, 2, 5, True, 20, 0.2, 1),
]


@pytest.mark.parametrize("case", SIM_CASES, ids=[f"case{i}" for i in range(len(SIM_CASES))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_simulation_keeps_every_invariant(case, seed: int) -> None:
    num_blocks, block_size, max_num_seqs, budget, caching, num_seqs, stop_prob, per_step = case
    rng = random.Random(1000 + seed)
    sim = Sim(num_blocks, block_size, max_num_seqs, budget, caching, seed=seed, stop_prob=stop_prob)
    max_len = num_blocks * block_size  # one sequence alone always fits, as the engine guarantees
    # A few shared system prompts so prefix caching has something to find.
    shared = [[rng.randrange(3, 40) for _ in range(rng.randrange(1, 3 * block_size))] for _ in range(3)]
    seqs = []
    for seq_id in range(num_seqs):
        prompt = list(rng.choice(shared)) if rng.random() < 0.6 else []
        prompt += [rng.randrange(3, 40) for _ in range(rng.randrange(1, 2 * block_size + 2))]
        prompt = prompt[: max_len // 2]
        max_tokens = rng.randrange(1, max_len - len(prompt) + 1)
        max_tokens = min(max_tokens, 3 * block_size)
        seqs.append(make_seq(seq_id, prompt, max_tokens))

    pending = list(seqs)
    lengths = {s.seq_id: s.num_prompt_tokens + s.params.max_tokens for s in seqs}
    for _ in range(10_000):
        for _ in range(min(per_step, len(pending))):
            sim.add(pending.pop(0))
        if not pending and not sim.sched.has_unfinished():
            break
        sim.step()
    assert not pending and not sim.sched.has_unfinished(), "the simulation did not drain"

    # Every sequence finished, within its no-starvation bound: the oldest unfinished sequence is never
    # preempted (alone it always fits) and advances at least one token per step, so each sequence is done
    # at most (its tokens + the tokens of every older sequence) steps after it arrived.
    assert set(sim.finished) == {s.seq_id for s in seqs}
    for seq in seqs:
        bound = sum(lengths[other.seq_id] for other in seqs if other.seq_id <= seq.seq_id)
        assert sim.finished[seq.seq_id] - sim.arrived[seq.seq_id] <= bound
        assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
        assert seq.num_cached_tokens < seq.num_prompt_tokens
    # After everything finishes, every block is free.
    assert sim.bm.num_used_blocks == 0 and sim.bm.num_free_blocks == num_blocks
    assert all(block.ref_count == 0 for block in sim.bm.blocks)


def test_simulations_exercise_preemption_and_prefix_sharing() -> None:
    """Guards the randomized test against becoming vacuous: the tight case must preempt and share."""
    num_blocks, block_size, max_num_seqs, budget, caching, num_seqs, stop_prob, per_step = SIM_CASES[0]
    sim = Sim(num_blocks, block_size, max_num_seqs, budget, caching, seed=0, stop_prob=stop_prob)
    prompt = list(range(3, 3 + 2 * block_size + 1))
    for seq_id in range(num_seqs):
        sim.add(make_seq(seq_id, prompt + [seq_id + 3], 8))
    shared_seen = False
    while sim.sched.has_unfinished():
        sim.step()
        shared_seen |= any(b.ref_count > 1 for b in sim.bm.blocks)
    assert sim.preempted_total > 0 and shared_seen and sim.bm.prefix_hits > 0
    assert sim.bm.num_used_blocks == 0
