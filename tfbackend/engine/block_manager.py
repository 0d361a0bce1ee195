"""KV block allocation with reference counts and prefix caching.

Plain Python, no tensors: it only hands out block ids. A full block is identified by a hash chained over
all tokens up to its end, so two sequences sharing a prompt prefix share its blocks. Freed blocks keep
their hash and stay findable until they are reused (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from tfbackend.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # the block's tokens, to confirm a hash hit is not a collision


class BlockRecords:
    """Every block's record by id, each made when first used: a large GPU's cache has hundreds of thousands of
    blocks, and making them all up front took over a second of startup."""

    def __init__(self, num_blocks: int):
        self._records: list[Block | None] = [None] * num_blocks

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, block_id: int) -> Block:
        block = self._records[block_id]
        if block is None:
            block = self._records[block_id] = Block(block_id)
        return block

    def __iter__(self) -> Iterator[Block]:
        return (self[block_id] for block_id in range(len(self._records)))


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = BlockRecords(num_blocks)
        # Blocks with ref_count 0, in the order they should be reused; an OrderedDict so a cached
        # block can be taken back out of the middle in O(1) when a prefix hit revives it.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> None:
        """Attach the cached blocks holding the longest prefix of a new sequence's tokens.

        At least one token is always left to compute, since its logits are needed to sample.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return
        bs = self.block_size
        max_full_blocks = (seq.num_tokens - 1) // bs
        parent = None
        for i in range(max_full_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block_hash = chain_hash(parent, tokens)
            block_id = self.cached.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            parent = block_hash
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * bs
        if not seq.num_preemptions:  # a recomputed sequence finding its own blocks again is no prompt hit
            seq.num_cached_tokens = seq.num_computed_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` enough blocks for ``num_new_tokens`` more tokens; False (and no change) if full."""
        if not self.can_allocate(seq, num_new_tokens):
            return False
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            block_id = next(iter(self.free))
            self._take(block_id)
            self._forget_hash(self.blocks[block_id])
            seq.block_table.append(block_id)
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that ``seq``'s computed tokens have filled, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        start = seq.num_hashed_blocks
        parent = self.blocks[seq.block_table[start - 1]].hash if start else None
        for i in range(start, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                block.hash = chain_hash(parent, tokens)
                block.token_ids = tokens
                self.cached.setdefault(block.hash, block.block_id)
            parent = block.hash
            seq.num_hashed_blocks = i + 1

    def free_sequence(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its tail blocks become the first candidates for reuse."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _forget_hash(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash = None
        block.token_ids = ()
