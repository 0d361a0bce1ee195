"""Continuous batching: which sequences run this step and how many tokens each feeds.

Every step has a token budget (``max_num_batched_tokens``). Running sequences come first, oldest first:
a decode takes one token, an unfinished prefill takes the next chunk that fits. Then waiting sequences
are admitted in arrival order while budget, ``max_num_seqs`` and free KV blocks allow. When blocks run
out, the newest running sequence is preempted: its blocks are freed and it goes back to the front of the
queue to be recomputed later. Admission is strictly first-come-first-served and preemption always hits the
newest, so no sequence starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tfbackend.engine.block_manager import BlockManager
from tfbackend.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunked_prefill: bool = True,
    ):
        """``chunked_prefill=False``: a prompt is admitted only when all of it fits the step's budget (for
        models that cannot resume a prefill; the budget must then hold the longest prompt)."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1

        # Admitting new work while others were just preempted for lack of blocks would thrash.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not batch.num_preempted:
            seq = self.waiting[0]
            if not self.chunked_prefill and seq.num_tokens > budget:
                break
            if not seq.block_table:
                bm.match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.allocate(seq, num_new):
                bm.free_sequence(seq)  # release prefix-cache hits; they are looked up again next time
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            bm.prefix_queries += seq.num_tokens
            bm.prefix_hits += seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from the queues and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free_sequence(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
