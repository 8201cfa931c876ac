"""Paged KV blocks: a torch-free allocator with reference counts, a prefix cache and per-sequence block tables.

Block `b` holds the K/V of token slots `[b·block_size, (b+1)·block_size)` of whichever sequences
reference it; the model runner owns the tensors, this module only decides which blocks are whose.

With prefix caching (`prefix_cache`), a full block whose tokens are all computed is registered under its chain
hash; a later sequence with the same prefix takes it (reference count + 1) instead of recomputing it. A block
whose count falls to 0 is free but keeps its contents: it waits in an LRU and is evicted (its hash forgotten)
only when a fresh block is needed and no never-cached free block is left. Free blocks, cached or not, count as
free everywhere (capacity checks, `LoadStats`).
"""
from __future__ import annotations

from collections import OrderedDict, deque

from longserve.server.engine.prefix_cache import PrefixIndex, full_block_hashes
from longserve.server.engine.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """No free KV block. The scheduler checks `can_grow`/`can_admit` first (and preempts to make room), so
    this signals a bookkeeping bug rather than a full cache."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))       # free, holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, holding a cached prefix; oldest first
        self._refs = [0] * num_blocks
        self.index = PrefixIndex()

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def allocate(self) -> int:
        """A fresh block: a never-cached one if any, else the least recently freed cached one (evicted)."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self.index.forget(block)
        else:
            raise OutOfBlocks("no free KV block")
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """One more owner of a cached block (taking it back from the evictable LRU if nobody held it)."""
        if self._refs[block] == 0:
            if block not in self._evictable:
                raise ValueError(f"block {block} is free and holds no cached prefix")
            del self._evictable[block]
        self._refs[block] += 1
        return block

    def is_free(self, block: int) -> bool:
        return self._refs[block] == 0

    def release(self, block: int) -> None:
        if self._refs[block] < 1:
            raise ValueError(f"block {block} released twice")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self.index.holds(block):
                self._evictable[block] = None
            else:
                self._free.append(block)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self.allocator.index)

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

    # --- prefix caching ------------------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks holding the longest cached full-block prefix of `seq` that it may reuse (no side effect
        on the cache). Never the whole sequence: its last token is always computed, since sampling needs its
        logits (a fully cached prompt recomputes its last block). Empty when caching is off or the sequence
        needs every prompt token's activations (`Sequence.reads_prefix_cache`)."""
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        hashes, hits = seq.block_hashes, []
        lookup = self.allocator.index.lookup
        while len(hits) < limit:
            if len(hits) == len(hashes):  # hash ahead geometrically: a miss costs O(blocks matched), not O(prompt)
                full_block_hashes(seq, self.block_size, min(limit, max(16, 2 * len(hashes))))
            block = lookup(hashes[len(hits)])
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int]) -> bool:
        """Room for `seq`'s whole table given its cached prefix `hits` (a hit nobody holds is taken from the
        free blocks, so it counts against them)."""
        idle_hits = sum(1 for b in hits if self.allocator.is_free(b))
        return self.blocks_for(seq.num_tokens) - len(hits) + idle_hits <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a waiting `seq` (empty table) its cached prefix `hits` and fresh blocks for the rest; prefill
        then starts after the prefix."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks")
        if not self.can_admit(seq, hits):
            raise OutOfBlocks(f"no room for sequence {seq.seq_id}")
        seq.block_table = [self.allocator.share(b) for b in hits]
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.grow(seq, seq.num_tokens)

    def register_computed(self, seq: Sequence) -> None:
        """Enter `seq`'s blocks that became full and computed into the cache (after a step's commit)."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        hashes = full_block_hashes(seq, self.block_size, full)
        for i in range(seq.num_registered_blocks, full):
            self.allocator.index.register(seq.block_table[i], hashes[i])
        seq.num_registered_blocks = full

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, last first, so the LRU evicts a prefix's tail before its head."""
        for block in reversed(seq.block_table):
            self.allocator.release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
