"""Paged KV blocks: a torch-free allocator with reference counts and a per-sequence block table.

Block `b` holds the K/V of token slots `[b·block_size, (b+1)·block_size)` of whichever sequences
reference it; the model runner owns the tensors, this module only decides which blocks are whose.
"""
from __future__ import annotations

from collections import deque

from longserve.server.engine.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """No free KV block: the scheduler preempts a sequence and retries."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("no free KV block")
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """Another owner for an allocated block (e.g. a forked sequence)."""
        if self._refs[block] < 1:
            raise ValueError(f"block {block} is not allocated")
        self._refs[block] += 1
        return block

    def release(self, block: int) -> None:
        if self._refs[block] < 1:
            raise ValueError(f"block {block} released twice")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._refs[block]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_missing(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make `seq`'s block table cover `num_tokens` slots (all or nothing)."""
        missing = self.blocks_missing(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise OutOfBlocks(f"need {missing} blocks, {self.num_free_blocks} free")
        for _ in range(missing):
            seq.block_table.append(self.allocator.allocate())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (reference counted)."""
        child.block_table = [self.allocator.share(b) for b in parent.block_table]

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.allocator.release(block)
        seq.block_table = []
