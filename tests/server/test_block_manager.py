"""Paged KV block allocation (torch-free): reference counts, all-or-nothing growth, freeing."""
import pytest

from longserve.server.engine.block_manager import BlockAllocator, BlockManager, OutOfBlocks
from longserve.server.engine.sequence import Sequence
from longserve.server.sampling import SamplingParams


def seq(n):
    return Sequence("r", 0, list(range(n)), SamplingParams(), 8)


def test_grow_covers_tokens_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=16)
    s = seq(33)
    bm.grow(s, 33)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.grow(s, 48)
    assert len(s.block_table) == 3          # still fits
    bm.grow(s, 49)
    assert len(s.block_table) == 4
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_growth_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=16)
    a, b = seq(10), seq(10)
    bm.grow(a, 48)
    with pytest.raises(OutOfBlocks):
        bm.grow(b, 40)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert not bm.can_grow(b, 40) and bm.can_grow(b, 16)


def test_allocator_rejects_double_release_and_empty_cache():
    alloc = BlockAllocator(2)
    b = alloc.allocate()
    alloc.release(b)
    with pytest.raises(ValueError, match="twice"):
        alloc.release(b)
    with pytest.raises(ValueError):
        BlockAllocator(0)
